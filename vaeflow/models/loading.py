"""Models loaded from a checkpoint come back ready for inference, from checkpoints of any
earlier vaeflow."""

from __future__ import annotations

import io
import os
from typing import IO, Any

import torch
from lightning.pytorch import LightningModule
from typing_extensions import Self

from vaeflow.checkpointing import read_checkpoint


class ReadyForInference(LightningModule):
    """``load_from_checkpoint`` reads the file as the CLI does
    (:func:`~vaeflow.checkpointing.read_checkpoint`: checked, brought to the current checkpoint
    format) and returns the model in eval mode: what users do next with a loaded model is
    inference (the README's snippet calls ``.numpy()`` on its outputs), and in eval mode the
    models build no autograd graph for it. ``model.train()`` turns training back on; the CLI's
    ``--ckpt_path`` restores a run without this method."""

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike | IO[bytes], *args: Any, **kwargs: Any
    ) -> Self:
        if isinstance(checkpoint_path, str | os.PathLike) and "://" not in str(checkpoint_path):
            buffer = io.BytesIO()
            torch.save(read_checkpoint(checkpoint_path), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs).eval()
