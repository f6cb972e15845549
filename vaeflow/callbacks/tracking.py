"""The run folder, and what the loggers receive besides metrics: the config and the pictures.

Every logger gets the run's resolved config once, as its hyperparameters; Weights & Biases also
gets it as a ``config`` artifact, and the pictures as images (TensorBoard too). CSV keeps the
files in the run folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

#: The resolved config in the run folder (``vaeflow fit --config`` on it repeats the run).
CONFIG_FILE = "config.yaml"
#: Keys whose values never leave the machine (Comet's and Neptune's loggers take an api_key).
SECRET_KEY = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)
REDACTED = "<redacted>"


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder: where ``ModelCheckpoint`` puts ``checkpoints/`` (``save_dir/name/
    version``). For CSV and TensorBoard it is ``trainer.log_dir``; for W&B, whose ``log_dir`` is
    the ``save_dir`` every run shares, it is ``save_dir/<project>/<run id>``. Collective under
    DDP (the folder is broadcast from rank 0): call it on every process."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        folder = os.path.join(
            logger.save_dir or trainer.default_root_dir, str(logger.name), version
        )
    else:
        folder = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(folder))


def config_filename(trainer: Trainer) -> str:
    """The name, relative to ``trainer.log_dir`` (where LightningCLI's config saver writes), that
    puts the config into the run folder, which it creates on rank 0. Collective, as
    :func:`run_dir`. Without it a W&B run would write ``save_dir/config.yaml``, shared by every
    run, and the second run would refuse to overwrite the first one's."""
    folder = run_dir(trainer)
    if trainer.is_global_zero:
        folder.mkdir(parents=True, exist_ok=True)
    return os.path.relpath(folder / CONFIG_FILE, trainer.log_dir)


def redact(value: Any) -> Any:
    """``value`` (a config: namespaces, dicts, lists) with every secret-looking key's value
    replaced by ``<redacted>``."""
    if isinstance(value, Namespace | dict):
        items = vars(value) if isinstance(value, Namespace) else value
        clean = {
            key: REDACTED if SECRET_KEY.search(key) and item is not None else redact(item)
            for key, item in items.items()
        }
        return Namespace(**clean) if isinstance(value, Namespace) else clean
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def track_config(trainer: Trainer, parser: ArgumentParser, config: Namespace) -> None:
    """Send the resolved config to every logger, secrets redacted: as the run's hyperparameters
    (in place of Lightning's, which are the model's init args alone and would repeat part of it)
    and, to W&B, as a ``config`` artifact holding ``config.yaml``. Call on rank 0, before the
    fit starts (LightningCLI's ``SaveConfigCallback.save_config``)."""
    clean = redact(config)
    if trainer.enable_autolog_hparams:
        hyperparameters = json.loads(
            parser.dump(clean, format="json", skip_none=False, skip_check=True)
        )
        hyperparameters.pop("config", None)  # the paths of the --config files, not settings
        for logger in trainer.loggers:
            logger.log_hyperparams(hyperparameters)
        trainer.enable_autolog_hparams = False  # logged: Lightning's own would duplicate them
    wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if wandb_loggers:
        import wandb

        text = parser.dump(clean, skip_none=False, skip_check=True)
        for logger in wandb_loggers:
            artifact = wandb.Artifact(f"config-{logger.version}", type="config")
            with artifact.new_file(CONFIG_FILE) as file:
                file.write(text)
            logger.experiment.log_artifact(artifact)


def log_image(trainer: Trainer, key: str, image: Tensor, path: Path) -> None:
    """Send a picture to every logger that shows images, at the trainer's global step: W&B gets
    the PNG file at ``path``, TensorBoard the ``(3, H, W)`` image with values in [0, 1]. Other
    loggers (CSV) keep only the file."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=trainer.global_step)
