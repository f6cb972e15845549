"""``vaeflow list [KIND] [NAME] [--json]``: the registered likelihoods, priors and networks, or one
of them with its options.

The text is plain (docstrings lose their reST markup) and no terminal width cuts a name or a
class path: those are written whole, and only descriptions are wrapped, at the terminal's width
(80 columns when piped). ``--json`` gives the same for scripts. Nothing here imports Lightning
or jsonargparse, so that the answer comes in well under the time of importing them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from vaeflow.errors import ConfigError
from vaeflow.registry import REGISTRIES, Registry, init_parameters, load_plugins

#: the config keys of :class:`vaeflow.models.VAE` that take each kind's names, for the usage
#: lines of one entry.
CONFIG_KEYS = {"likelihood": ("likelihood",), "prior": ("prior",), "net": ("encoder", "decoder")}
#: ``:role:`target``` (Sphinx cross-references), ````literal```` and ```default role```.
ROLE = re.compile(r":[\w.:-]+:`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")
#: the narrowest a wrapped description gets, however long the names beside it.
MIN_TEXT_WIDTH = 30
#: a section header of a Google-style docstring (the style vaeflow and Lightning write)
SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Attributes|Returns|Yields|Raises|Examples?|Notes?|"
    r"Warnings?|See Also|References):\s*$"
)
#: an entry of an ``Args:`` section: ``name: text`` or ``name (type): text``
ARGUMENT = re.compile(r"^\s*\*{0,2}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


def plain_text(text: str) -> str:
    """A docstring's text without reST markup: ``:class:`~a.b.C``` is ``C``, ``:func:`a.f``` is
    ``a.f``, ````x```` is ``x``."""

    def target(match: re.Match[str]) -> str:
        name = match.group(1)
        name = re.sub(r"^.*<(.+)>$", r"\1", name)  # :ref:`title <target>`
        return name.rpartition(".")[2] if name.startswith("~") else name

    return LITERAL.sub(lambda m: m.group(1) or m.group(2), ROLE.sub(target, text))


@dataclass
class Option:
    """One constructor argument of a registered class."""

    name: str
    type: str
    default: Any
    required: bool
    help: str


@dataclass
class Entry:
    """One registered class: where it comes from and what it takes."""

    kind: str
    name: str
    class_path: str
    package: str
    summary: str


def entries(registry: Registry) -> list[Entry]:
    """Every entry of ``registry``, sorted by name."""
    return [
        Entry(registry.kind, name, path, registry.source(name), plain_text(summary))
        for name, path, summary in registry.describe()
    ]


def annotation_text(annotation: Any) -> str:
    """A parameter's annotation as written (a string under ``from __future__ import
    annotations``), or formatted from the object."""
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the text before the first section, {argument: its text}) of a Google-style docstring
    (dedented, as :func:`inspect.getdoc` gives it)."""
    text: list[str] = []
    arguments: dict[str, list[str]] = {}
    section, indent, name = None, None, None
    for line in doc.splitlines():
        header = SECTION.match(line)
        if header:
            section, indent, name = header.group(1), None, None
        elif section is None:
            text.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            depth = len(line) - len(line.lstrip())
            indent = depth if indent is None else indent
            entry = ARGUMENT.match(line) if depth == indent else None
            if entry:
                name = entry.group(1)
                arguments[name] = [entry.group(2)]
            elif name is not None:
                arguments[name].append(line.strip())
    return "\n".join(text).strip(), {k: " ".join(" ".join(v).split()) for k, v in arguments.items()}


def options(cls: type) -> list[Option]:
    """The constructor arguments of ``cls`` with their types, defaults and the text its
    docstring's ``Args:`` section gives each."""
    helps = parse_docstring(inspect.getdoc(cls) or "")[1]
    return [
        Option(
            name=p.name,
            type=annotation_text(p.annotation),
            default=None if p.default is inspect.Parameter.empty else p.default,
            required=p.default is inspect.Parameter.empty,
            help=plain_text(helps.get(p.name, "")),
        )
        for p in init_parameters(cls)
    ]


def description(cls: type) -> str:
    """The docstring of ``cls`` before its sections (``Args:``, ...), as plain text."""
    return plain_text(parse_docstring(inspect.getdoc(cls) or "")[0])


class Writer:
    """Plain text at the terminal's width: names and class paths whole, descriptions wrapped."""

    def __init__(self) -> None:
        self.width = shutil.get_terminal_size().columns
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        self.lines.append(text)

    def wrapped(self, text: str, indent: int) -> None:
        """``text`` wrapped from column ``indent`` on, never narrower than
        :data:`MIN_TEXT_WIDTH` (a long name beside it may then run past the terminal's edge)."""
        self.lines.extend(
            textwrap.wrap(
                text,
                max(self.width, indent + MIN_TEXT_WIDTH),
                initial_indent=" " * indent,
                subsequent_indent=" " * indent,
                break_on_hyphens=False,
            )
        )

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def catalogue_text(registries: Iterable[Registry], failed: dict[str, str]) -> str:
    """Every entry of ``registries``: name, class path and package on one line, whole; the
    description wrapped below it."""
    out = Writer()
    for registry in registries:
        rows = entries(registry)
        out.line(f"{registry.kind}s ({registry.group})")
        column = 2 + max((len(e.name) for e in rows), default=0) + 2
        for entry in rows:
            out.line(f"  {entry.name.ljust(column - 4)}  {entry.class_path}  ({entry.package})")
            out.wrapped(entry.summary, column)
        out.line()
    for name, error in failed.items():
        out.line(f"plugin {name!r} failed to load: {error}")
    out.line("vaeflow list KIND NAME shows one with its options: vaeflow list likelihood gaussian")
    return out.text()


def entry_text(registry: Registry, name: str) -> str:
    """One entry: class path, package, its docstring and its options."""
    cls = registry.get(name)
    out = Writer()
    out.line(f"{name} ({registry.kind}, entry-point group {registry.group})")
    out.line(f"  class:   {registry.class_path(name)}")
    out.line(f"  package: {registry.source(name)}")
    out.line()
    for paragraph in description(cls).split("\n\n"):
        out.wrapped(" ".join(paragraph.split()), 0)
        out.line()
    parameters = options(cls)
    out.line("Options:" if parameters else "Options: none")
    for option in parameters:
        default = " (required)" if option.required else f" = {option.default!r}"
        kind = f": {option.type}" if option.type else ""
        out.line(f"  {option.name}{kind}{default}")
        out.wrapped(option.help, 6)
    out.line()
    example = next((o for o in parameters if not o.required), None)
    for key in CONFIG_KEYS.get(registry.kind, (registry.kind,)):
        nested = f"--model.{key}.{example.name} VALUE" if example else ""
        out.line(f"YAML:     {key}: {name}")
        if example:
            out.line(
                f"          {key}: {{class_path: {name}, init_args: {{{example.name}: VALUE}}}}"
            )
        out.line(f"Command:  --model.{key} {name} {nested}".rstrip())
    return out.text()


def entry_json(registry: Registry, name: str) -> dict[str, Any]:
    cls = registry.get(name)
    (entry,) = [e for e in entries(registry) if e.name == name]
    return {
        **asdict(entry),
        "description": description(cls),
        "options": [asdict(option) for option in options(cls)],
    }


def find(name: str, registries: Iterable[Registry]) -> list[Registry]:
    """The registries holding ``name``."""
    return [registry for registry in registries if name in registry]


def kind_of(word: str, registries: Iterable[Registry]) -> Registry | None:
    """The registry a KIND argument names: ``likelihood`` or ``likelihoods``, etc."""
    return next((r for r in registries if word in (r.kind, f"{r.kind}s", r.group)), None)


def parser() -> argparse.ArgumentParser:
    kinds = ", ".join(f"{r.kind}s" for r in REGISTRIES)
    result = argparse.ArgumentParser(
        prog="vaeflow list",
        description=(
            "List the registered likelihoods, priors and networks (built-in and from plugins), "
            "or show one with its options. Names and class paths are printed whole."
        ),
        epilog=(
            "Examples: vaeflow list; vaeflow list priors; vaeflow list likelihood gaussian; "
            "vaeflow list gaussian; vaeflow list --json"
        ),
    )
    result.add_argument("kind", nargs="?", metavar="KIND", help=f"one of {kinds} (or singular)")
    result.add_argument("name", nargs="?", metavar="NAME", help="a registered name: that entry")
    result.add_argument("--json", action="store_true", help="print JSON, for scripts")
    return result


def main(argv: list[str], registries: tuple[Registry, ...] = REGISTRIES) -> int:
    """Run ``vaeflow list`` with the arguments after ``list``; return the exit code."""
    args = parser().parse_args(argv)
    failed = load_plugins(registries)
    try:
        text = answer(args.kind, args.name, args.json, registries, failed)
    except ConfigError as error:
        print(f"vaeflow list: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def answer(
    kind: str | None,
    name: str | None,
    as_json: bool,
    registries: tuple[Registry, ...],
    failed: dict[str, str],
) -> str:
    """What ``vaeflow list KIND NAME`` prints: the catalogue of one kind or of all, or one entry
    (``KIND`` may be left out before a name that only one kind has)."""
    chosen = registries
    if kind is not None:
        registry = kind_of(kind, registries)
        if registry is None:  # a name alone: vaeflow list gaussian
            if name is not None:
                kinds = ", ".join(f"{r.kind}s" for r in registries)
                raise ConfigError(f"unknown kind {kind!r}; the kinds are {kinds}")
            name, chosen = kind, tuple(find(kind, registries))
            if not chosen:
                known = ", ".join(n for r in registries for n in r.names())
                raise ConfigError(f"no likelihood, prior or net is named {kind!r}. Known: {known}")
        else:
            chosen = (registry,)
    if name is None:
        if as_json:
            listing = {f"{r.kind}s": [asdict(e) for e in entries(r)] for r in chosen}
            return json.dumps({**listing, "failed_plugins": failed}, indent=2) + "\n"
        return catalogue_text(chosen, failed)
    if as_json:
        found = [entry_json(r, name) for r in chosen]
        return json.dumps(found[0] if len(found) == 1 else found, indent=2, default=repr) + "\n"
    return "\n".join(entry_text(r, name) for r in chosen)
