"""Models loaded from a checkpoint come back ready for inference."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from typing_extensions import Self


class ReadyForInference(LightningModule):
    """``load_from_checkpoint`` returns the model in eval mode: what users do next with a
    loaded model is inference (the README's snippet calls ``.numpy()`` on its outputs), and
    in eval mode the models build no autograd graph for it. ``model.train()`` turns training
    back on; the CLI's ``--ckpt_path`` restores a run without this method."""

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Self:  # type: ignore[override]
        return super().load_from_checkpoint(*args, **kwargs).eval()
