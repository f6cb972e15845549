"""Name -> class registries for likelihood families and priors, extended by plugins.

A family is a class; a name in YAML (``likelihood: bernoulli``) is looked up here. Third-party
packages add names through the entry-point groups ``vaeflow.likelihoods`` and ``vaeflow.priors``
(``name = "package.module:Class"``), discovered the first time a registry is read.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from vaeflow.errors import ConfigError

T = TypeVar("T")

#: Set this environment variable to ``1`` to skip loading plugins from entry points.
NO_PLUGINS_ENV = "VAEFLOW_NO_PLUGINS"


class Registry(Generic[T]):
    """A decorator registry that also reads an entry-point group and fails with the list of names.

    Args:
        kind: what is registered, for messages ("likelihood").
        group: the entry-point group plugins use ("vaeflow.likelihoods").
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._classes: dict[str, type[T]] = {}
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
        """Register ``cls`` under ``name`` (the non-decorator form)."""
        existing = self._classes.get(name)
        if existing is not None and existing is not cls and not override:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; pass override=True to replace it"
            )
        self._classes[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]

    def load_plugins(self) -> dict[str, str]:
        """Import every entry point of this registry's group once; return the ones that failed."""
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
            except Exception as error:  # a broken plugin must not take the rest down
                message = f"{type(error).__name__}: {error}"
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
        """(name, import path, first line of the docstring) for every registered class."""
        for name in self.names():
            cls = self._classes[name]
            summary = (inspect.getdoc(cls) or "").partition("\n")[0]
            yield name, f"{cls.__module__}.{cls.__qualname__}", summary

    def __contains__(self, name: object) -> bool:
        return name in self.names()


LIKELIHOODS: Registry = Registry("likelihood", "vaeflow.likelihoods")
PRIORS: Registry = Registry("prior", "vaeflow.priors")
register_likelihood = LIKELIHOODS.register
register_prior = PRIORS.register


def load_plugins() -> dict[str, str]:
    """Load every plugin of every registry; return ``{name: error}`` for those that failed."""
    return {**LIKELIHOODS.load_plugins(), **PRIORS.load_plugins()}
