"""What the pictures cost: their share of the training time of a shipped config, in one run.

    python benchmarks/pictures.py configs/quickstart.yaml [--keep FOLDER] [more fit arguments]

Runs ``vaeflow fit`` on the config (with its ``Pictures`` callback) in this process and prints
the seconds the callback spent drawing, saving and logging (``Pictures.seconds``, timed around
every drawing) against the seconds of the training epochs (from each epoch's start to its end,
validation included). Both come from the same run, so the machine's load changes both alike.
The run goes to a temporary folder, or to FOLDER with ``--keep``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from vaeflow.callbacks import Pictures
from vaeflow.cli import VaeflowCLI
from vaeflow.registry import load_plugins


class EpochClock(Callback):
    """Seconds of every training epoch, validation included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main(config: str, *args: str) -> None:
    load_plugins()
    clock = EpochClock()
    keep = args[1] if args[:1] == ("--keep",) else None
    args = args[2:] if keep else args
    with tempfile.TemporaryDirectory() as temporary:
        folder = keep or temporary
        cli = VaeflowCLI(
            args=[
                "--config",
                str(Path(config).resolve()),
                *args,
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                folder,
                "--trainer.logger.init_args.save_dir",
                folder,
            ],
            run=False,
        )
        cli.trainer.callbacks.append(clock)
        cli.fit(cli.model, datamodule=cli.datamodule)
    [pictures] = [c for c in cli.trainer.callbacks if isinstance(c, Pictures)]
    training = sum(clock.seconds)
    print(
        f"{config}: {len(clock.seconds)} epochs, {training:.2f} s of training epochs "
        f"({training / len(clock.seconds) * 1e3:.0f} ms each); pictures {pictures.seconds:.3f} s "
        f"= {pictures.seconds / training:.2%} of the training time"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
