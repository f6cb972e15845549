"""What the ``vaeflow`` command prints for a mistake in its input: the mistake first, in a few
lines, without a traceback (``--debug`` or ``VAEFLOW_DEBUG=1`` shows it)."""

from __future__ import annotations

import difflib
import inspect
import re
import traceback
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from jsonargparse.typing import import_object

from vaeflow.errors import ConfigError, VaeflowError

#: Lines of jsonargparse's messages that describe its machinery rather than the mistake.
PARSER_NOISE = re.compile(
    r"^\s*(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:"
    r"|- Expected a <class 'NoneType'>|Given value type: .*|Given value: .*)$"
)


#: Packages of the optional extras (pyproject.toml), by the module name a config imports.
OPTIONAL_EXTRAS = {"wandb": "wandb", "tensorboard": "tensorboard", "tensorboardX": "tensorboard"}


def explain(error: BaseException) -> str | None:
    """The message for an error the user can fix, or None for anything else (a bug)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, VaeflowError):
            return str(cause)
        if isinstance(cause, ArgumentError):
            return parser_message(str(cause))
        if type(cause).__module__.startswith("wandb") and "API key" in str(cause):
            return (
                f"Weights & Biases needs an account: {str(cause).rstrip('.')}. Run `wandb "
                "login`, or set "
                "WANDB_MODE=offline to keep the run on this machine (`wandb sync` uploads it "
                "later)"
            )
        extra = missing_extra(cause)
        if extra is not None:
            return (
                f'this config needs a package that is not installed: pip install "vaeflow[{extra}]"'
            )
        if isinstance(cause, ValueError | TypeError) and raised_in_torch_optim(cause):
            return (
                f"the optimiser or learning-rate scheduler refused its settings: {cause}. Fix "
                "them under model.init_args.optimizer (or lr_scheduler) in the config, e.g. a "
                "learning rate lr > 0"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def missing_extra(error: BaseException) -> str | None:
    """The optional extra whose package ``error`` says is missing (Lightning's TensorBoard
    logger names the package in its message only)."""
    if not isinstance(error, ModuleNotFoundError):
        return None
    text = f"{error.name} {error}"
    return next((extra for module, extra in OPTIONAL_EXTRAS.items() if module in text), None)


def raised_in_torch_optim(error: BaseException) -> bool:
    """Whether ``error`` came from inside ``torch.optim`` (an optimiser checking its args)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/torch/optim/" in Path(frames[-1].filename).as_posix()


def parser_message(message: str) -> str:
    """jsonargparse's message without its machinery, with a suggestion for a misspelt option."""
    lines = [line for line in message.splitlines() if line.strip() and not PARSER_NOISE.match(line)]
    if len(lines) > 1:
        indent = min(len(line) - len(line.lstrip()) for line in lines[1:])
        lines = [lines[0], *("  " + line[indent:] for line in lines[1:])]
    text = re.sub(r"<class '([\w.]+)'>", r"\1", "\n".join(lines))
    unknown = re.search(r"Option '(\w+)' is not accepted", text)
    # the class whose option it is: the innermost class_path named before it
    owners = re.findall(r"class_path '([\w.]+)'", text[: unknown.start()] if unknown else "")
    if owners and unknown:
        try:
            names = list(inspect.signature(import_object(owners[-1])).parameters)
        except (ImportError, AttributeError, ValueError, TypeError):
            names = []
        close = difflib.get_close_matches(unknown.group(1), names, n=1)
        if close:
            text += f"\n  Did you mean '{close[0]}'?"
    return text


def config_files(argv: list[str]) -> list[Path]:
    """The ``--config`` (``-c``) files in ``argv``, in the order given."""
    found = []
    for index, arg in enumerate(argv):
        if arg in ("-c", "--config") and index + 1 < len(argv):
            found.append(Path(argv[index + 1]))
        elif arg.startswith("--config="):
            found.append(Path(arg.removeprefix("--config=")))
    return found


def check_config_files(argv: list[str]) -> None:
    """Parse every ``--config`` YAML file first, so that a syntax error names its file and line
    (jsonargparse reports it as coming from ``<unicode string>``).

    Raises:
        ConfigError: a config file is not valid YAML.
    """
    for path in config_files(argv):
        if not path.is_file():
            continue  # jsonargparse says it does not exist
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(
                f"{path} is not valid YAML: {problem}{where}. Check the brackets, quotes and "
                "indentation there (YAML indents with spaces, not tabs)"
            ) from error
