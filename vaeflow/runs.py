"""Run folders: every run claims a version folder of its own, and earlier runs stay untouched.

Lightning's CSV and TensorBoard loggers pick ``version_<n>`` as one more than the highest folder
present and create it later, when they first write: two runs started together get the same
folder, and a run pointed at an existing version deletes that run's ``metrics.csv``. Here the
folder is claimed with ``mkdir`` (atomic: of two runs, one creates it and the other moves on to
the next number) before any logger exists, and the logger is given that version.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from vaeflow.callbacks.tracking import CONFIG_FILE, run_dir
from vaeflow.checkpointing import LAST, RUN_SETTINGS
from vaeflow.errors import ConfigError, RunFolderError
from vaeflow.utils import as_list, causes

#: Loggers whose runs live in ``<save_dir>/<name>/version_<n>``.
VERSIONED = (CSVLogger, TensorBoardLogger)
#: The run folders this process created, so that a run refused before writing anything leaves
#: no empty folder behind (:func:`empty_run_folders_removed_on_error`).
CREATED: list[Path] = []
#: The version folders this process claimed, so that a write that fails because one was
#: deleted during the run says so (:func:`empty_run_folders_removed_on_error`).
CLAIMED: list[Path] = []
#: What a run writes before it starts: a folder holding only these is removed when the run is
#: refused or crashes (:func:`empty_run_folders_removed_on_error`).
SETTINGS_FILES = frozenset({CONFIG_FILE, "hparams.yaml"})
#: The versions the first process claimed, for the processes Lightning launches for the other
#: ranks (they inherit its environment and must log to the same folders).
VERSIONS_VARIABLE = "VAEFLOW_RUN_VERSIONS"


def versioned_loggers(trainer: Namespace) -> list[Namespace]:
    """The trainer config's loggers that keep runs in version folders."""
    return [
        logger
        for logger in as_list(trainer.logger)
        if isinstance(logger, Namespace)
        and "class_path" in logger
        and issubclass(import_object(logger.class_path), VERSIONED)
    ]


def run_root(logger: Namespace) -> Path:
    """``<save_dir>/<name>``, the folder of a logger's version folders."""
    return Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "")


def claim_run_folders(trainer: Namespace) -> list[tuple[Namespace, int | str | None]]:
    """Give each versioned logger of the trainer config a version folder no other run has.

    Returns:
        each logger's config with the version the user gave (None: the next free one), for
        :func:`restore_given_versions` once the loggers exist.

    Raises:
        ConfigError: a version the config names holds an earlier run.
    """
    check_folder_settings(trainer)
    loggers = versioned_loggers(trainer)
    given = [(logger, logger.init_args.get("version")) for logger in loggers]
    if rank_zero_only.rank != 0:  # a process Lightning launched: the first one has claimed
        versions = json.loads(os.environ.get(VERSIONS_VARIABLE, "[]"))
        for logger, version in zip(loggers, versions, strict=False):
            logger.init_args.version = version
        return given
    for logger in loggers:
        root, version = run_root(logger), logger.init_args.get("version")
        try:
            logger.init_args.version = claim(root, version)
            check_writable(version_folder(root, logger.init_args.version))
        except OSError as error:
            raise unusable_folder(Path(error.filename or root), error, LOGGER_FOLDER) from error
        remove_stale_temporaries(root)
    root = trainer.get("default_root_dir")
    if not loggers and root and "://" not in str(root):  # the run's folder itself
        try:
            prepare(Path(root))
        except OSError as error:
            raise unusable_folder(Path(error.filename or root), error, ROOT_FOLDER) from error
    os.environ[VERSIONS_VARIABLE] = json.dumps([logger.init_args.version for logger in loggers])
    return given


def check_folder_settings(trainer: Namespace) -> None:
    """Refuse a logger ``version`` that is a path (``new/../version_0`` walks out of the run's
    folder) and a ``default_root_dir`` that exists as something else than a folder.

    Raises:
        ConfigError: the setting and what to give instead.
    """
    for logger in versioned_loggers(trainer):
        version = logger.init_args.get("version")
        if isinstance(version, str) and (Path(version).name != version or version in ("", "..")):
            raise ConfigError(
                f"trainer.logger.init_args.version={version!r} is a path: a version is the name "
                "of one folder under <save_dir>/<name>, e.g. version_3 or baseline; leave it "
                "unset for the next free version_<n>"
            )
    root = trainer.get("default_root_dir")
    if root and "://" not in str(root) and Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(
            f"trainer.default_root_dir {Path(root).resolve()} is a file, not a folder: choose "
            "another folder for the run's files (or move the file away)"
        )


#: The settings that choose where a run's files go, as :func:`unusable_folder` names them.
LOGGER_FOLDER = (
    "trainer.logger.init_args.save_dir or name (runs go to <save_dir>/<name>/version_<n>)"
)
ROOT_FOLDER = "trainer.default_root_dir"
#: What the system says when a folder cannot be written, whoever owns it.
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def unusable_folder(path: Path, error: OSError, setting: str) -> ConfigError:
    """The message for a run folder that cannot be created or written at ``path``: what is in
    the way, and the ``setting`` that chooses another folder."""
    fix = "make that path a writable folder"
    if error.errno == errno.ENAMETOOLONG:
        why = "a folder name in it is longer than the file system allows (255 bytes)"
    elif error.errno in NOT_WRITABLE:
        why = f"{error.strerror}: this user cannot write there"
        fix = "make it writable (its permissions, or a file system mounted read-only)"
    else:
        blocking = next((p for p in (path, *path.parents) if p.is_symlink() or p.is_file()), None)
        if blocking is not None and not blocking.exists():
            why = f"{blocking} is a link to {os.readlink(blocking)}, which does not exist"
        elif blocking is not None:
            why = f"{blocking} is a file, not a folder"
        else:
            why = error.strerror or str(error)
    return ConfigError(
        f"cannot write the run's files in {str(path)[:200]}: {why}. Choose another {setting}, "
        f"or {fix}"
    )


def check_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``, so that a folder the run cannot write is found
    before training, not at the first checkpoint an epoch later. Permissions cannot tell: root
    passes them, and a file system mounted read-only refuses every user.

    Raises:
        OSError: the system's refusal.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=".vaeflow-write-test.", dir=folder)
    except OSError as error:  # named by the folder, not by the probe's random name
        raise type(error)(error.errno, error.strerror, str(folder)) from error
    os.close(handle)
    os.unlink(name)


def prepare(folder: Path) -> None:
    """Create ``folder`` (recording in CREATED the folders made) and check it is writable."""
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    CREATED.extend(reversed(missing))
    check_writable(folder)


def restore_given_versions(given: list[tuple[Namespace, int | str | None]]) -> None:
    """Put the versions the user gave back into the logger configs, once the loggers hold the
    claimed ones: the run's ``config.yaml`` then names no version, so ``vaeflow test`` or
    ``fit`` on it gets a folder of its own instead of being refused as this run's."""
    for logger, version in given:
        logger.init_args.version = version


def claim(root: Path, version: int | str | None) -> int | str:
    """Create the run folder ``root/version_<version>`` (the next free number when None)."""
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    root.mkdir(parents=True, exist_ok=True)
    CREATED.extend(reversed(missing))
    if version is not None:
        folder = version_folder(root, version)
        try:
            create(folder)
        except FileExistsError:
            if any(folder.iterdir()):
                last = folder.resolve() / "checkpoints" / f"{LAST}.ckpt"
                raise ConfigError(
                    f"{folder.resolve()} holds an earlier run, which is kept as it is. Leave "
                    "trainer.logger.init_args.version unset to get a new version_<n> folder, or "
                    "choose an unused version. To continue that run, give --ckpt_path "
                    f"{last} (the continued run gets a folder of its own)"
                ) from None
        return version
    numbers = [
        int(entry.name.removeprefix("version_"))
        for entry in root.iterdir()
        if entry.name.removeprefix("version_").isdigit() and entry.name.startswith("version_")
    ]
    number = max(numbers, default=-1) + 1
    while True:
        try:
            create(version_folder(root, number))
            return number
        except FileExistsError:  # another run took it in the meantime
            number += 1


def version_folder(root: Path, version: int | str) -> Path:
    """``root/version_<n>`` for a number, ``root/<version>`` for a name."""
    return root / (version if isinstance(version, str) else f"version_{version}")


def create(folder: Path) -> None:
    """``mkdir`` (atomic: raises FileExistsError if another run has it), recorded in CREATED
    and CLAIMED."""
    folder.mkdir()
    CREATED.append(folder)
    CLAIMED.append(folder)


@contextmanager
def empty_run_folders_removed_on_error() -> Iterator[None]:
    """Around a run: if it raises (a refusal, a crash, an interruption), remove the run folder it
    claimed if it holds nothing of a run (:func:`holds_nothing`), and the parents it created if
    they are empty, so that a run refused before it trained (a bad option, data file or
    checkpoint) leaves none. Any other file keeps its folder: nothing a run produced is ever
    lost. A write that failed because the claimed folder was deleted during the run becomes a
    :class:`~vaeflow.errors.RunFolderError` saying so."""
    CREATED.clear()
    CLAIMED.clear()
    try:
        yield
    except Exception as error:
        gone = next((folder for folder in CLAIMED if not folder.is_dir()), None)
        failed = next((cause for cause in causes(error) if isinstance(cause, OSError)), None)
        remove_empty_run_folders()
        if gone is not None and failed is not None and not isinstance(error, RunFolderError):
            raise vanished(gone, f"writing {failed.filename or 'a file'} failed") from error
        raise
    except BaseException:
        remove_empty_run_folders()
        raise
    finally:
        CREATED.clear()
        CLAIMED.clear()


def remove_empty_run_folders() -> None:
    """Remove the folders in CREATED that hold nothing of a run (see
    :func:`empty_run_folders_removed_on_error`)."""
    for folder in reversed(CREATED):
        with suppress(OSError):  # holds files, or is gone
            if folder.name.startswith("version_") and holds_nothing(folder):
                shutil.rmtree(folder)  # a run folder of this run's own
            else:
                folder.rmdir()  # a parent, which other runs may be using


def vanished(folder: Path, noticed: str) -> RunFolderError:
    """The message for a run folder deleted while the run was going (``noticed``: how)."""
    last = folder / "checkpoints" / f"{LAST}.ckpt"
    return RunFolderError(
        f"the run folder {folder} was deleted while the run was going ({noticed}), so the run "
        "stopped: writing on would leave a folder without the run's config and earlier "
        "metrics, which --ckpt_path last could not continue. Start the run again (it gets a "
        f"new folder); if the folder was moved rather than deleted, move it back and continue "
        f"with --ckpt_path {last}"
    )


class RunFolderGuard(Callback):
    """Stops a fit whose run folder was deleted while it was going, before it writes a
    checkpoint: the checkpoint writer creates the folders it writes into, so the run would go
    on into a new folder of the same name, holding later checkpoints without the run's config
    and earlier metrics (and exit 0)."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)  # collective: every process calls it
        self.folder = folder if trainer.is_global_zero else None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The folder is watched once it exists (a W&B run's is created in setup)."""
        if self.folder is not None and not self.folder.is_dir():
            self.folder = None

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.folder is not None and not self.folder.is_dir():
            raise vanished(
                self.folder,
                f"found gone at epoch {trainer.current_epoch}, step {trainer.global_step}, "
                "before a checkpoint was written",
            )


def holds_nothing(folder: Path) -> bool:
    """Whether ``folder`` holds no file but the config and hyperparameters a run writes before
    it starts (:data:`SETTINGS_FILES`), in any depth of folders."""
    return all(
        (path.is_dir() and not path.is_symlink()) or path.name in SETTINGS_FILES
        for path in folder.rglob("*")
    )


def remove_stale_temporaries(root: Path) -> None:
    """Remove the temporary checkpoint files (``.<name>.<pid>.tmp``, see
    :class:`~vaeflow.checkpointing.AtomicCheckpointIO`) that runs under ``root`` killed while
    saving left behind: those whose process is gone. A live run's file is left alone."""
    for path in root.glob("version_*/checkpoints/.*.tmp"):
        pid = path.name.removesuffix(".tmp").rpartition(".")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            with suppress(OSError):
                path.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def resolve_last(
    trainer: Namespace, subcommand: str, config: dict[str, Any], config_files: list[Path]
) -> str | None:
    """What ``--ckpt_path last`` means: the ``last.ckpt`` of the run the user means, said on
    stderr; None (start afresh) when ``fit`` finds none.

    - A run's own ``config.yaml`` given with ``--config`` names its run: that run.
    - Otherwise, the latest run under the logger's folder (``<save_dir>/<name>/version_<n>``)
      that trained the same model on the same data as ``config`` (:func:`trained_alike`).

    Lightning would look only in the new run's own folder, which is empty.

    Args:
        trainer: the command's trainer config.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the command's resolved config as plain values (``model``, ``data``, ...).
        config_files: the ``--config`` files, in the order given.

    Raises:
        ConfigError: ``validate``/``test``/``predict`` with no last checkpoint to evaluate.
    """
    run = next((folder for folder in map(run_of_config, reversed(config_files)) if folder), None)
    if run is not None:
        last = run / "checkpoints" / f"{LAST}.ckpt"
        if last.is_file():
            print(
                f"vaeflow: --ckpt_path last: continuing {run} (the run of {run / CONFIG_FILE})",
                file=sys.stderr,
            )
            return str(last)
        return afresh(subcommand, f"{run} has no {last.relative_to(run)} yet")
    loggers = versioned_loggers(trainer)
    if not loggers:
        return LAST  # no version folders: Lightning looks in default_root_dir/checkpoints
    root = run_root(loggers[0])
    runs = runs_with_last_checkpoint(root)
    for folder, saved in runs:
        if not differences(saved, config):
            print(
                f"vaeflow: --ckpt_path last: continuing {folder}, the latest run under {root} "
                "that trained this model on this data",
                file=sys.stderr,
            )
            return str(folder / "checkpoints" / f"{LAST}.ckpt")
    if not runs:
        return afresh(subcommand, f"no {root / 'version_*' / 'checkpoints' / f'{LAST}.ckpt'}")
    latest, saved = runs[0]
    return afresh(
        subcommand,
        f"no run under {root} trained this model on this data (the latest, {latest.name}, "
        f"differs in {', '.join(differences(saved, config)[:3])})",
        f"To continue {latest.name}, give its own config: --config {latest / CONFIG_FILE} "
        "--ckpt_path last",
    )


def afresh(subcommand: str, why: str, fix: str = "") -> None:
    """``fit`` starts afresh (a job script may pass ``--ckpt_path last`` from its first start);
    the other commands have nothing to evaluate."""
    if subcommand != "fit":
        raise ConfigError(f"--ckpt_path last: {why}. {fix or 'Give a checkpoint path'}")
    print(f"vaeflow: --ckpt_path last: {why}, so training starts afresh. {fix}", file=sys.stderr)


def run_of_config(path: Path) -> Path | None:
    """The run folder whose ``config.yaml`` ``path`` is (it has a ``checkpoints`` folder beside
    it), or None for any other config file."""
    path = Path(path)
    folder = path.parent
    return folder if path.name == CONFIG_FILE and (folder / "checkpoints").is_dir() else None


def runs_with_last_checkpoint(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The runs under ``root`` with a ``last.ckpt`` and a readable ``config.yaml``, each with
    its config, the latest (highest version) first."""
    found = []
    for last in root.glob(f"version_*/checkpoints/{LAST}.ckpt"):
        folder = last.parents[1]
        number = folder.name.removeprefix("version_")
        with suppress(OSError, yaml.YAMLError):
            saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
            if number.isdigit() and isinstance(saved, dict):
                found.append((int(number), folder, saved))
    return [(folder, saved) for _, folder, saved in sorted(found, key=lambda f: -f[0])]


def differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Where a run's saved config trained another model or data than ``config``: the dotted
    keys, with both values, of the ``model`` and ``data`` sections that differ, leaving out the
    model's run settings (:data:`~vaeflow.checkpointing.RUN_SETTINGS`, which a resumed run may
    change) and values the data module fills in (None in one of them)."""
    found = []
    for section in ("model", "data"):
        ours, theirs = flat(config.get(section), section), flat(saved.get(section), section)
        for key in sorted(ours.keys() | theirs.keys()):
            mine, other = ours.get(key), theirs.get(key)
            if mine is None or other is None or mine == other:
                continue
            if key.startswith("model.init_args.") and key.split(".")[2] in RUN_SETTINGS:
                continue
            found.append(f"{key} ({other!r} there, {mine!r} here)")
    return found


def flat(value: Any, prefix: str) -> dict[str, Any]:
    """A nested config section as ``{dotted key: value}``."""
    if isinstance(value, dict) and value:
        return {
            key: item
            for name, inner in value.items()
            for key, item in flat(inner, f"{prefix}.{name}").items()
        }
    return {prefix: value}
