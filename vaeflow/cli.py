"""The ``vaeflow`` command (and ``python -m vaeflow``).

``vaeflow fit|validate|test|predict`` are LightningCLI's (:mod:`vaeflow.lightning_cli`);
``vaeflow list`` lists the registries (:mod:`vaeflow.listing`); ``vaeflow --help`` and
``vaeflow --version`` are answered here. Only the first kind imports Lightning (two thirds of the
start-up time), so the others answer in about a third of the time of a training command.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import signal
import sys
from typing import Any

import vaeflow

#: Set to 1 (or pass ``--debug``) to see the traceback of a user error.
DEBUG_VARIABLE = "VAEFLOW_DEBUG"
#: What ``vaeflow --help`` says of vaeflow, and ``vaeflow SUBCOMMAND --help`` of each subcommand
#: (Lightning's say "Lightning Trainer command line tool" and quote the Trainer's docstrings).
DESCRIPTION = (
    "Factor analysis, probabilistic PCA and variational autoencoders with PyTorch Lightning, "
    "driven from a YAML config: vaeflow fit --config run.yaml"
)
SUBCOMMANDS = {
    "fit": (
        "Train a model (VAE, FactorAnalysis) on a data module as the config and flags say, in "
        "a new run folder under runs/; --ckpt_path last continues the latest run."
    ),
    "validate": (
        "Score a model on the validation split: the config's, or a checkpoint's with --ckpt_path."
    ),
    "test": (
        "Score a model on the test split (log-likelihood, ELBO and its parts, bits/dim): the "
        "config's, or a checkpoint's with --ckpt_path."
    ),
    "predict": (
        "Write the latent codes (posterior means) of the predict data to latents.pt in a run "
        "folder, from a checkpoint given with --ckpt_path."
    ),
    "list": (
        "List the registered likelihoods, priors and networks (built-in and from plugins), or "
        "one with its options: vaeflow list likelihood gaussian."
    ),
}
#: Names this module defined before :mod:`vaeflow.lightning_cli` had a module of its own.
MOVED = frozenset(
    {
        "CKPT_KEYWORDS",
        "PROGRESS_BAR",
        "RUNS_DIR",
        "SAFETY_CALLBACKS",
        "SaveConfig",
        "VaeflowCLI",
        "end_process_group",
        "import_path",
        "is_class_config",
        "with_default",
    }
)


def version() -> str:
    """vaeflow's version, with those of Lightning, torch and Python (for bug reports), read
    from the installed packages' metadata without importing them."""
    others = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("lightning", "torch")
    )
    python = ".".join(map(str, sys.version_info[:3]))
    return f"vaeflow {vaeflow.__version__} ({others}, Python {python})"


def parser() -> argparse.ArgumentParser:
    """The parser of ``vaeflow --help`` and ``vaeflow --version``: every subcommand with its
    whole description (each subcommand parses its own arguments)."""
    result = argparse.ArgumentParser(
        prog="vaeflow",
        description=DESCRIPTION,
        epilog=(
            "vaeflow SUBCOMMAND --help shows a subcommand's options; vaeflow fit --help those "
            f"of every model and data module vaeflow ships. --debug (or {DEBUG_VARIABLE}=1) "
            "shows the traceback of an error."
        ),
    )
    result.add_argument("--version", action="version", version=version())
    subcommands = result.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, text in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=text, add_help=False)
    return result


def subcommand_index(argv: list[str]) -> int | None:
    """Where the subcommand is in ``argv``: the first argument that is neither an option nor
    the file of a top-level ``-c``/``--config`` (LightningCLI's ``vaeflow -c run.yaml fit``)."""
    after_config = False
    for index, arg in enumerate(argv):
        if not after_config and not arg.startswith("-"):
            return index
        after_config = arg in ("-c", "--config")
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script and of ``python -m vaeflow``.

    Exit codes: 0 done; 2 a mistake in the input (or a diverged training run), printed without
    a traceback unless ``--debug`` or ``VAEFLOW_DEBUG=1``; 128 + the signal when SIGINT (130)
    or SIGTERM (143) interrupted the command, with one line saying what was saved.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    at = subcommand_index(argv)
    before = argv if at is None else argv[:at]
    if not argv or {"-h", "--help", "--version"} & set(before):
        parser().parse_args(before or ["--help"])  # prints, and exits 0
    if at is not None and argv[at] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[at], SUBCOMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(
            f"vaeflow: error: unknown subcommand {argv[at]!r}.{hint} The subcommands: "
            f"{', '.join(SUBCOMMANDS)} (vaeflow --help describes them)",
            file=sys.stderr,
        )
        sys.exit(2)
    if at is not None and argv[at] == "list":
        from vaeflow import listing

        code = listing.main(argv[at + 1 :])
        if code:
            sys.exit(code)
        return
    try:
        from vaeflow.lightning_cli import run

        run(argv, debug=debug, from_sys_argv=args is None)
    except KeyboardInterrupt:  # Ctrl+C before the run's own handler (start-up, parsing, data)
        print("vaeflow: interrupted by SIGINT; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def __getattr__(name: str) -> Any:
    """``from vaeflow.cli import VaeflowCLI`` as before it moved, importing Lightning only then."""
    if name in MOVED:
        from vaeflow import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
