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
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from vaeflow.checkpointing import LAST, latest_last_checkpoint
from vaeflow.errors import ConfigError
from vaeflow.utils import as_list

#: Loggers whose runs live in ``<save_dir>/<name>/version_<n>``.
VERSIONED = (CSVLogger, TensorBoardLogger)
#: The run folders this process created, so that a run refused before writing anything leaves
#: no empty folder behind (:func:`empty_run_folders_removed_on_error`).
CREATED: list[Path] = []
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
        except OSError as error:
            raise unusable_folder(Path(error.filename or root), error) from error
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


def unusable_folder(path: Path, error: OSError) -> ConfigError:
    """The message for a run folder that cannot be created at ``path``: what is in the way."""
    if error.errno == errno.ENAMETOOLONG:
        why = "a folder name in it is longer than the file system allows (255 bytes)"
    else:
        blocking = next((p for p in (path, *path.parents) if p.is_symlink() or p.is_file()), None)
        if blocking is not None and not blocking.exists():
            why = f"{blocking} is a link to {os.readlink(blocking)}, which does not exist"
        elif blocking is not None:
            why = f"{blocking} is a file, not a folder"
        else:
            why = error.strerror or str(error)
    return ConfigError(
        f"cannot create the run folder {str(path)[:200]}: {why}. Choose another "
        "trainer.logger.init_args.save_dir or name (runs go to <save_dir>/<name>/version_<n>), "
        "or make that path a writable folder"
    )


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
        folder = root / (version if isinstance(version, str) else f"version_{version}")
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
            create(root / f"version_{number}")
            return number
        except FileExistsError:  # another run took it in the meantime
            number += 1


def create(folder: Path) -> None:
    """``mkdir`` (atomic: raises FileExistsError if another run has it), recorded in CREATED."""
    folder.mkdir()
    CREATED.append(folder)


@contextmanager
def empty_run_folders_removed_on_error() -> Iterator[None]:
    """Around a run: if it raises, remove the run folders it created that are still empty, so
    that a run refused before it wrote anything (a bad option, data file or checkpoint) leaves
    none. ``rmdir`` removes only an empty folder: nothing written is ever lost."""
    CREATED.clear()
    try:
        yield
    except BaseException:
        for folder in reversed(CREATED):
            with suppress(OSError):  # holds the run's files, or is gone
                folder.rmdir()
        raise
    finally:
        CREATED.clear()


def resolve_last(trainer: Namespace, subcommand: str) -> str | None:
    """What ``--ckpt_path last`` means: the ``last.ckpt`` of the latest run of the config's
    logger (``<save_dir>/<name>/version_<n>``), or None (start afresh) when no run has one.

    Lightning would look only in the new run's own folder, which is empty.

    Raises:
        ConfigError: ``validate``/``test``/``predict`` with no last checkpoint to evaluate.
    """
    loggers = versioned_loggers(trainer)
    if not loggers:
        return LAST  # no version folders: Lightning looks in default_root_dir/checkpoints
    root = run_root(loggers[0])
    found = latest_last_checkpoint(root)
    if found is not None:
        return str(found)
    where = root / "version_*" / "checkpoints" / f"{LAST}.ckpt"
    if subcommand != "fit":
        raise ConfigError(f"--ckpt_path last: no checkpoint {where}; give a checkpoint's path")
    print(f"vaeflow: --ckpt_path last: no {where} yet, so training starts afresh", file=sys.stderr)
    return None
