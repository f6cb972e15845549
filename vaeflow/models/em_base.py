"""The base of every EM-style model: passes over the data, float64 sums, one update per pass.

An EM-style fit (factor analysis, Bayesian factor analysis by coordinate ascent, mixtures of
factor analysers) is a sequence of passes over the training data. Each pass sums float64
statistics batch by batch (:meth:`Pass.add`), outside autocast; at the end of the pass the sums
are added up across processes once (the Lightning strategy's ``reduce``), checked, and
:meth:`Pass.finish` takes the closed-form update and says which pass comes next, if any. A model
is its passes (their statistics and their update); this module holds what they share:

- :class:`Pass` and :class:`EMFit`: the sums of one pass, their reduction and checks, the
  stopping rule (:mod:`vaeflow.models.stopping`) and the fit's resume state;
- :class:`EMModel`: the Lightning side, as manual optimisation (the M-step at the last batch of
  a pass, one logged row per iteration on the iteration axis, the state in checkpoints, and
  validation/test of the exact per-example ``log_likelihood`` in float64);
- :class:`EMStepCounter`: the optimiser that lets Lightning count passes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from vaeflow.callbacks import prediction_callbacks
from vaeflow.errors import ConfigError, DataError
from vaeflow.metrics import EpochMeans, bits_per_dim, em_progress
from vaeflow.models.inputs import as_examples
from vaeflow.models.loading import ReadyForInference
from vaeflow.models.stopping import StoppingRule

F64 = torch.float64


class EMStepCounter(Optimizer):
    """The optimiser of an EM model: its step changes nothing (the M-step has already updated
    the parameters) but Lightning counts it, so ``global_step`` counts EM passes and
    checkpointing, which skips a step it has already saved, works."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, {})

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        return None


class Pass(ABC):
    """One pass over the data: float64 sums (the first is the number of examples), then what
    their end does. Subclasses say which sums (:meth:`start`), how a batch adds to them
    (:meth:`accumulate`) and what the totals over every process do (:meth:`finish`)."""

    def __init__(self) -> None:
        self.sums: list[Tensor] = []

    def add(self, x: Tensor) -> None:
        """Add one batch (N x D, any dtype) to the sums."""
        if not self.sums:
            self.sums = [x.new_zeros((), dtype=F64), *self.start(x)]
        self.sums[0] += len(x)
        self.accumulate(x, *self.sums[1:])

    @abstractmethod
    def start(self, x: Tensor) -> list[Tensor]:
        """The zero sums, shaped from the first batch."""

    @abstractmethod
    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        """Add one batch to ``sums`` in place."""

    @abstractmethod
    def finish(self, n: Tensor, *sums: Tensor) -> Pass | None:
        """Use the pass's sums over every process; return the next pass (None: fitted)."""


def common_shift(model: LightningModule, x: Tensor) -> Tensor:
    """A shift for float64 sums of squares that every process shares: rank 0's first batch
    mean. Sums about it avoid the cancellation in E[x x^T] - mu mu^T where the mean is large
    against the spread (an offset of 1e6); any shift gives the same result up to rounding.
    NaN (a missing value) is left out of the mean, and a feature without a value (a batch
    emptied of incomplete rows) gets 0."""
    return model.trainer.strategy.broadcast(x.nanmean(0, dtype=F64).nan_to_num(), src=0)


class EMFit(ABC):
    """One fit of an EM model: its current pass, its stopping rule and its resume state.

    Args:
        model: the model whose parameters the fit writes (its hparams hold ``tol``).
        state: :meth:`state_dict` of a checkpoint to resume from, or None for a fresh fit.
    """

    def __init__(self, model: EMModel, state: dict[str, Any] | None = None) -> None:
        self.model = model
        self.stopping = StoppingRule(model.hparams.tol)
        self.passes = 0  # passes finished in this fit
        if state is not None:
            self.load_state_dict(state)
        self.current: Pass | None = self.first_pass()

    @abstractmethod
    def first_pass(self) -> Pass | None:
        """The pass a fit (or a resumed fit) begins with."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the fit beyond the model's parameters and ``n_iter``."""
        return {"stopping": self.stopping.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stopping" in state:  # checkpoints written before the Aitken rule have none
            self.stopping.load_state_dict(state["stopping"])

    def add(self, x: Tensor) -> None:
        """Add one batch (N x D) to the current pass."""
        if self.current is not None:
            self.current.add(x)

    def end_pass(self) -> bool:
        """Sum the pass over processes, check it, finish it. Returns whether the fit is done."""
        if self.current is None:
            return True
        sums = self.current.sums
        if not sums:
            return False  # no batch in this pass (called twice at one epoch's end)
        name = type(self.model).__name__
        reduce = self.model.trainer.strategy.reduce
        sums = [reduce(total, reduce_op="sum") for total in sums]
        if sums[0].item() == 0:
            raise DataError(f"{name}: the training data set is empty; nothing was fitted")
        # NaN and infinities propagate into the sums: one check per pass, not per batch.
        if not all(torch.isfinite(total).all() for total in sums):
            raise DataError(
                f"{name}: the training data contain NaN or infinite values (or values too "
                "large for float64 sums); clean or impute them before fitting"
                f"{getattr(self.model, 'missing_values_advice', '')}"
            )
        with torch.no_grad(), torch.autocast(sums[0].device.type, enabled=False):
            self.current = self.current.finish(*sums)
        self.passes += 1
        return self.current is None


def check_latent_dim(model: str, latent_dim: int, dim: int) -> None:
    """Refuse a number of factors the data cannot identify: 1 <= latent_dim < D.

    Raises:
        ConfigError: with the range for this D, or why D = 1 has none.
    """
    if dim < 2:
        raise ConfigError(
            f"{model}: the data have one value per example (D = 1), and a factor model needs at "
            "least two: there is no covariance between values to explain. Fit a Gaussian to "
            "one-dimensional data, or give examples with several values"
        )
    if not 1 <= latent_dim < dim:
        raise ConfigError(
            f"{model}: latent_dim must be between 1 and D - 1 = {dim - 1} for data of "
            f"dimension D = {dim}, got {latent_dim} (with latent_dim >= D the model is not "
            "identified)"
        )


class EMModel(ReadyForInference):
    """Lightning's side of an EM-style model, fitted by passes over the data.

    A subclass creates its float64 parameters in :meth:`build` (from ``input_shape``, or from
    the data module's ``dims`` at setup), says how a fit starts (:meth:`make_fit`), and
    computes the exact ``log_likelihood(x)`` (N,) that validation and test average. Its hparams
    hold ``max_iter``, ``tol`` and ``data_log_scale``. Training is manual optimisation: each
    batch adds to the current pass's sums and the update runs at the pass's last batch, so that
    validation, which Lightning runs before ``on_train_epoch_end``, sees the new parameters.
    Training stops by itself (leave the Trainer's ``max_epochs`` at -1).
    """

    #: EM's sums do not depend on the order of the examples: data modules serve large
    #: contiguous batches (views) whatever ``batch_size`` says.
    order_free_passes: ClassVar[bool] = True
    #: Key of the fit's state (beyond parameters) in a checkpoint.
    checkpoint_key: ClassVar[str]

    def __init__(self, input_shape: tuple[int, ...] | None) -> None:
        """Save every constructor argument as hparams (a subclass calls this first), check
        ``max_iter`` and ``tol``, and build the parameters when the shape is known."""
        super().__init__()
        # Lightning collects the arguments of every __init__ on the way here: the subclass's
        self.save_hyperparameters()
        self.automatic_optimization = False
        hp, name = self.hparams, type(self).__name__
        if hp.max_iter < 1:
            raise ConfigError(f"{name}: max_iter must be positive, got {hp.max_iter}")
        if hp.tol < 0:
            raise ConfigError(f"{name}: tol must be >= 0, got {hp.tol}")
        self.register_buffer("n_iter", torch.zeros((), dtype=torch.long))
        #: One dict per EM iteration (the objective in nats per example, bits per dimension).
        self.history: list[dict[str, float]] = []
        #: Why the last fit stopped: ``aitken`` (within ``tol`` of the estimated limit),
        #: ``round-off`` (no gain float64 can resolve) or ``max_iter``; empty before a fit.
        self.stop_reason = ""
        self._fit: EMFit | None = None
        self._resume: dict[str, Any] | None = None  # the fit's state in a loaded checkpoint
        self._means = {"val": EpochMeans(), "test": EpochMeans()}
        if input_shape is not None:
            self._build(tuple(input_shape))

    def _build(self, input_shape: tuple[int, ...]) -> None:
        self.input_shape, self.dim = input_shape, math.prod(input_shape)
        self.build()
        self.hparams.input_shape = input_shape  # so that a checkpoint reloads alone

    @abstractmethod
    def build(self) -> None:
        """Check the sizes against ``self.dim`` and create the parameters."""

    @abstractmethod
    def make_fit(self, state: dict[str, Any] | None) -> EMFit:
        """The fit object, fresh (``state`` None) or resumed from a checkpoint's state."""

    @abstractmethod
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log p(x) of each example (N,)."""

    def bits_per_dim(self, log_likelihood: float) -> float:
        """Bits per dimension on the data's original grid (:func:`vaeflow.metrics.bits_per_dim`)."""
        value = torch.tensor(log_likelihood, dtype=torch.float64)
        return bits_per_dim(value, self.dim, self.hparams.data_log_scale).item()

    def flat(self, x: Tensor) -> Tensor:
        """The examples as rows (N x D), checked against the model's dimension."""
        x = as_examples(x, self.input_shape, type(self).__name__)
        return x.reshape(len(x), -1)

    # -- fitting ---------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        """Without ``input_shape``, create the parameters from the data module's ``dims``."""
        if hasattr(self, "dim"):
            return
        dims = getattr(self.trainer.datamodule, "dims", None)
        if dims is None:
            raise ConfigError(
                f"{type(self).__name__}: give input_shape (the shape of one example), or fit "
                "with a data module that has `dims`"
            )
        self._build(tuple(dims))

    @override
    def configure_optimizers(self) -> Optimizer:
        return EMStepCounter(self.parameters())

    @override
    def configure_callbacks(self) -> list[Callback]:
        """``vaeflow predict`` writes what ``predict_step`` returns to ``latents.pt``."""
        return prediction_callbacks(self.trainer)

    @override
    def on_train_start(self) -> None:
        """Make the fit, after any checkpoint has been restored: a resumed fit continues from
        the checkpoint's iteration and parameters."""
        resume = self._resume if self.trainer.ckpt_path is not None else None
        if resume is None:
            self.n_iter.zero_()
        self.history, self._resume = [], None
        self._fit = self.make_fit(resume)

    def examples(self, batch: Any) -> Any:
        """The training batch as the current pass takes it: by default its examples as rows
        (:meth:`flat`)."""
        return self.flat(batch)

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        x = self.examples(batch)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            self._fit.add(x)
        # The update runs at the last batch, not in on_train_epoch_end, because Lightning
        # validates before on_train_epoch_end: validation must see this pass's parameters.
        if self.trainer.is_last_batch:
            self._end_pass()
            self.optimizers().step()

    @override
    def on_train_epoch_end(self) -> None:
        self._end_pass()  # no-op unless the loader hid its last batch (iterable data sets)

    def _end_pass(self) -> None:
        fit = self._fit
        if fit.current is None or not fit.current.sums:
            return
        if fit.end_pass():
            # here, not in on_fit_end: callbacks' on_fit_end (the factor report) run first
            self.stop_reason = fit.stopping.reason or "max_iter"
            self.trainer.should_stop = True

    @override
    def on_fit_end(self) -> None:
        if self._fit is None or self._fit.passes == 0:
            raise DataError(
                f"{type(self).__name__}: the training data set is empty; nothing was fitted"
            )
        if self.history and (line := self.summary()):
            rank_zero_info(f"{type(self).__name__}: {line}")

    def progress(self) -> dict[str, float]:
        """The EM iteration and its objective, for the progress bar."""
        return em_progress(int(self.n_iter), self.history)

    def summary(self) -> str:
        """One line for the console at the end of a fit (rank 0); empty: none."""
        return ""

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._fit is not None:
            checkpoint[self.checkpoint_key] = self._fit.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resume = checkpoint.get(self.checkpoint_key)

    def record_row(self, iteration: int, row: dict[str, float]) -> None:
        """Keep and log one EM iteration's row (nats per example)."""
        self.n_iter.fill_(iteration)
        self.history.append(row)
        self._log_row(row)

    def _log_row(self, row: dict[str, float]) -> None:
        """To every logger on the EM-iteration axis (step = EM iteration): logged through
        Lightning, a row took Lightning's batch count as its step, which collided with an EM
        iteration's row (two rows of one step in metrics.csv)."""
        step = int(self.n_iter)
        for logger in self.loggers:
            logger.log_metrics({**row, "em_iteration": step}, step=step)

    # -- evaluation ------------------------------------------------------------------------

    def _evaluate(self, stage: str, batch: Tensor) -> None:
        ll = self.log_likelihood(batch)
        self._means[stage].update({"log_likelihood": ll.mean()}, len(ll))

    def _epoch_row(self, stage: str) -> dict[str, float]:
        """The epoch's mean log-likelihood (float64: sums of values and of examples reduced
        once over processes, exact for uneven shards) and its bits per dimension."""
        means = self._means[stage].compute(
            lambda totals: self.trainer.strategy.reduce(totals, reduce_op="sum")
        )
        value = means["log_likelihood"].item()
        return {f"{stage}/log_likelihood": value, f"{stage}/bits_per_dim": self.bits_per_dim(value)}

    @override
    def on_validation_epoch_start(self) -> None:
        self._means["val"] = EpochMeans()

    @override
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate("val", batch)

    @override
    def on_validation_epoch_end(self) -> None:
        """``val/log_likelihood`` and ``val/bits_per_dim`` of the iteration's parameters."""
        row = self._epoch_row("val")
        for name, metric in row.items():
            self.log(name, metric, logger=False)  # callbacks and progress bar
        if not self.trainer.sanity_checking:
            self._log_row(row)

    def fit_report(self) -> dict[str, float]:
        """Figures of the training fit that ``vaeflow test`` reports beside the test
        likelihood (FactorAnalysis: its goodness of fit); none by default."""
        return {}

    @override
    def on_test_epoch_start(self) -> None:
        self._means["test"] = EpochMeans()

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate("test", batch)

    @override
    def on_test_epoch_end(self) -> None:
        """The test metrics, in float64 (Lightning keeps a float64 tensor's precision, a
        Python float it makes float32). They are the same on every process: ``sync_dist``
        only tells Lightning so, which it would otherwise warn about under DDP."""
        row = self._epoch_row("test") | self.fit_report()
        values = {name: torch.tensor(value, dtype=torch.float64) for name, value in row.items()}
        self.log_dict(values, batch_size=1, sync_dist=True)
