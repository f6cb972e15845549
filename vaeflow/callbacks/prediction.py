"""Writing what ``vaeflow predict`` computes: the latent codes, into the run folder."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from vaeflow.callbacks.tracking import run_dir

#: The file ``vaeflow predict`` writes into the run folder.
LATENTS_FILE = "latents.pt"


class LatentCodeWriter(BasePredictionWriter):
    """Writes the latent codes that ``predict_step`` returns to ``latents.pt`` in the run folder.

    The file holds a dict: ``latents``, one row per example in the order of the predict data
    (by default the data module's test split), plus whatever the model's
    ``prediction_extras()`` adds (e.g. the posterior covariance of factor analysis); a model
    with ``write_prediction_tables(trainer, folder, columns)`` writes its own tables of the
    joined predictions beside it (factor analysis's ``scores.csv``). Under DDP
    each process holds a contiguous share of the examples (see ``TensorLoader``); the shares are
    written apart, then joined in rank order into the one file.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    @override
    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        columns = join_columns(predictions)
        extras = getattr(pl_module, "prediction_extras", dict)()
        tables = getattr(pl_module, "write_prediction_tables", None)
        if trainer.world_size == 1:
            torch.save({**columns, **extras}, folder / LATENTS_FILE)
            if tables is not None:
                tables(trainer, folder, columns)
            return
        share = folder / f"latents_rank{trainer.global_rank}.pt"
        torch.save(columns, share)
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            shares = [folder / f"latents_rank{rank}.pt" for rank in range(trainer.world_size)]
            joined = join_columns([torch.load(path) for path in shares])
            torch.save({**joined, **extras}, folder / LATENTS_FILE)
            if tables is not None:
                tables(trainer, folder, joined)
            for path in shares:
                path.unlink()
        trainer.strategy.barrier()


def join_columns(parts: list[Tensor | dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batches (or shares) of predictions joined row-wise: a tensor is the ``latents`` column;
    a dict (e.g. the VAE's with ``predict_samples``) names its columns."""
    parts = [part if isinstance(part, dict) else {"latents": part} for part in parts]
    return {name: torch.cat([part[name] for part in parts]).cpu() for name in parts[0]}


def prediction_callbacks(trainer: Trainer) -> list[Callback]:
    """The models' own callbacks: the latent-code writer, when predicting only (every callback
    costs a few microseconds at each of a training step's hooks)."""
    return [LatentCodeWriter()] if trainer.state.fn == TrainerFn.PREDICTING else []
