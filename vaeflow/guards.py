"""Callbacks that end a training run safely: on numerical divergence and on SIGINT or SIGTERM.

- :class:`DivergenceGuard` stops training when the parameters turn non-finite or explode, with a
  message naming the likely causes, and refuses to write such parameters into any checkpoint, so
  the last checkpoint on disk is the last good one.
- :class:`InterruptCheckpoint` stops an interrupted run where it can resume exactly, writes
  ``last.ckpt`` there (which ``--ckpt_path last`` resumes from) and ends the run with the
  shell's code for the signal (130 for SIGINT, 143 for SIGTERM), never 0.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from vaeflow.checkpointing import LAST
from vaeflow.errors import TrainingDiverged
from vaeflow.lightning_private import validation_follows
from vaeflow.utils import as_list


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The Euclidean norm of the tensors together (inf or NaN if any value is)."""
    return torch.nn.utils.get_total_norm([t.detach() for t in tensors]).item() if tensors else 0.0


class DivergenceGuard(Callback):
    """Stops training when the parameters hold NaN or infinity, or grow ``max_growth``-fold.

    A non-finite loss makes non-finite gradients and then non-finite parameters; a learning rate
    far too large makes them explode first (Adam at lr 1e6 gives an ELBO of -6e15 per example
    while every number stays finite). The parameters are checked every ``every_n_steps`` steps
    (one norm, a few microseconds) and before every checkpoint is written, and logged metrics
    before every checkpoint.

    Args:
        every_n_steps: training steps between checks.
        max_growth: how many times its norm at the start of training the parameters' norm may
            reach; healthy training stays within a few times.
    """

    def __init__(self, every_n_steps: int = 20, max_growth: float = 1e4) -> None:
        self.every_n_steps = every_n_steps
        self.max_growth = max_growth
        self._initial_norms: list[float] = []
        self._next_check = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._initial_norms = [total_norm([p]) for p in pl_module.parameters()]
        self._next_check = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # by the step count, not batch_idx: with several steps per call this hook sees every
        # k-th batch, whose index may never be a multiple of every_n_steps
        if trainer.global_step >= self._next_check:
            self._next_check = trainer.global_step + self.every_n_steps
            self.check(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check before validating too: parameters that turned NaN since the last check would
        otherwise fail inside a distribution's argument check, with a traceback."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Raise before a diverged model reaches a checkpoint file."""
        self.check(trainer, pl_module)
        bad = [
            name
            for name, value in trainer.callback_metrics.items()
            if not torch.isfinite(value).all()
        ]
        if bad:
            self.stop(trainer, f"the logged {', '.join(sorted(bad))} are not finite")

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop on non-finite parameters, or on gradient-trained ones (EM models take no
        gradients and may move far in their first pass) grown ``max_growth``-fold."""
        parameters = list(pl_module.parameters())
        if not math.isfinite(total_norm(parameters)):
            self.stop(trainer, "the parameters hold NaN or infinite values")
        moved = [i for i, p in enumerate(parameters) if p.grad is not None]
        if not moved or len(self._initial_norms) != len(parameters):
            return
        norm = total_norm([parameters[i] for i in moved])
        initial = math.sqrt(sum(self._initial_norms[i] ** 2 for i in moved))
        if norm > self.max_growth * max(initial, 1e-12):
            self.stop(
                trainer,
                f"the parameters' norm grew from {initial:.3g} to {norm:.3g} "
                f"(more than {self.max_growth:g}-fold)",
            )

    @staticmethod
    def stop(trainer: Trainer, what: str) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        lr = optimizer.param_groups[0].get("lr") if optimizer and optimizer.param_groups else None
        callback = trainer.checkpoint_callback
        kept = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        raise TrainingDiverged(
            f"training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"{what}, and training stopped. Likely causes: a learning rate too large"
            f"{f' (the optimiser has lr={lr:g}; try 3-10 times smaller)' if lr else ''}, a "
            "variance floor too low for the data (a learned Gaussian likelihood's min_std), or "
            "an encoder scale range too wide (model.init_args.posterior_scale_range); clipping "
            "gradients (model.init_args.gradient_clip_val) also helps. No diverged checkpoint "
            "was written" + (f"; the last good one is {kept}" if kept else "")
        )


class Interrupted(SystemExit):
    """A run stopped by SIGINT or SIGTERM: the process ends with 128 + the signal (130, 143),
    after :func:`~vaeflow.lightning_cli.run` prints :attr:`message`, one line."""

    def __init__(self, signum: signal.Signals, message: str) -> None:
        super().__init__(128 + signum)
        self.signal = signum
        self.message = message


class InterruptCheckpoint(Callback):
    """On SIGINT (Ctrl+C) or SIGTERM (a scheduler's stop): stop where a resumed run goes on as
    an uninterrupted one would, with ``last.ckpt`` written there, and end with 128 + the signal.

    - Training a model that resumes mid-epoch (``resumes_mid_epoch``: the VAE, whose loader
      position and epoch means are in its checkpoints): after the batch in progress, writing
      ``last.ckpt`` there. A batch followed by validation or the epoch's end is carried through
      them (a checkpoint before them would resume past them), as is a signal during validation.
    - Training an EM model (its pass sums are not in checkpoints): at the end of the pass (the
      EM iteration).
    - At an epoch's end the run stops before the next epoch starts, with the ``last.ckpt`` that
      Lightning wrote for the finished epoch.
    - Before training starts (start-up, the sanity check) and in ``validate``, ``test`` and
      ``predict``: at once (SIGTERM after the batch in progress); nothing is saved, as nothing
      was trained.
    - A second signal stops at once, saving nothing.

    SIGTERM of a multi-process run is left to Lightning (it stops every process together).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._training = False
        self._previous: dict[signal.Signals, Any] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signal, self._training = None, False
        self._handle(signal.SIGINT)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training = True
        if trainer.world_size == 1:  # in place of Lightning's, which it set after setup
            self._handle(signal.SIGTERM)

    def _handle(self, signum: signal.Signals) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous.setdefault(signum, signal.signal(signum, self._record))

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None or not self._training:
            name = signal.Signals(signum).name
            raise Interrupted(signal.Signals(signum), f"interrupted by {name}; nothing was saved")
        self.signal = signal.Signals(signum)
        print(
            f"\nvaeflow: {self.signal.name}: stopping where the run can resume exactly "
            f"({self.signal.name} again stops at once, saving nothing)",
            file=sys.stderr,
        )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.signal is None
            or not getattr(pl_module, "resumes_mid_epoch", False)
            or not resumable_loaders(trainer)
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or validation_follows(trainer)
        ):
            return
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        callback = trainer.checkpoint_callback
        if callback is None or not getattr(callback, "dirpath", None):
            raise Interrupted(
                self.signal,
                f"interrupted by {self.signal.name} at {where}; no checkpoint was written "
                "(checkpointing is off)",
            )
        path = Path(callback.dirpath) / f"{LAST}.ckpt"
        trainer.save_checkpoint(path)
        raise Interrupted(
            self.signal,
            f"interrupted by {self.signal.name} at {where} (batch {batch_idx + 1} of "
            f"{trainer.num_training_batches}): saved {path}; --ckpt_path last resumes there",
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.signal is None:
            return
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "")
        raise Interrupted(
            self.signal,
            f"interrupted by {self.signal.name} after epoch {trainer.current_epoch - 1}, step "
            f"{trainer.global_step}: "
            + (f"{last} holds it; --ckpt_path last resumes there" if last else "nothing saved"),
        )

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop at SIGTERM: Lightning's prediction loop, unlike its others, notes the signal
        and predicts on to the end (exit 0)."""
        if trainer.received_sigterm:
            raise SIGTERMException

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._training = False


def resumable_loaders(trainer: Trainer) -> bool:
    """Whether every training loader keeps its place in checkpoints (Lightning's ``state_dict``
    interface, as vaeflow's loaders have)."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    return all(hasattr(loader, "load_state_dict") for loader in as_list(loaders))


def interrupting_signal(trainer: Trainer) -> signal.Signals | None:
    """The signal that came as the trainer's last fit finished, if one did."""
    for callback in trainer.callbacks:
        if isinstance(callback, InterruptCheckpoint) and callback.signal is not None:
            return callback.signal
    return None
