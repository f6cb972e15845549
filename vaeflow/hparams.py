"""Hyperparameters as plain data, so that ``Model.load_from_checkpoint(path)`` works alone.

Under ``vaeflow fit`` LightningCLI stores the YAML config (class paths and init args) as the
model's hyperparameters and rebuilds the model from it with jsonargparse. A model built in Python
receives objects instead (a likelihood instance, ``torch.optim.Adam``, a ``functools.partial``);
:func:`save_plain_hyperparameters` turns those into the same class-path form and marks them for
the same rebuild, so checkpoints hold no pickled code and reload with ``weights_only`` loading.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

from lightning.pytorch import LightningModule

from vaeflow.errors import ConfigError

#: the rebuild function LightningCLI uses; Lightning trusts it when loading a checkpoint.
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
PLAIN = (str, int, float, bool, type(None))


def import_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def to_config(value: Any, name: str = "value") -> Any:
    """``value`` as YAML-able data: plain values as they are, a class or function by its import
    path, a ``functools.partial`` or an object as ``{class_path, init_args}``. An object's init
    args are read back from attributes of the same name (the scikit-learn convention)."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [to_config(item, name) for item in value]
    if isinstance(value, dict):
        return {key: to_config(item, f"{name}.{key}") for key, item in value.items()}
    if isinstance(value, functools.partial):
        # jsonargparse wraps the class as the last positional argument of its instantiator
        target = next(a for a in (*reversed(value.args), value.func) if callable(a))
        return {"class_path": import_path(target), "init_args": to_config(value.keywords, name)}
    if inspect.isclass(value) or inspect.isfunction(value):
        return {"class_path": import_path(value)} if inspect.isclass(value) else import_path(value)
    parameters = inspect.signature(type(value)).parameters
    if all(hasattr(value, p) for p in parameters if p not in ("self", "args", "kwargs")):
        init_args = {p: getattr(value, p) for p in parameters if p not in ("args", "kwargs")}
        return {"class_path": import_path(type(value)), "init_args": to_config(init_args, name)}
    raise ConfigError(
        f"cannot store hyperparameter {name!r} ({type(value).__name__}) in a checkpoint: give a "
        "class, a functools.partial of one, or an object that keeps each constructor argument "
        "as an attribute of the same name"
    )


def save_plain_hyperparameters(module: LightningModule) -> None:
    """``module.save_hyperparameters()`` for the caller's ``__init__``, in class-path form.

    An argument that has no plain form (a lambda, a closure) is left out with a warning: pass it
    again to ``load_from_checkpoint(path, name=...)``.
    """
    module.save_hyperparameters(frame=inspect.currentframe().f_back)
    if "_instantiator" in module.hparams:  # built by LightningCLI from a config already
        return
    plain = {}
    for name, value in module.hparams.items():
        try:
            plain[name] = to_config(value, name)
        except ConfigError as error:
            warnings.warn(f"{error}; pass it again to load_from_checkpoint", stacklevel=3)
    module.hparams.clear()
    module.hparams.update(plain, _instantiator=INSTANTIATOR)
