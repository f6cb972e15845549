"""Name -> class registries for likelihood families, priors, networks and variational families
(posteriors), extended by plugins.

A family is a class; a name in YAML (``likelihood: bernoulli``, ``encoder: conv_encoder``) is
looked up here. Third-party packages add names through the entry-point groups
``vaeflow.likelihoods``, ``vaeflow.priors``, ``vaeflow.nets`` and ``vaeflow.posteriors`` (``name =
"package.module:Class"``), discovered the first time a registry is read.

The contract every registered class keeps: each constructor argument is stored as an attribute
of the same name (``self.df = df``). Checkpoints hold a model's likelihood and prior as
``class_path`` + ``init_args`` read back from those attributes (:mod:`vaeflow.hparams`), so a
class that renames or drops an argument could not be reloaded; registration checks it.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch

from vaeflow.errors import ConfigError

T = TypeVar("T")

#: Set this environment variable to ``1`` to skip loading plugins from entry points.
NO_PLUGINS_ENV = "VAEFLOW_NO_PLUGINS"


class Registry(Generic[T]):
    """A decorator registry that also reads an entry-point group and fails with the list of names.

    Args:
        kind: what is registered, for messages ("likelihood").
        group: the entry-point group plugins use ("vaeflow.likelihoods").
        base: import path of the class every entry is (or, for factories, returns), so that
            the command line knows which parameters take this registry's names
            (:func:`registry_of`); imported only when asked, as the base's module registers
            its own classes here.
        builtins: the module that registers the built-in classes, imported before the first
            lookup (``import vaeflow`` imports no family, so that the command starts fast).
    """

    def __init__(
        self, kind: str, group: str, base: str | None = None, builtins: str | None = None
    ) -> None:
        self.kind = kind
        self.group = group
        self.base = base
        self.builtins = builtins
        self._classes: dict[str, type[T]] = {}
        self._distributions: dict[str, importlib.metadata.Distribution] = {}  # of entry points
        self._plugins_loaded = False
        #: plugins that failed to load: entry-point name -> error message
        self.failed_plugins: dict[str, str] = {}

    def register(self, name: str, *, override: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator that registers ``cls`` under ``name``.

        Args:
            name: the name users write in YAML.
            override: replace an existing registration on purpose; otherwise a clash is an error.
        """

        def decorator(cls: type[T]) -> type[T]:
            self.add(name, cls, override=override)
            return cls

        return decorator

    def add(self, name: str, cls: type[T], *, override: bool = False) -> None:
        """Register ``cls`` under ``name`` (the non-decorator form), checking the contract
        (:func:`check_init_attributes`)."""
        check_init_attributes(self.kind, name, cls)
        existing = self._classes.get(name)
        if existing is not None and existing is not cls and not override:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; pass override=True to replace it"
            )
        self._classes[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]

    def load_plugins(self) -> dict[str, str]:
        """Import the built-in classes' module and every entry point of this registry's group
        once; return the entry points that failed."""
        if self.builtins is not None:
            importlib.import_module(self.builtins)
        if self._plugins_loaded or os.environ.get(NO_PLUGINS_ENV, "") not in ("", "0"):
            return self.failed_plugins
        self._plugins_loaded = True
        for entry_point in importlib.metadata.entry_points(group=self.group):
            try:
                cls = entry_point.load()
                if not inspect.isclass(cls):
                    raise TypeError(f"{entry_point.value} is not a class")
                if self._classes.get(entry_point.name) is not cls:
                    self.add(entry_point.name, cls)
                if entry_point.dist is not None:
                    self._distributions[entry_point.name] = entry_point.dist
            except (Exception, SystemExit) as error:  # a broken plugin must not take the rest
                # down, nor end the command (sys.exit on import would make it exit 0, done)
                message = (
                    f"it called sys.exit({error.code!r}) on import"
                    if isinstance(error, SystemExit)
                    else f"{type(error).__name__}: {error}"
                )
                self.failed_plugins[entry_point.name] = message
                warnings.warn(
                    f"vaeflow: {self.kind} plugin {entry_point.name!r} ({entry_point.value}) "
                    f"failed to load and is skipped: {message}",
                    stacklevel=2,
                )
        return self.failed_plugins

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; the error lists every name and the closest one."""
        self.load_plugins()
        try:
            return self._classes[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(name, self._classes, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        broken = f" (plugins that failed to load: {', '.join(self.failed_plugins)})"
        raise ConfigError(
            f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}"
            + (broken if self.failed_plugins else "")
        ) from None

    def build(self, spec: str | T, **kwargs: Any) -> T:
        """An instance from a registered name (built with ``kwargs``), or ``spec`` itself."""
        return self.get(spec)(**kwargs) if isinstance(spec, str) else spec

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._classes)

    def describe(self) -> Iterator[tuple[str, str, str]]:
        """(name, import path, summary) for every registered class: the summary is the
        docstring's first paragraph on one line (its first line may end mid-sentence)."""
        for name in self.names():
            yield name, self.class_path(name), summary(self._classes[name])

    def class_path(self, name: str) -> str:
        """The import path of the class registered under ``name`` (what a ``class_path`` in
        YAML names)."""
        cls = self.get(name)
        return f"{cls.__module__}.{cls.__qualname__}"

    def base_class(self) -> type | None:
        """The class :attr:`base` names, or None for a registry without one."""
        if self.base is None:
            return None
        module, _, name = self.base.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def source(self, name: str) -> str:
        """The installed package (distribution) ``name`` comes from, with its version: the
        entry point's, else the one that provides the class's top-level module."""
        distribution = self._distributions.get(name)
        if distribution is not None:
            return f"{distribution.name} {distribution.version}"
        module = self.get(name).__module__
        names = module_distributions(module.partition(".")[0])
        if not names:
            return f"{module} (not an installed package)"
        return f"{names[0]} {importlib.metadata.version(names[0])}"

    def __contains__(self, name: object) -> bool:
        return name in self.names()


LIKELIHOODS: Registry = Registry(
    "likelihood", "vaeflow.likelihoods", "vaeflow.likelihoods.Likelihood", "vaeflow.likelihoods"
)
PRIORS: Registry = Registry("prior", "vaeflow.priors", "vaeflow.priors.Prior", "vaeflow.priors")
#: encoder and decoder networks: ``nn.Module`` classes built as ``cls(input_shape,
#: output_shape, **init_args)`` (see :mod:`vaeflow.nets`).
NETS: Registry = Registry("net", "vaeflow.nets", "torch.nn.Module", "vaeflow.nets")
#: variational families q(z | x) (see :mod:`vaeflow.posteriors`).
POSTERIORS: Registry = Registry(
    "posterior", "vaeflow.posteriors", "vaeflow.posteriors.Posterior", "vaeflow.posteriors"
)
REGISTRIES = (LIKELIHOODS, PRIORS, POSTERIORS, NETS)  # narrower bases first: registry_of
register_likelihood = LIKELIHOODS.register
register_prior = PRIORS.register
register_net = NETS.register
register_posterior = POSTERIORS.register


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring on one line (its first line may end
    mid-sentence)."""
    return " ".join((inspect.getdoc(obj) or "").partition("\n\n")[0].split())


def init_parameters(cls: type) -> list[inspect.Parameter]:
    """The named parameters of ``cls``'s constructor (not ``*args``/``**kwargs``)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in inspect.signature(cls).parameters.values() if p.kind in named]


def check_init_attributes(kind: str, name: str, cls: type) -> None:
    """Refuse a class that does not keep each constructor argument as an attribute of the same
    name. The check builds one instance from the defaults, under a random stream of its own
    (the caller's stays as it was); a class with required arguments is checked when a
    checkpoint stores it (:func:`vaeflow.hparams.to_config`).

    Raises:
        ConfigError: an argument has no attribute of its name, with how to fix it.
    """
    parameters = init_parameters(cls)
    if any(p.default is inspect.Parameter.empty for p in parameters):
        return
    with torch.random.fork_rng(devices=[]):
        instance = cls()
    missing = [p.name for p in parameters if not hasattr(instance, p.name)]
    if missing:
        assignments = "; ".join(f"self.{m} = {m}" for m in missing)
        raise ConfigError(
            f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}) does not keep its "
            f"constructor argument(s) {', '.join(map(repr, missing))} as attributes of the same "
            "name. Checkpoints rebuild it from those attributes (vaeflow/hparams.py): add "
            f"{assignments} to its __init__"
        )


def load_plugins(registries: tuple[Registry, ...] = REGISTRIES) -> dict[str, str]:
    """Load every plugin of ``registries``; return ``{name: error}`` for those that failed."""
    return {name: error for r in registries for name, error in r.load_plugins().items()}


def module_distributions(top_level: str) -> list[str]:
    """The installed distributions that provide the top-level module ``top_level``: the one of
    the same name when there is one (one metadata read), else from the map of every installed
    distribution's files, which takes seconds to build (:func:`all_module_distributions`)."""
    try:
        return [importlib.metadata.distribution(top_level).name]
    except importlib.metadata.PackageNotFoundError:
        return all_module_distributions().get(top_level, [])


@functools.cache
def all_module_distributions() -> dict[str, list[str]]:
    """``importlib.metadata.packages_distributions()``, built once per process."""
    return importlib.metadata.packages_distributions()


def registry_of(annotation: Any, registries: tuple[Registry, ...] = REGISTRIES) -> Registry | None:
    """The registry whose names a parameter of this type annotation takes: one that also
    accepts ``str`` and a class of the registry's :attr:`~Registry.base` (``Likelihood | str``)
    or a factory returning one (``str | Callable[..., nn.Module]``). The first match wins, so
    registries of narrower bases come first in ``registries``."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = typing.get_args(annotation)
    if str not in members:
        return None
    classes = []
    for member in members:
        if typing.get_origin(member) is collections.abc.Callable:
            member = typing.get_args(member)[-1]
        if inspect.isclass(member):
            classes.append(member)
    for registry in registries:
        base = registry.base_class()
        if base is not None and any(issubclass(c, base) for c in classes):
            return registry
    return None
