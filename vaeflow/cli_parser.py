"""The parser of ``vaeflow fit|validate|test|predict``: LightningCLI's, where a registered name
takes options and the help shows what vaeflow ships.

- A parameter that takes a registry's names (``likelihood: Likelihood | str``) keeps a name
  given alone as the name (``likelihood: gaussian``: checkpoints and configs store names). Given
  options after it (``--model.likelihood gaussian --model.likelihood.variance fixed``), or given
  as a ``class_path`` (``{class_path: gaussian, init_args: {variance: fixed}}``), the name stands
  for its class's import path, which jsonargparse then treats as any class: ``--*.help NAME``
  too. jsonargparse resolves short class names (``GaussianLikelihood``) but knows nothing of
  registries, so the name is replaced before jsonargparse reads the value.
- The help of such a parameter lists the registered names instead of every subclass installed
  (for the networks, every ``torch.nn.Module`` of torch and torchvision).
- ``vaeflow fit --help`` ends with the options of each model and data module vaeflow ships
  (:meth:`VaeflowArgumentParser.add_shipped_classes`).
- Help text loses its reST markup (:func:`vaeflow.listing.plain_text`).
"""

from __future__ import annotations

import argparse
import functools
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from vaeflow.lightning_private import known_subclasses_help, parser_actions
from vaeflow.listing import plain_text
from vaeflow.registry import Registry, registry_of, summary

#: the attribute that marks an option taking a registry's names with that registry.
REGISTRY_ATTRIBUTE = "vaeflow_registry"


@functools.cache
def registered_parameters(cls: type) -> dict[str, Registry]:
    """The constructor parameters of ``cls`` that take a registry's names, with the registry."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: such a class takes no names
        return {}
    found = {name: registry_of(hint) for name, hint in hints.items() if name != "return"}
    return {name: registry for name, registry in found.items() if registry is not None}


#: Above this many known subclasses, help names their base class instead of listing them.
MAX_LISTED_SUBCLASSES = 5


class VaeflowHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with registered names in place of the known subclasses where a
    parameter takes names, and docstrings as plain text."""

    @override
    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        registry: Registry | None = getattr(action, REGISTRY_ATTRIBUTE, None)
        if registry is not None:
            names = (
                f", registered {registry.kind}s: {', '.join(registry.names())} (each with its "
                f"options: vaeflow list {registry.kind} NAME)"
            )
            text = text.replace(known_subclasses_help(action), names)
        else:  # torch's optimisers and schedulers: the base class, not every subclass
            listed = known_subclasses_help(action)
            classes = listed.partition("known subclasses:")[2].split(",")
            if len(classes) > MAX_LISTED_SUBCLASSES:
                base = classes[0].strip()
                text = text.replace(
                    listed, f", any subclass of {base} by class_path ({len(classes)} in torch)"
                )
        return plain_text(text)


class VaeflowArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with registered names that take options, and fuller help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", VaeflowHelpFormatter)
        kwargs.setdefault("prog", "vaeflow")  # not __main__.py under python -m vaeflow
        super().__init__(*args, **kwargs)
        #: option key -> the registry whose names it takes
        self.registered: dict[str, Registry] = {}
        #: option key -> the classes vaeflow ships for it, described at the end of the help
        self.shipped: dict[str, tuple[type, ...]] = {}

    @override
    def add_class_arguments(
        self, class_type: Any, nested_key: str | None = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        """jsonargparse's, noting the parameters that take a registry's names (jsonargparse
        builds the parser of a ``class_path``'s ``init_args`` with this method too)."""
        added = super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        prefix = f"{nested_key}." if nested_key else ""
        group = (self.groups or {}).get(nested_key) if nested_key else None
        if group is not None and isinstance(class_type, type):
            # jsonargparse's title is the docstring's first line, which may end mid-sentence
            group.title = plain_text(summary(class_type)).removesuffix(".")
        if isinstance(class_type, type):
            for name, registry in registered_parameters(class_type).items():
                if prefix + name in added:
                    self.registered[prefix + name] = registry
        for action in parser_actions(self):
            if action.dest in self.registered:
                setattr(action, REGISTRY_ATTRIBUTE, self.registered[action.dest])
        return added

    def add_shipped_classes(self, key: str, classes: Sequence[type]) -> None:
        """End the help with the options of each of ``classes``, the choices vaeflow ships for
        the subclass-typed option ``key`` (whose own help names only the base class)."""
        self.shipped[key] = tuple(classes)

    @override
    def parse_args(
        self, args: Sequence[str] | None = None, namespace: Namespace | None = None, **kwargs: Any
    ) -> Namespace:
        if self.registered and args is not None:
            args, namespace = self.names_with_options_as_class_paths(list(args), namespace)
        return super().parse_args(args, namespace, **kwargs)

    @override
    def parse_object(
        self, obj: Namespace | dict[str, Any], namespace: Namespace | None = None, **kwargs: Any
    ) -> Namespace:
        if self.registered:
            obj = self.class_path_names_resolved(obj, namespace)
        return super().parse_object(obj, namespace, **kwargs)

    def names_with_options_as_class_paths(
        self, args: list[str], namespace: Namespace | None
    ) -> tuple[list[str], Namespace | None]:
        """Command-line arguments in which a registered name followed by options of its own
        (``--likelihood=gaussian --likelihood.variance=fixed``, or the name given earlier, in
        ``namespace``), or asked for its help (``--likelihood.help=gaussian``), is its class's
        import path. A name given alone stays a name. Arguments come in jsonargparse's
        ``--key=value`` form: it passes a class's options to the parser of its ``init_args``
        one at a time, that way."""
        args = list(args)
        current = {key: namespace.get(key) if namespace else None for key in self.registered}
        given_at: dict[str, int] = {}
        for index, arg in enumerate(args):
            option, equals, value = arg.partition("=")
            for key, registry in self.registered.items() if equals else ():
                name = current[key]
                if option == f"--{key}":
                    current[key], given_at[key] = value, index
                elif option == f"--{key}.help":  # of anything else: jsonargparse's to resolve
                    if value in registry:
                        args[index] = f"{option}={registry.class_path(value)}"
                elif option.startswith(f"--{key}.") and is_name(name, registry):
                    # a str is a name or an import path (your_module.YourNet), which is
                    # jsonargparse's to import: get() refuses an unknown name with the known ones
                    path = current[key] = registry.class_path(name)
                    if key in given_at:
                        args[given_at[key]] = f"--{key}={path}"
                    else:
                        namespace = namespace.clone() if namespace else Namespace()
                        namespace[key] = Namespace(class_path=path)
        return args, namespace

    def class_path_names_resolved(
        self, obj: Namespace | dict[str, Any], namespace: Namespace | None
    ) -> Namespace | dict[str, Any]:
        """A config in which a registered name given as a ``class_path`` (``likelihood:
        {class_path: gaussian, init_args: ...}``), or given earlier (in ``namespace``) and now
        followed by ``init_args``, is its class's import path."""
        for key, registry in self.registered.items():
            value = obj.get(key) if "." not in key or isinstance(obj, Namespace) else None
            if not isinstance(value, dict | Namespace):
                continue
            name = value.get("class_path")
            if name is None and "init_args" in value and namespace is not None:
                name = namespace.get(key)
            if isinstance(name, str) and name in registry:
                value = value.clone() if isinstance(value, Namespace) else dict(value)
                value["class_path"] = registry.class_path(name)
                obj = obj.clone() if isinstance(obj, Namespace) else dict(obj)
                obj[key] = value
        return obj

    @override
    def format_help(self, *args: Any, **kwargs: Any) -> str:
        """jsonargparse's help, then the options of every class vaeflow ships for a
        subclass-typed option (:meth:`add_shipped_classes`), as ``--KEY.help CLASS`` shows them
        except that an option already shown for an earlier class (the data modules share most)
        is named, not shown again."""
        text = super().format_help(*args, **kwargs)
        for key, classes in self.shipped.items():
            names = ", ".join(cls.__name__ for cls in classes)
            text += (
                f"\n{key.upper()}: what vaeflow ships for --{key} ({names}). Choose one with "
                f"--{key} NAME; --{key}.help NAME shows one alone.\n"
            )
            shown: set[tuple[str, ...]] = set()
            for cls in classes:
                text += f"\n--{key} {cls.__name__} ({short_import_path(cls)}):\n"
                text += self.class_help(cls, key, shown)
        return text

    def class_help(self, cls: type, key: str, shown: set[tuple[str, ...]]) -> str:
        """The options of ``cls`` under ``key`` (no usage line); those in ``shown`` (option,
        help, default) only by name. Adds the options it shows to ``shown``."""
        parser = type(self)(usage=argparse.SUPPRESS, add_help=False, description=None)
        parser.add_class_arguments(cls, key, fail_untyped=False)
        again = []
        for action in parser_actions(parser):
            if action.dest == key:  # --KEY CONFIG: a file of the class's options
                action.help = argparse.SUPPRESS
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            identity = (*action.option_strings, str(action.help), repr(action.default))
            if identity in shown:
                again.append(action.option_strings[-1])
                action.help = argparse.SUPPRESS
            shown.add(identity)
        text = parser.format_help()
        if not text.strip():  # no option of its own: argparse leaves out the title too
            text = plain_text(summary(cls)) + "\n"
        if again:
            text += "\n".join(
                textwrap.wrap(
                    f"and, as for the classes above: {', '.join(again)}",
                    initial_indent="  ",
                    subsequent_indent="  ",
                    break_on_hyphens=False,
                )
            )
            text += "\n"
        return text


def is_name(value: Any, registry: Registry) -> bool:
    """Whether a config value is a registered name (or a misspelt one) rather than the import
    path of a class (a dotted path that is not registered)."""
    return isinstance(value, str) and (value in registry or "." not in value)


def short_import_path(cls: type) -> str:
    """The shortest import path of ``cls`` (``vaeflow.models.VAE``, not
    ``vaeflow.models.vae.VAE``): that of the first package above its module that exports it."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"
