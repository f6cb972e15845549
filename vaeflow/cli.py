"""The ``vaeflow`` command: LightningCLI's fit/validate/test/predict, plus ``vaeflow list``."""

from __future__ import annotations

import os
import sys

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from vaeflow.errors import ConfigError, VaeflowError
from vaeflow.registry import LIKELIHOODS, PRIORS, load_plugins

#: The default progress bar (see :meth:`VaeflowCLI.before_instantiate_classes`).
PROGRESS_BAR = "lightning.pytorch.callbacks.TQDMProgressBar"
#: Where runs go unless ``trainer.default_root_dir`` or a logger says otherwise.
RUNS_DIR = "runs"


class SaveConfig(SaveConfigCallback):
    """Lightning's config saver, refusing with a clear message to overwrite an earlier run."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            path = os.path.join(trainer.log_dir or ".", self.config_filename)
            raise ConfigError(
                f"{path} exists from an earlier run, which is kept as it is. Choose a new "
                "trainer.default_root_dir, or keep a logger (the default), which gives every "
                "run its own version folder"
            ) from error


class VaeflowCLI(LightningCLI):
    """LightningCLI with vaeflow's defaults: any model and data module by class path, the data
    module's ``dims`` linked into the model's ``input_shape``, runs kept under ``runs/``."""

    def __init__(self, args: ArgsType = None, **kwargs) -> None:
        trainer_defaults = {
            "default_root_dir": RUNS_DIR,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": "vaeflow"},
            },
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(
            args=args,
            trainer_defaults=trainer_defaults,
            save_config_callback=SaveConfig,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.dims", "model.init_args.input_shape", apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        """Give the trainer a progress bar that redraws every few steps, unless the config names
        one or turns the bar off: Lightning's default (rich) bar does work on every step, about
        a tenth of a small model's step on the CPU (benchmarks/vae_mnist.py)."""
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        if trainer.enable_progress_bar is False:
            return
        callbacks = trainer.callbacks or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if not any(issubclass(import_object(c.class_path), ProgressBar) for c in callbacks):
            bar = Namespace(class_path=PROGRESS_BAR, init_args=Namespace(refresh_rate=25))
            trainer.callbacks = [*callbacks, bar]


def print_registries() -> None:
    """``vaeflow list``: every registered likelihood and prior, built-in or from plugins."""
    failed = load_plugins()
    console = Console()
    for registry in (LIKELIHOODS, PRIORS):
        table = Table(title=f"{registry.kind}s ({registry.group})", title_justify="left")
        for column in ("name", "class", "description"):
            table.add_column(column)
        for row in registry.describe():
            table.add_row(*row)
        console.print(table)
    for name, error in failed.items():
        console.print(f"[red]plugin {name!r} failed to load:[/red] {error}")


def main(args: ArgsType = None) -> None:
    """Entry point of the console script and of ``python -m vaeflow``."""
    argv = sys.argv[1:] if args is None else args
    if list(argv[:1]) == ["list"]:
        print_registries()
        return
    load_plugins()
    try:
        VaeflowCLI(args=args)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"vaeflow: error: {cause}", file=sys.stderr)
        sys.exit(2)


def user_error(error: BaseException | None) -> VaeflowError | None:
    """The :class:`VaeflowError` behind ``error``, which jsonargparse or Lightning may wrap."""
    while error is not None and not isinstance(error, VaeflowError):
        error = error.__cause__ or error.__context__
    return error
