"""vaeflow: factor analysis, PPCA and variational autoencoders with PyTorch Lightning.

The names below are imported when first used (PEP 562), not with the package: every ``vaeflow``
command imports it first, and a Ctrl+C while torch loads must reach the command's handler
(``vaeflow: interrupted by SIGINT``, exit 130) rather than end in a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The families' modules: importing one registers its built-in classes.
FAMILIES = ("likelihoods", "nets", "posteriors", "priors")
#: Names of :mod:`vaeflow.registry` that the package exposes.
REGISTRY_NAMES = (
    "LIKELIHOODS",
    "NETS",
    "POSTERIORS",
    "PRIORS",
    "register_likelihood",
    "register_net",
    "register_posterior",
    "register_prior",
)
__all__ = [*REGISTRY_NAMES, *FAMILIES]


def __getattr__(name: str) -> Any:
    if name in FAMILIES:
        return importlib.import_module(f"vaeflow.{name}")
    if name in REGISTRY_NAMES:  # each registry imports its built-ins at its first lookup
        return getattr(importlib.import_module("vaeflow.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
