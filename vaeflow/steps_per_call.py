"""Several optimiser steps per call of Lightning's training step (Keras's ``steps_per_execution``).

Lightning's loop, data fetcher, hooks and callbacks cost a fixed fraction of a millisecond per
call of ``training_step``: 10-20% of a small model's step on the CPU. A :class:`SteppedModule`
with ``steps_per_call`` k > 1 takes k batches per call, through Lightning's
``training_step(self, dataloader_iter)`` step flavour, so that cost is paid once per k batches.
The steps, their batches, their noise and the logged metrics are those of one batch per call.
What this needs of Lightning beyond its public API is in :mod:`vaeflow.lightning_private`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from vaeflow.errors import ConfigError
from vaeflow.lightning_private import (
    add_logged_steps,
    before_batch_transfer,
    dataloader_iter_notices_silenced,
    every_n_train_steps,
    plain_cuda_check_without_gpu,
)

#: Hooks around a batch's move to the device. With several steps per call a batch moves by
#: the module's own ``transfer_batch_to_device``, or through Lightning's hook chain when the
#: module customises one of these or the data module any batch-transfer hook.
AROUND_TRANSFER = ("on_before_batch_transfer", "on_after_batch_transfer")


class SteppedModule(LightningModule):
    """A manually optimised module that trains by :meth:`train_on_batch`, one batch or several
    per call of ``training_step``.

    Args:
        steps_per_call: batches (training steps) per call of Lightning's training step.
            ``on_train_batch_start``/``end`` hooks then run once per call, with its last batch.
            Mid-epoch validation by batch count (``val_check_interval``) and step-wise
            checkpoints (``every_n_train_steps``) count calls, so they are refused with k > 1.
    """

    def __init__(self, steps_per_call: int = 1) -> None:
        super().__init__()
        if steps_per_call < 1:
            raise ConfigError(
                f"steps_per_call must be positive; got steps_per_call={steps_per_call}"
            )
        self.steps_per_call = steps_per_call
        # Steps are taken by hand: cheaper than Lightning's closure on small models, and a
        # model may take several per batch (the VAE's alternating E- and M-steps).
        self.automatic_optimization = False
        self._hooked_transfer = True
        if steps_per_call > 1:
            # Lightning hands a step whose signature names ``dataloader_iter`` the iterator
            # over the batches, instead of one batch.
            self.training_step = self._training_steps

    def train_on_batch(self, batch: Any) -> None:
        """The optimiser step(s) on one batch, already on the device."""
        raise NotImplementedError

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.train_on_batch(batch)

    def _training_steps(self, dataloader_iter: Iterator[tuple[Any, int, int]]) -> None:
        """``steps_per_call`` steps on batches pulled from Lightning's iterator, moved to the
        device through the batch-transfer hooks where the model or data module customises
        them; stops at the epoch's end and at ``max_steps``."""
        trainer = self.trainer
        steps = 0
        while steps < self.steps_per_call and not 0 <= trainer.max_steps <= trainer.global_step:
            try:
                batch, _, _ = next(dataloader_iter)
            except StopIteration:
                break
            batch = trainer.precision_plugin.convert_input(batch)
            if self._hooked_transfer:
                batch = trainer.strategy.batch_to_device(before_batch_transfer(self, batch))
            else:  # as Lightning documents for this step; its hook dispatch costs 2% of a step
                batch = self.transfer_batch_to_device(batch, self.device, 0)
            self.train_on_batch(batch)
            steps += 1
        # The loggers' step (the metrics' x-axis) counts batches; Lightning adds one per call.
        add_logged_steps(trainer, steps - 1)

    @override
    def setup(self, stage: str) -> None:
        """At a fit: torch's plain CUDA check where there is no GPU; with several steps per
        call, refuse what counts calls and see whether a batch transfer hook is customised."""
        if stage != "fit":
            return
        plain_cuda_check_without_gpu()
        if self.steps_per_call == 1:
            return
        check_counts_steps(self.trainer, self.steps_per_call)
        datamodule = self.trainer.datamodule
        data_hooks = (*AROUND_TRANSFER, "transfer_batch_to_device")
        self._hooked_transfer = any(is_overridden(h, self) for h in AROUND_TRANSFER) or any(
            is_overridden(h, datamodule, LightningDataModule) for h in data_hooks
        )


def check_counts_steps(trainer: Trainer, steps_per_call: int) -> None:
    """Refuse the trainer settings that count calls of the training step as batches: with
    several steps per call they would fire k times too rarely."""
    interval = getattr(trainer, "val_check_interval", 1.0)  # absent when given as a time
    if isinstance(interval, int) or interval != 1.0:
        raise ConfigError(
            f"trainer.val_check_interval={interval} validates every so many calls of the "
            f"training step, and with steps_per_call={steps_per_call} a call takes "
            f"{steps_per_call} batches. Validate once per epoch (the default), give the interval "
            "as a time (e.g. '00:00:05:00'), or set model.init_args.steps_per_call: 1"
        )
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and (every := every_n_train_steps(callback)):
            raise ConfigError(
                f"ModelCheckpoint(every_n_train_steps={every}) checks the step count once per "
                f"call of the training step, which takes {steps_per_call} steps with "
                f"model.init_args.steps_per_call: {steps_per_call}, so it would miss most "
                "multiples. Use every_n_epochs or train_time_interval, or set steps_per_call: 1"
            )


def fitting(model: LightningModule) -> AbstractContextManager[None]:
    """Wrap a fit of ``model``: with several steps per call, Lightning's notices about its
    experimental ``dataloader_iter`` step are hidden, as the step handles what they warn of
    (hooks see the last batch of a call; manual optimisation accumulates no gradients). They
    would only alarm users. Nothing changes with one step per call."""
    if getattr(model, "steps_per_call", 1) > 1:
        return dataloader_iter_notices_silenced()
    return nullcontext()
