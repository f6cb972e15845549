"""The command-line overrides the VAE benchmarks share: a fit that trains and times only.

Benchmarks run as scripts (``python benchmarks/x.py``), so this folder is on ``sys.path``.
"""

from __future__ import annotations

import tempfile


def quiet_fit_overrides(prefix: str, *, validate: bool = True) -> list[str]:
    """No logger, checkpoints, progress bar or model summary (and no validation or callbacks
    unless ``validate``), in a fresh folder per run: the CLI keeps each run's config and never
    overwrites one."""
    skip_validation = (
        [] if validate else ["--trainer.limit_val_batches=0", "--trainer.callbacks=[]"]
    )
    return [
        *skip_validation,
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tempfile.mkdtemp(prefix=prefix)}",
    ]
