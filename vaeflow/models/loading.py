"""Models loaded from a checkpoint come back ready for inference, from checkpoints of any
earlier vaeflow."""

from __future__ import annotations

import io
import os
from typing import IO, Any

import torch
from lightning.pytorch import LightningModule
from typing_extensions import Self, override

from vaeflow.checkpointing import check_state_dict, read_lightning_checkpoint


class ReadyForInference(LightningModule):
    """``load_from_checkpoint`` reads the file with vaeflow's checkpoint reader (the messages of
    ``vaeflow test --ckpt_path``: missing, empty, truncated, foreign, unsafe or diverged files)
    and returns the model in eval mode: what users do next with a loaded model is inference (the
    README's snippet calls ``.numpy()`` on its outputs), and in eval mode the models build no
    autograd graph for it. ``model.train()`` turns training back on; the CLI's ``--ckpt_path``
    restores a run without this method."""

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike | IO[bytes], *args: Any, **kwargs: Any
    ) -> Self:
        if isinstance(checkpoint_path, str | os.PathLike) and "://" not in str(checkpoint_path):
            checkpoint = read_lightning_checkpoint(checkpoint_path)  # checked and migrated
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs).eval()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights that do not fit this model before Lightning loads them (its error
        lists tensors without saying what to do)."""
        if self.strict_loading:
            check_state_dict(checkpoint["state_dict"], self)
