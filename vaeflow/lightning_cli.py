"""``vaeflow fit|validate|test|predict``: LightningCLI with vaeflow's defaults, its run folders and
its checkpoints (:mod:`vaeflow.cli` dispatches here; ``vaeflow --help`` and ``vaeflow list``
never import this module, nor Lightning)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from vaeflow import data, models
from vaeflow.callbacks.tracking import config_filename, run_dir, track_config
from vaeflow.checkpointing import (
    LAST,
    model_config,
    read_lightning_checkpoint,
)
from vaeflow.cli import DESCRIPTION, SUBCOMMANDS
from vaeflow.cli_parser import VaeflowArgumentParser
from vaeflow.console import closing_lines, quiet_run
from vaeflow.errors import CheckpointError, ConfigError
from vaeflow.guards import Interrupted, interrupting_signal
from vaeflow.registry import load_plugins
from vaeflow.runs import (
    claim_run_folders,
    empty_run_folders_removed_on_error,
    resolve_last,
    restore_given_versions,
)
from vaeflow.steps_per_call import fitting
from vaeflow.user_errors import check_config_files, check_run_settings, config_files, explain
from vaeflow.utils import as_list

#: The default progress bar (see :meth:`VaeflowCLI.before_instantiate_classes`).
PROGRESS_BAR = "vaeflow.console.ProgressBar"
#: Callbacks every run gets unless its config names one of the same kind: each is cheap, and
#: together they make a run end safely (see :mod:`vaeflow.guards`, :mod:`vaeflow.checkpointing`).
SAFETY_CALLBACKS = (
    "vaeflow.guards.DivergenceGuard",
    "vaeflow.guards.InterruptCheckpoint",
    "vaeflow.checkpointing.RandomState",
    "vaeflow.runs.RunFolderGuard",
)
#: ``--ckpt_path`` values that name no file, which Lightning resolves without vaeflow's checkpoint
#: reader: ``best`` of a fit in the same process (a command has none), ``hpc`` and ``registry``.
CKPT_KEYWORDS = ("best", "hpc", "registry")
#: Where runs go unless ``trainer.default_root_dir`` or a logger says otherwise.
RUNS_DIR = "runs"
#: The models and data modules vaeflow ships, whose options ``vaeflow fit --help`` shows.
SHIPPED_MODELS = (
    models.VAE,
    models.FactorAnalysis,
    models.BayesianFactorAnalysis,
    models.MixtureOfFactorAnalyzers,
)
SHIPPED_DATA = (
    data.DigitsDataModule,
    data.MNISTDataModule,
    data.FashionMNISTDataModule,
    data.CIFAR10DataModule,
    data.ArrayDataModule,
    data.AnnDataModule,
    data.CovarianceDataModule,
    data.SyntheticFADataModule,
)


class SaveConfig(SaveConfigCallback):
    """Lightning's config saver, refusing with a clear message to overwrite an earlier run,
    writing into the run folder whatever the logger (:func:`~vaeflow.callbacks.run_dir`), and
    sending the config to the loggers (:func:`~vaeflow.callbacks.tracking.track_config`)."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.config_filename = config_filename(trainer)
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            path = os.path.join(trainer.log_dir or ".", self.config_filename)
            raise ConfigError(
                f"{path} exists from an earlier run, which is kept as it is. Choose a new "
                "trainer.default_root_dir, or keep a logger (the default), which gives every "
                "run its own version folder"
            ) from error

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        track_config(trainer, self.parser, self.config)


class VaeflowCLI(LightningCLI):
    """LightningCLI with vaeflow's defaults: any model and data module by class path, the data
    module's ``dims`` linked into the model's ``input_shape``, runs kept under ``runs/``."""

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        self._config_files = config_files(argv) if isinstance(argv, list) else []
        parser_kwargs = {
            "prog": "vaeflow",
            "description": DESCRIPTION,
            **{name: {"description": SUBCOMMANDS[name]} for name in self.subcommands()},
            **kwargs.pop("parser_kwargs", {}),
        }
        trainer_defaults = {
            "default_root_dir": RUNS_DIR,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": default_run_name(self._config_files)},
            },
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(
            args=args,
            parser_class=kwargs.pop("parser_class", VaeflowArgumentParser),
            parser_kwargs=parser_kwargs,
            trainer_defaults=trainer_defaults,
            save_config_callback=SaveConfig,
            **kwargs,
        )

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """``vaeflow fit``: Lightning's fit, wrapped by :func:`~vaeflow.steps_per_call.fitting`
        (LightningCLI runs a subcommand by the CLI's method of that name where there is one)."""
        with fitting(model):
            self.trainer.fit(model, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if isinstance(parser, VaeflowArgumentParser):
            parser.add_shipped_classes("model", SHIPPED_MODELS)
            parser.add_shipped_classes("data", SHIPPED_DATA)
        parser.link_arguments("data.dims", "model.init_args.input_shape", apply_on="instantiate")
        # Bits per dimension on the data's original grid. jsonargparse skips the link for a
        # model without ``data_log_scale`` or a data module without ``log_scale``.
        parser.link_arguments(
            "data.log_scale", "model.init_args.data_log_scale", apply_on="instantiate"
        )

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A parser (:class:`~vaeflow.cli_parser.VaeflowArgumentParser`, the CLI's
        ``parser_class``) that raises on a mistake instead of printing its usage (50 lines)
        first: :func:`run` prints the mistake, then a one-line hint."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then settle ``--ckpt_path``: ``last`` is the latest run's ``last.ckpt``; a
        file is checked and read safely, and the model it is used as decided from it and the
        config (:func:`~vaeflow.checkpointing.model_config`), before Lightning reads it."""
        super().parse_arguments(parser, args)
        self._checkpoint_model = self._checkpoint_input_shape = None
        self._given_versions: list[tuple[Namespace, int | str | None]] = []
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        check_run_settings(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == LAST:
            resolved = yaml.safe_load(parser.dump(self.config, skip_none=False, skip_check=True))
            ckpt_path = config.ckpt_path = resolve_last(
                config.trainer, subcommand, resolved[subcommand], self._config_files
            )
        if ckpt_path in CKPT_KEYWORDS:
            raise CheckpointError(
                f"--ckpt_path {ckpt_path}: vaeflow reads checkpoints by their path (checked, and "
                "loaded without running pickled code): give the .ckpt file, e.g. "
                "runs/<name>/version_<n>/checkpoints/last.ckpt, or --ckpt_path last for the "
                "latest run's"
            )
        if ckpt_path is None or ckpt_path == LAST:
            return
        checkpoint = read_lightning_checkpoint(ckpt_path)
        model = config.get("model")
        class_path = model.class_path if model is not None else None
        init_args = model.init_args.as_dict() if model is not None and model.init_args else {}
        class_path, init_args = model_config(checkpoint, Path(ckpt_path), class_path, init_args)
        self.config = parser.parse_object(
            {subcommand: {"model": {"class_path": class_path, "init_args": init_args}}},
            self.config,
        )
        self._checkpoint_model = self.config[subcommand].model.clone()
        self._checkpoint_input_shape = checkpoint.get("hyper_parameters", {}).get("input_shape")

    @override
    def before_instantiate_classes(self) -> None:
        """Add the default callbacks and the atomic checkpoint writer, use the model settled by
        :meth:`parse_arguments` (Lightning has merged the checkpoint's settings over the config
        meanwhile), and claim the run's folder."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("data") is None:
            raise ConfigError(
                "no data: give a data module, e.g. --data DigitsDataModule, or a config with a "
                "data: block (configs/quickstart.yaml has one); vaeflow fit --help lists them"
            )
        trainer = config.trainer
        callbacks = as_list(trainer.callbacks)
        if trainer.enable_progress_bar is not False:
            # Lightning's default (rich) bar does work on every step, about a tenth of a small
            # model's step on the CPU (benchmarks/vae_mnist.py): this one redraws every 25.
            callbacks = with_default(callbacks, ProgressBar, PROGRESS_BAR, refresh_rate=25)
        if trainer.enable_checkpointing is not False:
            # save_last: what --ckpt_path last resumes from
            callbacks = with_default(
                callbacks, ModelCheckpoint, import_path(ModelCheckpoint), save_last=True
            )
        if trainer.enable_model_summary is not False:
            callbacks = with_default(callbacks, ModelSummary, "vaeflow.console.ModelSummary")
        for class_path in SAFETY_CALLBACKS:
            callbacks = with_default(callbacks, import_object(class_path), class_path)
        trainer.callbacks = callbacks
        plugins = as_list(trainer.plugins)
        if not any(is_class_config(p, CheckpointIO) for p in plugins):
            trainer.plugins = [
                *plugins,
                Namespace(class_path="vaeflow.checkpointing.AtomicCheckpointIO"),
            ]
        if self._checkpoint_model is not None:
            config.model = self._checkpoint_model
        if self.subcommand is not None and not trainer.fast_dev_run:
            self._given_versions = claim_run_folders(trainer)

    @override
    def after_instantiate_classes(self) -> None:
        """Refuse a checkpoint of data of another shape than the data module's; take the
        claimed run versions out of the config that the run saves."""
        super().after_instantiate_classes()
        restore_given_versions(self._given_versions)
        expected = self._checkpoint_input_shape
        shape = getattr(self.model, "hparams", {}).get("input_shape")
        if None not in (expected, shape) and tuple(expected) != tuple(shape):
            raise CheckpointError(
                f"the checkpoint's model takes examples of shape {tuple(expected)}, but the "
                f"data module gives examples of shape {tuple(shape)}: use the data the "
                "checkpoint was trained on (config.yaml in its run folder)"
            )


def default_run_name(files: list[Path]) -> str:
    """The logger's ``name`` (its folder under ``runs/``) for a config that names no logger: the
    first config file's stem (``configs/fa_synthetic.yaml`` runs in ``runs/fa_synthetic/``), so
    that configs of different models never share a folder; ``vaeflow`` without a config file."""
    return files[0].stem if files else "vaeflow"


def is_class_config(value: Any, base: type) -> bool:
    """Whether a config entry (a class-path block or an object) is of class ``base``."""
    if isinstance(value, Namespace) and "class_path" in value:
        return issubclass(import_object(value.class_path), base)
    return isinstance(value, base)


def with_default(callbacks: list[Any], base: type, class_path: str, **init_args: Any) -> list[Any]:
    """``callbacks`` plus a ``class_path`` callback, unless one of class ``base`` is there."""
    if any(is_class_config(callback, base) for callback in callbacks):
        return callbacks
    return [*callbacks, Namespace(class_path=class_path, init_args=Namespace(**init_args))]


def import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def run(argv: list[str], *, debug: bool, from_sys_argv: bool) -> None:
    """Run ``vaeflow fit|validate|test|predict`` with ``argv`` (``--debug`` taken out).

    Exit codes: 0 done; 2 a mistake in the input (or a diverged training run), printed without
    a traceback unless ``debug``; 128 + the signal when SIGINT (130) or SIGTERM (143)
    interrupted training, after writing ``last.ckpt``.

    Args:
        argv: the arguments after ``vaeflow``.
        debug: raise a user error with its traceback instead of printing it.
        from_sys_argv: the arguments are ``sys.argv``'s, which LightningCLI then reads itself
            (and DDP relaunches), so ``sys.argv`` is set to ``argv``.
    """
    load_plugins()
    try:
        check_config_files(argv)
        if from_sys_argv:
            sys.argv[1:] = argv
        with empty_run_folders_removed_on_error(), quiet_run():
            cli = VaeflowCLI(args=None if from_sys_argv else argv)
    except Interrupted as stop:
        print(f"vaeflow: {stop.message}", file=sys.stderr)
        sys.exit(stop.code)
    except SIGTERMException:  # Lightning's stop at SIGTERM outside training: nothing to save
        print("vaeflow: interrupted by SIGTERM; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as error:
        message = None if debug else explain(error)
        if message is None:
            raise
        subcommand = next((arg for arg in argv if not arg.startswith("-")), "fit")
        print(
            f"vaeflow: error: {message}\n(vaeflow {subcommand} --help lists the options; "
            "--debug shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)
    stopped = interrupting_signal(cli.trainer) if cli.subcommand else None
    if cli.subcommand and stopped is None:
        folder = run_dir(cli.trainer)  # collective: every process calls it
        if cli.trainer.is_global_zero:
            print("\n".join(closing_lines(cli.trainer, cli.subcommand, folder)))
    end_process_group()
    if stopped is not None:
        print(f"vaeflow: {stopped.name} came as training ended; the run is whole", file=sys.stderr)
        sys.exit(128 + stopped)


def end_process_group() -> None:
    """Close the process group of a multi-process run (``ddp``, torchrun, SLURM) while Python
    still runs: Lightning closes it only for NCCL, and with gloo's left open a finished run
    now and then aborts in interpreter finalisation ("terminate called without an active
    exception", exit 134), which torchrun and SLURM would report as a failed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
