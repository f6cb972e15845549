"""Factor analysis and probabilistic PCA fitted by exact EM, as Lightning manual optimisation.

The model: z ~ N(0, I_M), x | z ~ N(W z + mu, Psi), so x ~ N(mu, C) with C = W W^T + Psi;
``noise="isotropic"`` ties Psi = sigma^2 I (PPCA). Every EM statistic is a sum over examples,
accumulated batch by batch in float64, summed across processes, and the closed-form M-step is
taken once per pass. The two ways to fit (``moments``, ``streaming``) are objects of
:mod:`vaeflow.models.fa_fit`; the formulas are in :mod:`vaeflow.models.fa_math`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from vaeflow.analysis.rotation import ROTATIONS, Rotation, rotate
from vaeflow.callbacks import prediction_callbacks
from vaeflow.callbacks.factor_report import FactorReport
from vaeflow.errors import ConfigError, DataError
from vaeflow.metrics import EpochMeans, bits_per_dim, em_progress
from vaeflow.models.fa_fit import Fitter, MomentsFitter, StreamingFitter
from vaeflow.models.fa_math import (
    Iterate,
    factorise,
    log_likelihood,
    posterior_covariance,
    posterior_mean,
)
from vaeflow.models.loading import ReadyForInference

#: Smallest ``noise_floor``: the rounding of the covariance S (relative ~1e-16 times the growth
#: of its sums) is divided by the floor in the log-likelihood. Measured on 500 examples with a
#: feature on the floor: 1e-7 nats per example off the dense float64 value at 1e-8, 1e-6 at
#: 1e-9, 1e-5 at 1e-10 (tests/test_fa.py).
MIN_NOISE_FLOOR = 1e-9

#: Key of the fit's state (beyond parameters) in a checkpoint.
CHECKPOINT_KEY = "factor_analysis_fit"
#: Key of the training data's fit statistics in a checkpoint.
STATISTICS_KEY = "factor_analysis_statistics"


#: The training fit's statistics that ``vaeflow test`` reports beside the test likelihood.
FIT_STATISTICS = ("chi_square", "dof", "p_value", "rmsea", "tli", "bic", "srmr")


class EMStepCounter(Optimizer):
    """The optimiser of an EM model: its step changes nothing (the M-step has already updated
    the parameters) but Lightning counts it, so ``global_step`` counts EM passes and
    checkpointing, which skips a step it has already saved, works."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, {})

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        return None


class FactorAnalysis(ReadyForInference):
    """Factor analysis (diagonal noise) or probabilistic PCA (isotropic noise), fitted by EM.

    Each training pass over the data is exact EM: the E-step statistics are summed in float64
    outside autocast, reduced across processes through the Lightning strategy, and the M-step
    runs once at the end of the pass. Training stops by itself once the log-likelihood is
    estimated to be within ``tol`` nats per example of its limit (or after ``max_iter`` EM
    iterations): leave the Trainer's ``max_epochs`` at -1. The per-iteration log-likelihood,
    ELBO (nats per example) and bits per dimension go to the loggers as ``train/log_likelihood``,
    ``train/elbo`` and ``train/bits_per_dim``, one row per EM iteration, with the iteration as
    the step; ``val/...`` rows take the step of the iteration they score.

    The mean is the sample mean (its exact maximum-likelihood value). Parameters are float64
    ``nn.Parameter`` objects, in the data's own units, so checkpoints carry them and DDP can
    wrap the module; EM writes them in place, no gradient is ever taken. ``vaeflow predict``
    writes the posterior means to ``latents.pt`` in the run folder. A fit resumed from a
    checkpoint (``--ckpt_path``) continues from its EM iteration and parameters.

    Args:
        input_shape: shape of one example; the CLI links it from the data module's ``dims``,
            and without it the model takes ``dims`` from the Trainer's data module at setup.
        latent_dim: number of factors M; must be smaller than the data dimension D.
        noise: ``diagonal`` (factor analysis) or ``isotropic`` (probabilistic PCA).
        method: ``moments`` iterates EM on the D x D covariance after one pass over the data;
            ``streaming`` takes one EM iteration per pass and never forms a D x D matrix;
            ``auto`` picks ``moments`` when D <= ``moments_max_dim``.
        moments_max_dim: largest D for which ``auto`` picks ``moments``.
        init: ``ppca`` starts from the closed-form PPCA solution, from the leading eigenpairs
            of the covariance (randomised subspace iteration on S, or a randomised sketch and
            one more pass when streaming); ``random`` from random loadings drawn with ``seed``.
        max_iter: most EM iterations.
        tol: stop when the log-likelihood is estimated to be within this many nats per example
            of its limit: the Aitken estimate from the gains of two successive EM steps
            (:mod:`vaeflow.models.stopping`), which tells a slow approach to a maximum from
            one. A fit also stops when both gains are at the round-off of the log-likelihood,
            so a ``tol`` below round-off ends where float64 can resolve no more progress.
        noise_floor: lower bound of each noise variance relative to its feature's variance
            (Psi_d >= noise_floor * S_dd), so the fit is equivariant to rescaling a feature.
            It keeps a feature that others predict exactly (collinear columns) from driving
            its variance to zero and the likelihood to infinity; the M-step with the floor is
            still the exact constrained maximiser. At least 1e-9: below it float64 stops
            resolving the likelihood. For ``isotropic`` noise the floor is relative to the
            mean feature variance.
        constant_feature_variance: noise variance of features that are constant in the
            training data (MNIST's border pixels), which have no scale of their own; each adds
            -1/2 log(2 pi constant_feature_variance) to the log-likelihood (scikit-learn's
            floor is the same 1e-12).
        accelerate: SQUAREM cycles instead of single EM steps in the ``moments`` method
            (safeguarded: the log-likelihood still never decreases); an iteration is then one
            cycle.
        rotation: the rotation that the reports use (``loadings.csv``, ``summary.txt``, the
            loadings pictures; :meth:`rotated`): a name of :data:`vaeflow.analysis.ROTATIONS`
            (orthogonal ``varimax``, ``quartimax``, ``equamax``; oblique ``promax``,
            ``oblimin``, ``quartimin``, ``geomin``) or ``none``. The likelihood does not change
            under rotation, and ``loadings`` keep the unrotated maximum-likelihood solution.
        seed: seed of the random initialisation and of the streaming PPCA sketch.
        data_log_scale: log of the factor the data module divided the data by (linked by the
            CLI from the data module's ``log_scale``), for bits per dimension on the data's
            original grid.
    """

    #: EM's sums do not depend on the order of the examples: data modules serve large
    #: contiguous batches (views) whatever ``batch_size`` says.
    order_free_passes: ClassVar[bool] = True
    #: A data module without an explicit ``val_fraction`` gives factor analysis every row: the
    #: maximum-likelihood fit is of all the data, and a validation split is a check to ask for.
    default_val_fraction: ClassVar[float] = 0.0

    def __init__(
        self,
        input_shape: tuple[int, ...] | None = None,
        latent_dim: int = 10,
        noise: Literal["diagonal", "isotropic"] = "diagonal",
        method: Literal["auto", "moments", "streaming"] = "auto",
        moments_max_dim: int = 4096,
        init: Literal["ppca", "random"] = "ppca",
        max_iter: int = 1000,
        tol: float = 1e-6,
        noise_floor: float = 1e-8,
        constant_feature_variance: float = 1e-12,
        accelerate: bool = True,
        rotation: str = "none",
        seed: int = 0,
        data_log_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        for name, value in (("max_iter", max_iter), ("moments_max_dim", moments_max_dim)):
            if value < 1:
                raise ConfigError(f"FactorAnalysis: {name} must be positive, got {value}")
        if tol < 0:
            raise ConfigError(f"FactorAnalysis: tol must be >= 0, got {tol}")
        if not MIN_NOISE_FLOOR <= noise_floor < 1:
            raise ConfigError(
                f"FactorAnalysis: noise_floor must be in [{MIN_NOISE_FLOOR:g}, 1), got "
                f"{noise_floor:g}: it is relative to each feature's variance, and below "
                f"{MIN_NOISE_FLOOR:g} float64 cannot resolve the log-likelihood of the noise "
                "variances that sit on it"
            )
        if rotation != "none":
            ROTATIONS.get(rotation)  # an unknown name is a ConfigError listing the known ones
        if not constant_feature_variance > 0:
            raise ConfigError(
                "FactorAnalysis: constant_feature_variance must be positive, got "
                f"{constant_feature_variance:g}"
            )
        self.latent_dim = latent_dim
        self.isotropic = noise == "isotropic"
        self.register_buffer("n_iter", torch.zeros((), dtype=torch.long))
        #: One dict per EM iteration: ``train/log_likelihood``, ``train/elbo`` (nats/example)
        #: and ``train/bits_per_dim``.
        self.history: list[dict[str, float]] = []
        #: Why the last fit stopped: ``aitken`` (within ``tol`` of the estimated limit),
        #: ``round-off`` (no gain float64 can resolve) or ``max_iter``; empty before a fit.
        self.stop_reason = ""
        #: Goodness of fit of the training data (:class:`vaeflow.analysis.FitStatistics` as a
        #: dict: chi-square, RMSEA, TLI, BIC, SRMR, ...) when fitted by ``moments`` on data
        #: without constant features; None otherwise.
        self.fit_statistics: dict[str, float] | None = None
        self._fitter: Fitter | None = None
        self._resume: dict[str, Any] | None = None  # the fit's state in a loaded checkpoint
        self._means = {"val": EpochMeans(), "test": EpochMeans()}
        if input_shape is not None:
            self._build(tuple(input_shape))

    def _build(self, input_shape: tuple[int, ...]) -> None:
        """Check the sizes and create the parameters."""
        dim = math.prod(input_shape)
        if not 1 <= self.latent_dim < dim:
            raise ConfigError(
                f"FactorAnalysis: latent_dim must be between 1 and D - 1 = {dim - 1} for data of "
                f"dimension D = {dim}, got {self.latent_dim} (with M >= D the model is not "
                "identified)"
            )
        self.input_shape, self.dim = input_shape, dim
        self.hparams.input_shape = input_shape  # so that a checkpoint reloads alone
        hp = self.hparams
        self.streaming = hp.method == "streaming" or (
            hp.method == "auto" and dim > hp.moments_max_dim
        )
        f64 = torch.float64
        self.loadings = nn.Parameter(torch.zeros(dim, self.latent_dim, dtype=f64))
        self.noise_variance = nn.Parameter(torch.ones(dim, dtype=f64))
        self.mean = nn.Parameter(torch.zeros(dim, dtype=f64))

    # -- inference under the current parameters ---------------------------------------------

    def _centred(self, x: Tensor | np.ndarray) -> Tensor:
        """x (N x ...) minus the mean, as a float64 tensor on the model's device: users hold
        tensors of any float type and NumPy arrays."""
        x = torch.as_tensor(x)
        return x.reshape(len(x), -1).to(self.mean) - self.mean

    @torch.no_grad()
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log p(x) of each example (N,), in O(N D M), accurate to float64 round-off
        even when noise variances are tiny (see :mod:`vaeflow.models.fa_math`)."""
        return log_likelihood(self._centred(x), factorise(self.loadings, self.noise_variance))

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior p(z|x): means (N x M), G W^T Psi^-1 (x - mu), and the covariance G (M x M),
        the same for every example."""
        factors = factorise(self.loadings, self.noise_variance)
        return posterior_mean(self._centred(x), factors), posterior_covariance(factors)

    @torch.no_grad()
    def rotated(self) -> Rotation:
        """The loadings rotated by ``rotation`` (the pattern in the data's units, the factor
        correlations Phi and the rotation T: pattern = W T^(-T), Phi = T^T T), factors ordered
        by variance explained and signed to positive sums (:func:`vaeflow.analysis.rotate`)."""
        if self.hparams.rotation == "none":
            eye = torch.eye(self.latent_dim, dtype=self.loadings.dtype, device=self.mean.device)
            return Rotation(self.loadings.detach(), eye, eye)
        return rotate(self.loadings.detach(), self.hparams.rotation)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n draws from the model, shaped (n, *input_shape)."""
        z = torch.randn(n, self.latent_dim, dtype=self.mean.dtype, device=self.mean.device)
        eps = torch.randn(n, self.dim, dtype=self.mean.dtype, device=self.mean.device)
        x = self.mean + z @ self.loadings.T + eps * self.noise_variance.sqrt()
        return x.reshape(n, *self.input_shape)

    def bits_per_dim(self, log_likelihood: float) -> float:
        """Bits per dimension on the data's original grid (:func:`vaeflow.metrics.bits_per_dim`)."""
        value = torch.tensor(log_likelihood, dtype=torch.float64)
        return bits_per_dim(value, self.dim, self.hparams.data_log_scale).item()

    # -- Lightning hooks -------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        """Without ``input_shape``, create the parameters from the data module's ``dims``."""
        if hasattr(self, "dim"):
            return
        dims = getattr(self.trainer.datamodule, "dims", None)
        if dims is None:
            raise ConfigError(
                "FactorAnalysis: give input_shape (the shape of one example), or fit with a "
                "data module that has `dims`"
            )
        self._build(tuple(dims))

    @override
    def configure_optimizers(self) -> Optimizer:
        return EMStepCounter(self.parameters())

    @override
    def configure_callbacks(self) -> list[Callback]:
        """``vaeflow predict`` writes the latent codes (posterior means) to ``latents.pt``; a
        fit writes ``loadings.csv`` and ``summary.txt`` (:class:`FactorReport`)."""
        return [*prediction_callbacks(self.trainer), FactorReport()]

    @override
    def on_train_start(self) -> None:
        """Choose the fitter, after any checkpoint has been restored: a resumed fit continues
        from the checkpoint's iteration and parameters."""
        resume = self._resume if self.trainer.ckpt_path is not None else None
        if resume is None:
            self.n_iter.zero_()
        self.history, self._resume = [], None
        self._fitter = (StreamingFitter if self.streaming else MomentsFitter)(self, resume)

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        x = batch.reshape(len(batch), -1)
        if x.shape[1] != self.dim:
            raise DataError(
                f"FactorAnalysis: examples have {x.shape[1]} values, expected {self.dim}"
            )
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            self._fitter.add(x)
        # The M-step runs at the last batch, not in on_train_epoch_end, because Lightning
        # validates before on_train_epoch_end: validation must see this pass's parameters.
        if self.trainer.is_last_batch:
            self._end_pass()
            self.optimizers().step()

    @override
    def on_train_epoch_end(self) -> None:
        self._end_pass()  # no-op unless the loader hid its last batch (iterable data sets)

    def _end_pass(self) -> None:
        fitter = self._fitter
        if fitter.current is None or not fitter.current.sums:
            return
        if fitter.end_pass():
            self.stop_reason = fitter.stopping.reason or "max_iter"
            self.trainer.should_stop = True

    @override
    def on_fit_end(self) -> None:
        if self._fitter is None or self._fitter.var is None:
            raise DataError("FactorAnalysis: the training data set is empty; nothing was fitted")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._fitter is not None:
            checkpoint[CHECKPOINT_KEY] = self._fitter.state_dict()
        checkpoint[STATISTICS_KEY] = self.fit_statistics

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume = checkpoint.get(CHECKPOINT_KEY)
        self.fit_statistics = checkpoint.get(STATISTICS_KEY)

    def progress(self) -> dict[str, float]:
        """The EM iteration and its log-likelihood, for the progress bar."""
        return em_progress(int(self.n_iter), self.history)

    def record(self, iterate: Iterate) -> None:
        """One row per EM iteration: log-likelihood, ELBO and bits/dim at the iterate."""
        self.n_iter.fill_(iterate.iteration)
        ll = iterate.log_likelihood.item()
        row = {
            "train/log_likelihood": ll,
            "train/elbo": iterate.elbo.item(),
            "train/bits_per_dim": self.bits_per_dim(ll),
        }
        self.history.append(row)
        self._log_row(row)

    def _log_row(self, row: dict[str, float]) -> None:
        """To every logger on the EM-iteration axis (step = EM iteration): logged through
        Lightning, a row took Lightning's batch count as its step, which collided with an EM
        iteration's row (two rows of one step in metrics.csv)."""
        step = int(self.n_iter)
        for logger in self.loggers:
            logger.log_metrics({**row, "em_iteration": step}, step=step)

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
        row = self._epoch_row("test")
        for name in FIT_STATISTICS if self.fit_statistics else ():
            row[f"fit/{name}"] = self.fit_statistics[name]  # of the training data
        values = {name: torch.tensor(value, dtype=torch.float64) for name, value in row.items()}
        self.log_dict(values, batch_size=1, sync_dist=True)

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.posterior(batch)[0]

    def prediction_extras(self) -> dict[str, Tensor]:
        """What ``latents.pt`` holds beside the posterior means: the posterior covariance G
        (M x M), the same for every example."""
        factors = factorise(self.loadings.detach(), self.noise_variance.detach())
        return {"covariance": posterior_covariance(factors).cpu()}
