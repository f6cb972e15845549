"""What the ``vaeflow`` command prints for a mistake in its input: the mistake first, in a few
lines, without a traceback (``--debug`` or ``VAEFLOW_DEBUG=1`` shows it)."""

from __future__ import annotations

import difflib
import inspect
import re
import traceback
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from jsonargparse.typing import import_object
from lightning.fabric.utilities.exceptions import MisconfigurationException

from vaeflow.data.base import MAX_SEED
from vaeflow.errors import ConfigError, VaeflowError
from vaeflow.utils import causes

#: Lines of jsonargparse's messages that describe its machinery rather than the mistake.
PARSER_NOISE = re.compile(
    r"^\s*(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:"
    r"|- Expected a <class 'NoneType'>|Given value type: .*|Given value: .*)$"
)


#: Packages of the optional extras (pyproject.toml), by the module name a config imports.
OPTIONAL_EXTRAS = {"wandb": "wandb", "tensorboard": "tensorboard", "tensorboardX": "tensorboard"}


def explain(error: BaseException) -> str | None:
    """The message for an error the user can fix, or None for anything else (a bug)."""
    for cause in causes(error):
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
        if isinstance(cause, MisconfigurationException):
            return (
                f"Lightning refused the trainer settings: {str(cause).rstrip('.')}. Fix them "
                "under trainer: in "
                "the config (vaeflow fit --help lists them)"
            )
        asked = memory_asked(cause)
        if asked is not None:
            return (
                f"not enough memory{asked}: the model, batch or number of samples is too large "
                "for this machine. Choose smaller sizes (latent_dim, hidden widths, batch_size, "
                "num_samples, eval_samples)"
            )
        requirement = unmet_requirement(cause)
        if requirement is not None:
            setting = next(
                (name for folder, name in REQUIRING_SETTINGS.items() if raised_in(cause, folder)),
                "these trainer settings",
            )
            return (
                f"{setting} needs {requirement}, which is not installed: pip install -U "
                f"'{requirement}', or choose what this machine has (trainer.accelerator: auto "
                "picks it)"
            )
        if isinstance(cause, ArithmeticError | ValueError | TypeError) and raised_in(
            cause, "/torch/optim/"
        ):
            return (
                f"the optimiser or learning-rate scheduler refused its settings: {cause}. Fix "
                "them under model.init_args.optimizer (or lr_scheduler) in the config, e.g. a "
                "learning rate lr > 0"
            )
    return None


def memory_asked(error: BaseException) -> str | None:
    """For a failed allocation, ``" (n GiB asked)"`` or ``""``; None for any other error.
    torch's CPU allocator raises a plain RuntimeError saying how many bytes it was asked for."""
    if isinstance(error, MemoryError):
        return ""
    found = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(error))
    if not isinstance(error, RuntimeError) or found is None:
        return None
    return f" ({int(found.group(1)) / 2**30:,.1f} GiB asked)"


def missing_extra(error: BaseException) -> str | None:
    """The optional extra whose package ``error`` says is missing (Lightning's TensorBoard
    logger names the package in its message only)."""
    if not isinstance(error, ModuleNotFoundError):
        return None
    text = f"{error.name} {error}"
    return next((extra for module, extra in OPTIONAL_EXTRAS.items() if module in text), None)


def raised_in(error: BaseException, folder: str) -> bool:
    """Whether ``error`` came from inside the package ``folder`` (``/torch/optim/``: an
    optimiser checking its args)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and folder in Path(frames[-1].filename).as_posix()


#: Where in Lightning a missing package is found out, by the trainer setting that needs it.
REQUIRING_SETTINGS = {
    "/lightning/fabric/accelerators/": "trainer.accelerator",
    "/lightning/pytorch/accelerators/": "trainer.accelerator",
    "/strategies/": "trainer.strategy",
    "/plugins/precision/": "trainer.precision",
}


def unmet_requirement(error: BaseException) -> str | None:
    """The package Lightning says is missing when a setting needs one that is not installed
    (``--trainer.accelerator tpu`` without ``torch_xla``: "Requirement 'torch_xla>=1.13' not
    met. HINT: ..."), or None."""
    found = re.match(r"Requirement '([^']+)' not met", str(error))
    return found.group(1) if isinstance(error, ModuleNotFoundError) and found else None


def parser_message(message: str) -> str:
    """jsonargparse's message without its machinery, with a suggestion for a misspelt option."""
    lines = [line for line in message.splitlines() if line.strip() and not PARSER_NOISE.match(line)]
    if len(lines) > 1:
        indent = min(len(line) - len(line.lstrip()) for line in lines[1:])
        lines = [lines[0], *("  " + line[indent:] for line in lines[1:])]
    text = re.sub(r"<class '([\w.]+)'>", r"\1", "\n".join(lines))
    # Python's advice for an integer of thousands of digits is for programmers
    text = text.replace(
        "; use sys.set_int_max_str_digits() to increase the limit",
        ": no size or count is that large",
    )
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
    # YAML reads 1e8 as a float, which an integer option refuses
    whole = re.search(r"Expected a int\. Got value: (\d+)\.0$", text, re.MULTILINE)
    if whole:
        text += f"\n  Write a whole number without a point or exponent: {whole.group(1)}"
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
    """Read every ``--config`` YAML file first, so that a mistake names its file (jsonargparse
    reports a syntax error as coming from ``<unicode string>``, and raises on bytes that are not
    UTF-8 or on an alias bomb): UTF-8 text, valid YAML, at most :data:`MAX_YAML_NODES` values
    once aliases are expanded, a mapping of sections.

    Raises:
        ConfigError: what is wrong with which file, and how to fix it.
    """
    for path in config_files(argv):
        if path.is_file():  # otherwise jsonargparse says it does not exist
            check_config_file(path)


#: The most values a config may expand to: a real one has a few hundred; a file of nested
#: aliases ("billion laughs") expands a few lines to billions and exhausts the memory.
MAX_YAML_NODES = 100_000
#: Byte-order marks of the encodings editors save "Unicode" text in, by name.
BYTE_ORDER_MARKS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def check_config_file(path: Path) -> None:
    """One config file: see :func:`check_config_files`."""
    fix = "Save it as UTF-8 text (the default of most editors), or give the config you meant"
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"config {path} cannot be read ({error.strerror}): give a config this user can "
            f"read, e.g. fix its permissions (chmod a+r {path}) or copy it somewhere readable"
        ) from error
    encoding = next((name for mark, name in BYTE_ORDER_MARKS.items() if raw.startswith(mark)), None)
    if encoding is not None:
        raise ConfigError(f"config {path} is {encoding} text; vaeflow reads UTF-8. {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}): "
            f"it may be a binary file or another encoding. {fix}"
        ) from error
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases are not expanded yet
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(
            f"{path} is not valid YAML: {problem}{where}. Check the brackets, quotes and "
            "indentation there (YAML indents with spaces, not tabs)"
        ) from error
    if expanded_size(node, {}) > MAX_YAML_NODES:
        raise ConfigError(
            f"config {path} expands to more than {MAX_YAML_NODES:,} values through nested "
            "aliases (*name), which would exhaust the memory: write the values out, or use "
            "aliases that are not nested"
        )
    if not isinstance(node, yaml.MappingNode):
        what = "empty (or only comments)" if node is None else f"a YAML {node.id}"
        raise ConfigError(
            f"config {path} is {what}, not a mapping of sections such as model:, data: and "
            "trainer:. Start from a shipped config, e.g. configs/quickstart.yaml"
        )


def expanded_size(node: yaml.Node | None, sizes: dict[int, int]) -> int:
    """How many values ``node`` holds once its aliases are expanded, counted on the composed
    graph (an alias is the same node object: ``sizes`` memoises each, so a bomb costs its
    length in lines, not its expansion)."""
    if node is None:
        return 0
    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


#: Precisions whose weights and data stay in one float type the models compute in; the
#: ``-true`` half precisions give weights of another type than the data (16-bit data lose the
#: pixels' levels): mixed precision runs the same layers in 16 bits where it is safe.
REFUSED_PRECISIONS = {
    "bf16-true": "bf16-mixed",
    "16-true": "16-mixed",
    "transformer-engine": "bf16-mixed",
    "transformer-engine-float16": "16-mixed",
}


def check_run_settings(config: Any) -> None:
    """Refuse the trainer settings and seed that Lightning would take and then fail on with a
    traceback (a division by zero, an overflow, a dtype mismatch in the first step).

    Args:
        config: the subcommand's parsed config (``seed_everything``, ``trainer``).

    Raises:
        ConfigError: the setting, what is wrong with it and what to set instead.
    """
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"seed_everything={seed} is out of range: a seed is an integer from 0 to "
            f"{MAX_SEED} (2**32 - 1), e.g. seed_everything: 0"
        )
    trainer = config.trainer
    for name in ("val_check_interval", "check_val_every_n_epoch"):
        value = trainer.get(name)
        if value is not None and value <= 0:
            raise ConfigError(
                f"trainer.{name}={value}: validation needs a positive interval; to skip "
                "validation set trainer.limit_val_batches: 0"
            )
    if trainer.get("gradient_clip_val") not in (None, 0, 0.0):
        raise ConfigError(
            "trainer.gradient_clip_val: vaeflow's models step their optimisers themselves "
            "(Lightning's manual optimisation), which the trainer's clipping does not reach. Set "
            "model.init_args.gradient_clip_val instead (VAE; EM models take no gradient steps)"
        )
    if trainer.get("accumulate_grad_batches") not in (None, 1):
        raise ConfigError(
            "trainer.accumulate_grad_batches: vaeflow's models step their optimisers themselves "
            "(Lightning's manual optimisation), which the trainer's accumulation does not reach. "
            "Use a larger data.init_args.batch_size instead"
        )
    precision = str(trainer.get("precision"))
    if precision in REFUSED_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} casts the weights but not the data, so the first "
            f"step fails: use {REFUSED_PRECISIONS[precision]} (mixed precision), or 32-true"
        )
