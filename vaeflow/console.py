"""What the console shows of a run: lines about the run, and a few closing lines that say where
it went and what it reached.

Lightning prints, on every run, lines that do not concern a vaeflow run: a tip to install
another package, "GPU available: False" on a machine without one, a FLOPs count of 0, warnings
about settings vaeflow chose on purpose (epochs shorter than the logging interval, metrics
that vaeflow reduces across processes itself, the ``dataloader_iter`` step). Each is silenced
by its own message for the duration of a run only; every other warning stays.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override

#: Warnings about what vaeflow does on purpose, each matched by the start of its message.
QUIET_WARNINGS = (
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"The dirpath has changed from",  # a run's own folder, for test/validate/predict
    r"Couldn't infer the batch indices",  # the latent-code writer needs none
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r".*`dataloader_iter`",  # steps_per_call's documented step signature
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning
    r"It is recommended to use `self\.log\(.*sync_dist=True",  # vaeflow reduces its metrics
    r"Total length of `\w+` across ranks is zero",  # val_fraction: 0
    r"You are using `torch\.load` with `weights_only=False`",
    r"No seed found, seed set to",  # "Seed set to 0" follows
)
#: Lightning's info lines that do not concern the run.
QUIET_INFO = (
    "GPU available: False",
    "TPU available: False",
    "💡 Tip:",
    "Trainer already configured with model summary callbacks",  # vaeflow's own summary
)


class _QuietInfo(logging.Filter):
    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(QUIET_INFO)


@contextmanager
def quiet_run() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_INFO` while the block runs."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    quiet = _QuietInfo()
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(quiet)


class ModelSummary(LightningModelSummary):
    """The model's parts and their parameters, without the FLOPs (0 unless measured) and the
    train/eval mode counts of Lightning's table."""

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        parts = zip(columns["Name"], columns["Type"], columns["Params"], strict=True)
        rows = [("part", "type", "parameters"), *parts]
        widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
        lines = [
            "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.append(
            f"{get_human_readable_count(trainable_parameters)} trainable parameters of "
            f"{get_human_readable_count(total_parameters)} ({model_size:.3f} MB)"
        )
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n".join(lines))


class ProgressBar(TQDMProgressBar):
    """Lightning's bar with the model's training objective beside the step count: a VAE's ELBO
    (or importance-weighted bound) averaged over the epoch so far, an EM model's iteration and
    log-likelihood (or ELBO). It reads them from the model's ``progress()`` at each redraw,
    and each model logs nothing more for it.

    During validation and test, a model that reports its importance samples (the VAE's
    ``sample_progress``) gets their count beside the batch count: with a large
    ``eval_samples`` one batch takes minutes, and the batch count alone would stand still."""

    #: The least time between two redraws of the sample count, in seconds.
    SAMPLES_REDRAW_SECONDS = 0.5

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        progress = getattr(pl_module, "progress", None)
        objective = progress() if callable(progress) else {}
        return {**objective, **super().get_metrics(trainer, pl_module)}

    @override
    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._show_samples(pl_module, self.val_progress_bar)

    @override
    def on_test_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._show_samples(pl_module, self.test_progress_bar)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._show_samples(pl_module, None)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._show_samples(pl_module, None)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._show_samples(pl_module, None)  # after an error, too

    def _show_samples(self, pl_module: LightningModule, bar: Any) -> None:
        """Point the model's ``sample_progress`` at ``bar`` (None: at nothing)."""
        if not hasattr(pl_module, "sample_progress"):
            return
        if bar is None or not self.is_enabled:
            pl_module.sample_progress = None
            return
        drawn = -math.inf

        def show(done: int, asked: int) -> None:
            nonlocal drawn
            now = time.monotonic()
            if now - drawn >= self.SAMPLES_REDRAW_SECONDS or done == asked:
                drawn = now
                bar.set_postfix_str(f"importance samples {done:,}/{asked:,}")

        pl_module.sample_progress = show


def closing_lines(trainer: Trainer, subcommand: str, folder: Path) -> list[str]:
    """Where the run went and what it reached: the run folder, the checkpoints (those ``fit``
    wrote, or the one the other subcommands read), the final metrics (per-dimension ones left
    out), and for ``predict`` the file it wrote."""
    lines = [f"run folder: {folder}"]
    checkpoint = trainer.checkpoint_callback
    if subcommand == "fit" and isinstance(checkpoint, ModelCheckpoint):
        if checkpoint.best_model_path:
            lines.append(f"best checkpoint: {checkpoint.best_model_path}")
        if checkpoint.last_model_path:
            lines.append(f"last checkpoint: {checkpoint.last_model_path}")
    elif subcommand != "fit" and trainer.ckpt_path:
        lines.append(f"checkpoint: {trainer.ckpt_path}")
    if subcommand == "predict":
        from vaeflow.callbacks import LATENTS_FILE

        lines.append(f"predictions: {folder / LATENTS_FILE}")
    metrics = {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if not any(part in name for part in ("_dim_", "code_"))
    }
    if metrics:
        lines.append(
            "final metrics: "
            + ", ".join(
                f"{name} {value:.4f}" for name, value in metrics.items() if math.isfinite(value)
            )
        )
    return lines
