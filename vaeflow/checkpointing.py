"""Checkpoints that survive crashes, load safely, and agree with the config they are used under.

- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its target, syncs
  it and renames it into place, so a crash while saving leaves the previous file whole.
- :func:`read_checkpoint` loads a checkpoint with ``weights_only`` (no pickled code runs) and
  turns every way a file can be wrong into a :class:`CheckpointError` that says what to do.
- :func:`model_config` decides the model a checkpoint is evaluated or resumed as: the
  checkpoint's architecture, the command's run settings (``eval_samples``, the optimiser, ...).
- :class:`RandomState` stores the global random generators in every checkpoint, so that a resumed
  run draws the noise an uninterrupted one would.
"""

from __future__ import annotations

import inspect
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import import_object
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from vaeflow.errors import CheckpointError

#: The file name (without ``.ckpt``) of the checkpoint ``--ckpt_path last`` resumes from.
LAST = "last"

#: Init args that say how a model is trained or evaluated, not what its trained parameters
#: mean: under ``--ckpt_path`` the command's config sets them, whatever the checkpoint holds.
#: Every other init arg is the checkpoint's, and a config that contradicts it is refused.
RUN_SETTINGS = frozenset(
    {
        # VAE
        "eval_samples",
        "num_samples",
        "estimator",
        "beta",
        "kl_warmup_steps",
        "free_bits",
        "dreg",
        "optimizer",
        "lr_scheduler",
        "training",
        "gradient_clip_val",
        "steps_per_call",
        "predict_condition",
        # FactorAnalysis
        "method",
        "moments_max_dim",
        "max_iter",
        "tol",
        "accelerate",
    }
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written so that a crash never leaves half a file.

    Lightning's own writer stages the bytes in the system's temporary folder and moves them; when
    that folder is on another file system (the usual case for ``/tmp``) the move is a copy, which a
    crash can cut short. Here the temporary file sits beside the target (same file system), is
    synced to disk, and replaces the target with ``os.replace``, which is atomic.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote: Lightning's writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU with ``weights_only`` (no pickled code runs).

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, or holds
            pickled objects that only arbitrary code could rebuild.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path.resolve()}. Give the path of a .ckpt file (runs keep "
            "theirs in <save_dir>/<name>/version_<n>/checkpoints/), or --ckpt_path last for the "
            "latest run's last.ckpt"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): the run that wrote it was probably stopped "
            "while saving. Use another checkpoint of that run, e.g. its last.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle of objects: bytes of something else
            raise unreadable(path, error) from error
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects ({found.group(1)}) that only "
            "running their code could rebuild, so vaeflow does not load it (weights_only "
            "loading). If you trust the file, load it in Python with "
            "torch.load(path, weights_only=False) and save a checkpoint of plain tensors and "
            "values (a vaeflow run writes such checkpoints)"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise unreadable(path, error) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__} "
            "without a 'state_dict'): give a .ckpt file written by vaeflow fit"
        )
    return checkpoint


def unreadable(path: Path, error: BaseException) -> CheckpointError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(
        f"checkpoint {path} cannot be read ({first_line}): it is truncated, corrupt, or not a "
        "PyTorch checkpoint. Use another checkpoint of the run, e.g. its last.ckpt"
    )


def latest_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """``last.ckpt`` of the highest-numbered ``version_<n>`` run under ``root`` that has one."""
    found = []
    for candidate in Path(root).glob(f"version_*/checkpoints/{LAST}.ckpt"):
        number = candidate.parent.parent.name.removeprefix("version_")
        if number.isdigit():
            found.append((int(number), candidate))
    return max(found)[1] if found else None


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and namespaces as dicts, for comparing config values."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def model_config(
    checkpoint: dict[str, Any], path: Path, class_path: str | None, init_args: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The model (class path, init args) that a checkpoint is evaluated or resumed as.

    The checkpoint decides the class and what its parameters mean (sizes, families, networks);
    the command's config decides the :data:`RUN_SETTINGS`. A config value that is neither None,
    the class's default nor the checkpoint's value contradicts the checkpoint and is refused.

    Args:
        checkpoint: the loaded checkpoint.
        path: where it came from (for messages).
        class_path: the config's model class, or None when the config names none.
        init_args: the config's init args of the model.

    Raises:
        CheckpointError: another model class, or a setting that contradicts the checkpoint.
    """
    saved = {
        key: value
        for key, value in checkpoint.get("hyper_parameters", {}).items()
        if key != "_instantiator"
    }
    saved_class = saved.pop("_class_path", None) or class_path
    if class_path is not None and saved_class != class_path:
        raise CheckpointError(
            f"{path} is a checkpoint of {saved_class}, but the config's model is {class_path}. "
            "Use the config the checkpoint was trained with (config.yaml in its run folder), or "
            f"--model {saved_class}"
        )
    if saved_class is None:
        raise CheckpointError(f"{path} does not say which model it holds: name it with --model")
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(import_object(saved_class)).parameters.items()
    }
    merged, conflicts = dict(saved), []
    for name, value in init_args.items():
        if name in RUN_SETTINGS or name not in saved:
            merged[name] = value
        elif value is None:  # not given (e.g. input_shape, which the data module supplies)
            continue
        elif plain(value) not in (
            plain(saved[name]),
            plain(defaults.get(name, inspect.Parameter.empty)),
        ):
            conflicts.append(f"{name}: {plain(value)!r} (checkpoint: {plain(saved[name])!r})")
    if conflicts:
        raise CheckpointError(
            f"the config contradicts checkpoint {path}, whose model was trained with other "
            f"settings: {'; '.join(conflicts)}. Use the config the checkpoint was trained with "
            "(config.yaml in its run folder) or drop these settings; only run settings "
            f"({', '.join(sorted(RUN_SETTINGS & set(defaults)))}) may differ from a checkpoint's"
        )
    return saved_class, merged


class RandomState(Callback):
    """Keeps the global random generators (Python, torch, CUDA) in every checkpoint and restores
    them on resume: the VAE's reparameterisation noise comes from torch's global generator, so a
    resumed run then draws what an uninterrupted one would from the checkpoint on."""

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
