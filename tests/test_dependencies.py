"""What vaeflow imports is what it declares: module-level imports are runtime dependencies, and
an import made inside a function (a feature that only some runs use) is declared in an extra."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaeflow"


def third_party_imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(top-level modules imported at module level, those imported inside functions)."""
    module_level, deferred = set(), set()
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    nested = {id(inner) for function in functions for inner in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top in ("vaeflow", "__future__"):
                continue
            (deferred if id(node) in nested else module_level).add(top)
    return module_level, deferred


def declared() -> tuple[set[str], set[str]]:
    """(runtime distributions, distributions of any extra), normalised names."""
    runtime, extras = set(), set()
    for requirement in importlib.metadata.requires("vaeflow") or []:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        (extras if "extra ==" in requirement else runtime).add(name)
    return runtime, extras


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    """Top-level module -> distributions providing it (a scan of every installed package)."""
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    found = installed_modules().get(module, [])
    return {name.lower().replace("_", "-") for name in found}


def test_every_import_is_declared_where_it_is_needed() -> None:
    runtime, extras = declared()
    undeclared = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module_level, deferred = third_party_imports(ast.parse(path.read_text()))
        for module in sorted(module_level):
            if not distributions_of(module) & runtime:
                undeclared.append(f"{path.name}: {module} (module level, needs a dependency)")
        for module in sorted(deferred - module_level):
            if not distributions_of(module) & (runtime | extras):
                undeclared.append(f"{path.name}: {module} (deferred, needs at least an extra)")
    assert not undeclared, undeclared


def test_every_runtime_dependency_is_imported() -> None:
    runtime, _ = declared()
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        module_level, deferred = third_party_imports(ast.parse(path.read_text()))
        for module in module_level | deferred:
            imported |= distributions_of(module)
    assert runtime <= imported, sorted(runtime - imported)
