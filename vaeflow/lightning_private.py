"""Lightning plumbing: everything vaeflow relies on beyond Lightning's public API, in one place.

Each name here touches Lightning state that Lightning does not promise to keep: attributes with
a leading underscore, the texts of its warnings, an environment variable it sets on import; and
two such things of jsonargparse, the parser Lightning's CLI is built on (:func:`parser_actions`,
:func:`known_subclasses_help`). Nothing else in vaeflow touches them.
``tests/test_lightning_private.py`` checks every one against the installed Lightning (and
jsonargparse) and fails loudly when a release changes it, and pyproject.toml pins Lightning to
:data:`VERIFIED`, the releases these were checked on: to move the pin, run that test on the new
release and mend what it finds here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

#: The Lightning releases this module was checked on; pyproject.toml pins the same range.
#: Its own test passes on 2.4.0 and 2.5.6 too, but several steps per call under bf16 differ
#: from one on 2.4.0, and vaeflow uses 2.6's time-valued ``val_check_interval`` and
#: ``Trainer.enable_autolog_hparams``.
VERIFIED = ">=2.6,<2.7"

#: Set to ``1`` by Lightning on import (read by ``torch.cuda.is_available``).
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"

#: The starts of the notices Lightning gives at every fit whose training step takes
#: ``dataloader_iter`` (its experimental step flavour).
DATALOADER_ITER_NOTICES = (
    "Found `dataloader_iter` argument in the `training_step`",
    "You are using the `dataloader_iter` step flavor",
)


def logged_steps(trainer: Trainer) -> int:
    """The loggers' step, the x-axis of logged metrics: Lightning counts it in calls of the
    training step that stepped an optimiser."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def add_logged_steps(trainer: Trainer, steps: int) -> None:
    """Move the loggers' step on by ``steps`` (it is saved in checkpoints, so resumes keep it)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += steps


def validation_follows(trainer: Trainer) -> bool:
    """Whether Lightning validates after the training batch just ended (at its
    ``on_train_batch_end``): by batch count, time, or the epoch's end."""
    fit_loop = trainer.fit_loop
    return fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    """The step interval of a checkpoint callback; 0 when it does not save by steps."""
    return callback._every_n_train_steps


def before_batch_transfer(module: LightningModule, batch: Any) -> Any:
    """Lightning's ``on_before_batch_transfer`` dispatch for a training batch: the data module's
    hook where it overrides one, else the module's, under Lightning's profiler."""
    return module._on_before_batch_transfer(batch, dataloader_idx=0)


@contextmanager
def dataloader_iter_notices_silenced() -> Iterator[None]:
    """Hide :data:`DATALOADER_ITER_NOTICES` inside the block, and only there."""
    with warnings.catch_warnings():
        for notice in DATALOADER_ITER_NOTICES:
            warnings.filterwarnings("ignore", message=re.escape(notice))
        yield


def plain_cuda_check_without_gpu() -> None:
    """Lightning sets :data:`NVML_CHECK` so that asking whether CUDA is available cannot
    initialise CUDA, which would break forked processes. Without a GPU every such question then
    tries to load NVML again, and torch's Adam asks at every step: 0.1-0.3 ms, a few percent of a
    small model's step on the CPU. With no GPU there is nothing to protect, so torch's own
    (cached) check is restored for the rest of the process."""
    if os.environ.get(NVML_CHECK) == "1" and torch.cuda.device_count() == 0:
        del os.environ[NVML_CHECK]


class SpawnSkippingFinalisation(DDPStrategy):
    """Lightning's ``ddp_spawn`` whose workers leave by ``os._exit`` once their results are
    handed back, skipping interpreter finalisation.

    With gloo, a worker of a finished fit sometimes aborts at exit ("terminate called without an
    active exception", about once in 15 fits): gloo's worker thread destroys a finished
    all-reduce whose tensor still owns a Python object while the main thread runs
    ``Py_FinalizeEx`` (seen with torch 2.15). A worker has nothing left to do by then: its
    results are in the parent's queue, its loggers closed by the fit's teardown.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    @override
    def _configure_launcher(self) -> None:
        self._launcher = _LauncherSkippingFinalisation(self, start_method=self._start_method)


class _LauncherSkippingFinalisation(_MultiProcessingLauncher):
    """Runs a worker as Lightning does (its rank 0 puts the results on a pipe, synchronously),
    then ends the process at once."""

    @override
    def _wrapping_function(self, process_idx: int, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(process_idx, *args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of a parser (argparse's and so jsonargparse's keep them in ``_actions``), to
    find the one a class argument added."""
    return parser._actions


def known_subclasses_help(action: argparse.Action) -> str:
    """The ``, known subclasses: ...`` that jsonargparse's help appends to an option typed with a
    class (its ``ActionTypeHint.extra_help``), to be replaced by the registered names; "" for
    an option of another type."""
    extra_help = getattr(action, "extra_help", None)
    return extra_help() if callable(extra_help) else ""
