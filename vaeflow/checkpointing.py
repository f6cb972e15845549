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
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import import_object
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

from vaeflow.errors import CheckpointError

#: The file name (without ``.ckpt``) of the checkpoint ``--ckpt_path last`` resumes from.
LAST = "last"
#: The key holding the Lightning version that wrote a checkpoint, which Lightning needs to read it.
LIGHTNING_VERSION = "pytorch-lightning_version"
#: The layout of vaeflow's checkpoints, stored in each under :data:`FORMAT_KEY`. A change of
#: layout raises it and adds the step from the previous one to :data:`MIGRATIONS`, tested on the
#: checkpoints of every earlier release kept in ``tests/data/checkpoints/``.
FORMAT = 1
FORMAT_KEY = "vaeflow_format"

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
        checkpoint[FORMAT_KEY] = FORMAT
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
        except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as either
            kept = f"the previous {path} is kept whole" if path.exists() else "none was written"
            raise CheckpointError(
                f"could not write checkpoint {path} ({describe_write_error(error)}), so the run "
                f"stopped; {kept}. Free disk space (or choose another trainer.default_root_dir "
                "or logger save_dir), then continue with --ckpt_path last"
            ) from error
        finally:
            temporary.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)

    @override
    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A local checkpoint through :func:`read_checkpoint` (safe, checked, migrated)."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path)


def describe_write_error(error: BaseException) -> str:
    """What went wrong in a write: the system's words for an ``OSError`` (``No space left on
    device``), the first line of anything else."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU with ``weights_only`` (no pickled code runs)
    and brought to the current :data:`FORMAT` (:func:`migrate`).

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, or holds
            pickled objects that only arbitrary code could rebuild.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder: give the path of a .ckpt file in it, e.g. "
            f"{path / LAST}.ckpt"
        )
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
    except Exception as error:  # any bytes: torch's unpickler raises many types
        unsafe = unsafe_globals(path) if isinstance(error, pickle.UnpicklingError) else []
        if not unsafe:
            raise unreadable(path, error) from error
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects ({', '.join(unsafe)}) that only "
            "running their code could rebuild, so vaeflow does not load it (weights_only "
            "loading). If you trust the file, load it in Python with "
            "torch.load(path, weights_only=False) and save a checkpoint of plain tensors and "
            "values (a vaeflow run writes such checkpoints)"
        ) from error
    check_structure(path, checkpoint)
    return migrate(checkpoint, path)


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_checkpoint`, also refusing a file Lightning could not restore a model from
    (one without the version Lightning stamps on every checkpoint it writes).

    Raises:
        CheckpointError: as :func:`read_checkpoint`, or the file lacks Lightning's stamp.
    """
    checkpoint = read_checkpoint(path)
    if LIGHTNING_VERSION not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it has no {LIGHTNING_VERSION!r}): a "
            "model's weights alone cannot be resumed or evaluated. Give a .ckpt file written "
            "by vaeflow fit, or load the weights in Python with model.load_state_dict"
        )
    return checkpoint


def before_formats(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Format 0 (written before formats were recorded) to 1: a VAE from before posteriors were
    registered has no ``posterior`` hyperparameter; its encoder gave a diagonal Gaussian."""
    hyperparameters = checkpoint.get("hyper_parameters", {})
    if "likelihood" in hyperparameters and "posterior" not in hyperparameters:
        hyperparameters["posterior"] = "diagonal_gaussian"
    return checkpoint


#: ``{format n: the function that turns a checkpoint of format n into one of format n + 1}``.
MIGRATIONS = {0: before_formats}


def migrate(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """``checkpoint`` brought from its format to :data:`FORMAT`, one migration at a time.

    Raises:
        CheckpointError: the checkpoint was written by a newer vaeflow, in a format this one
            cannot read.
    """
    version = checkpoint.get(FORMAT_KEY, 0)
    if not isinstance(version, int) or not 0 <= version <= FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by a newer vaeflow (checkpoint format {version!r}; "
            f"this vaeflow reads formats up to {FORMAT}): upgrade vaeflow (pip install -U "
            "vaeflow) to use it"
        )
    for step in range(version, FORMAT):
        checkpoint = MIGRATIONS[step](checkpoint)
    checkpoint[FORMAT_KEY] = FORMAT
    return checkpoint


def unsafe_globals(path: Path) -> list[str]:
    """The classes and functions whose pickled objects ``weights_only`` loading refused, read
    from the file's opcodes without running them (none when it is no torch zip file)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: the caller says unreadable
        return []


def check_structure(path: Path, checkpoint: Any) -> None:
    """Refuse a loaded checkpoint that Lightning could not restore: not a dict, a
    ``state_dict`` that is not a dict of tensors or holds NaN or infinite values,
    ``hyper_parameters`` that are not a dict.

    Raises:
        CheckpointError: what is wrong, and what to use instead.
    """
    where = f"{path} is not a Lightning checkpoint"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{where} (it holds a {type(checkpoint).__name__} without a 'state_dict'): give a "
            ".ckpt file written by vaeflow fit"
        )
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{where}: its 'state_dict' is a {type(state).__name__}, not a dict of named "
            "tensors. Use a .ckpt file written by vaeflow fit (or rebuild the file with "
            "model.state_dict())"
        )
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    if not isinstance(hyper_parameters, dict):
        raise CheckpointError(
            f"{where}: its 'hyper_parameters' are a {type(hyper_parameters).__name__}, not a "
            "dict of the model's settings. Use a .ckpt file written by vaeflow fit"
        )
    bad = [
        name
        for name, value in state.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite weights ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}): the run that wrote it had diverged. Use an "
            "earlier checkpoint of that run, or train again with a smaller learning rate"
        )


def unreadable(path: Path, error: BaseException) -> CheckpointError:
    text = str(error).strip()
    # torch's own text is a page of advice on weights_only for any bytes it cannot unpickle
    short = text and "\n" not in text and len(text) < 200
    detail = f"{type(error).__name__}: {text}" if short else type(error).__name__
    return CheckpointError(
        f"checkpoint {path} cannot be read ({detail}): it is truncated, corrupt, or "
        "not a PyTorch checkpoint. Use another checkpoint of the run, e.g. its last.ckpt"
    )


def check_state_dict(state: dict[str, Tensor], model: Module) -> None:
    """Refuse a checkpoint's weights that do not fit ``model``: names missing or unknown, or of
    another shape (what ``load_state_dict`` would raise, said as what to do).

    Raises:
        CheckpointError: the names and shapes that differ.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    shapes = [
        f"{name} {tuple(state[name].shape)} (the model's: {tuple(value.shape)})"
        for name, value in expected.items()
        if name in state and state[name].shape != value.shape
    ]
    problems = [
        f"{what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        for what, names in (
            ("missing weights", missing),
            ("weights the model does not have", unknown),
            ("weights of another shape", shapes),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"the checkpoint's weights do not fit the {type(model).__name__} it describes "
            f"({'; '.join(problems)}): it was edited, or written by another version of the "
            "model. Use a checkpoint written by vaeflow fit with this model"
        )


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
        try:
            version, internal, gauss = state_dict["python"]
            python = (version, tuple(internal), gauss)
            generator = torch.Generator()
            generator.set_state(state_dict["torch"])  # checked before the global one is set
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"the checkpoint's random-generator state is damaged ({type(error).__name__}: "
                f"{error}), so the run cannot continue with the noise an uninterrupted one would "
                "draw. Use another checkpoint of the run, or give --ckpt_path only to test it"
            ) from error
        random.setstate(python)
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
