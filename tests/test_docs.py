"""The documentation: every code block of README.md and docs/ runs as printed, and the site
builds with ``mkdocs build --strict`` (broken links and anchors fail it).

Each page's blocks run in order in a fresh working folder holding a copy of ``configs/`` and a
writable ``data/`` whose MNIST and Fashion-MNIST archives link to the local copy (the configs'
``root: data``), so later blocks see what earlier ones wrote (a run folder, a file):

- ``bash``: run by bash with ``set -e``. ``vaeflow fit|validate|test|predict`` commands get
  :data:`SMOKE` appended (one epoch of two batches), so a page's examples take seconds, not the
  hours of the real runs; everything else in the command is parsed as printed. The README's
  install lines run without their ``python3 -m venv .venv && .venv/bin/pip install -e ...``
  prefix (the test runs inside the installed environment); the one that runs the test suite
  must be the line CI runs (``.ci/run``) and is checked there, not run inside itself.
- ``python``: run by the environment's Python in the working folder.
- ``yaml``: a config fragment, parsed by ``vaeflow fit --print_config`` over the quickstart's
  config (the fragment's keys and types checked as a run would).
- ``toml``: parsed.
- A block whose first line is a comment naming a file (``# fa.yaml``, ``# residual_mlp.py``)
  is written to that file; a Python file is then run once (it must import).
- ``text``: printed output, not run.
- A block whose first line is ``# not run by the tests: <reason>`` is skipped; the reason is
  shown to readers, and :data:`MAX_NOT_RUN` keeps the list short.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MNIST_FILES, MNIST_NAMES, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
#: Appended to ``vaeflow fit|validate|test|predict``: one epoch of two batches per split.
SMOKE = (
    "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 2 "
    "--trainer.limit_test_batches 2 --trainer.limit_predict_batches 2 "
    "--trainer.enable_progress_bar false"
)
NOT_RUN = re.compile(r"#\s*not run by the tests: (.+)")
FILE_NAME = re.compile(r"#\s*([\w./-]+\.(py|yaml|toml|csv))\s*$")
INSTALL = re.compile(r"python3 -m venv \.venv && \.venv/bin/pip install -e \S+ && ")
#: Most blocks that may be marked as not run (multi-machine launchers, GPUs, installs).
MAX_NOT_RUN = 8
#: Pages whose examples run by default; the others' (many vaeflow runs, MNIST, several
#: processes: about 15 minutes on two loaded cores) run with ``pytest -m slow``, as .ci/run does.
FAST_PAGES = ("README.md", "getting-started.md", "plugins.md", "fa-data-analysis.md")
#: A bash function in front of every shell block (see the module's docstring).
WRAPPER = f"""
vaeflow() {{
  case "$1" in
    fit|validate|test|predict)
      case " $* " in
        *help*|*--print_config*) command vaeflow "$@" ;;
        *) command vaeflow "$@" {SMOKE} ;;
      esac ;;
    *) command vaeflow "$@" ;;
  esac
}}
set -e
"""


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0]

    @property
    def not_run(self) -> re.Match[str] | None:
        """The annotation, on the first line (after a script's ``#!`` line)."""
        return NOT_RUN.match(self.code.removeprefix("#!/bin/bash\n"))

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.language})"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with list items' indentation removed."""
    found, lines, index = [], page.read_text().splitlines(), 0
    while index < len(lines):
        opening = re.fullmatch(r"( *)```(\w*)\s*", lines[index])
        index += 1
        if not opening:
            continue
        indent, start, body = opening.group(1), index, []
        while lines[index].strip() != "```":
            body.append(lines[index].removeprefix(indent))
            index += 1
        index += 1
        found.append(Block(page, start, opening.group(2), "\n".join(body) + "\n"))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def workdir(tmp_path: Path) -> Path:
    """A writable folder with the configs and the local MNIST archives under ``data/``."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    source = shared_data_dir()
    for name in MNIST_NAMES:
        raw = tmp_path / "data" / name / "raw"
        raw.mkdir(parents=True)
        for file in MNIST_FILES:
            if (source / name / "raw" / file).is_file():
                (raw / file).symlink_to(source / name / "raw" / file)
    return tmp_path


def ci_lines() -> set[str]:
    return {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}


def run(args: list[str], cwd: Path, block: Block) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "WANDB_MODE": "offline",  # no account in CI
        "HOME": str(cwd),
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{block} failed:\n{block.code}\n{result.stdout[-3000:]}\n" + (result.stderr[-3000:])
    )


def run_shell(block: Block, cwd: Path) -> None:
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        if INSTALL.match(line):
            if line.strip() in ci_lines():
                continue  # the test suite itself: CI runs exactly this line
            line = INSTALL.sub("", line).replace(".venv/bin/", "")
        commands.append(line)
    run(["bash", "-c", WRAPPER + "\n".join(commands)], cwd, block)


def execute(block: Block, cwd: Path) -> None:
    named = FILE_NAME.fullmatch(block.first_line)
    if named:
        path = cwd / named.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
    if block.language == "bash":
        run_shell(block, cwd)
    elif block.language == "python":
        code = ["python", str(path)] if named else ["python", "-c", block.code]
        run(code, cwd, block)
    elif block.language == "yaml" and not named:
        fragment = cwd / "fragment.yaml"
        fragment.write_text(block.code)
        config = ["--config", "configs/quickstart.yaml", "--config", str(fragment)]
        run(["vaeflow", "fit", *config, "--print_config"], cwd, block)
    elif block.language == "toml":
        pytest.importorskip("tomllib").loads(block.code)  # Python >= 3.11


def page_params() -> list[pytest.param]:
    return [
        pytest.param(
            page,
            id=str(page.relative_to(REPO)),
            marks=[] if page.name in FAST_PAGES else [pytest.mark.slow],
        )
        for page in PAGES
        if any(block.language != "text" for block in blocks(page))
    ]


@pytest.mark.parametrize("page", page_params())
def test_every_code_block_runs_as_printed(page: Path, tmp_path: Path) -> None:
    cwd = workdir(tmp_path)
    for block in blocks(page):
        if block.language == "text" or block.not_run:
            continue
        execute(block, cwd)


def test_every_block_is_code_or_output_and_few_are_not_run() -> None:
    """Every block names its language (so that it is run, or shown as output), and the blocks
    that the tests cannot run say why, visibly, and stay few."""
    everything = all_blocks()
    known = {"bash", "python", "yaml", "toml", "text"}
    assert not [str(b) for b in everything if b.language not in known]
    not_run = [(str(b), b.not_run) for b in everything]
    reasons = {where: match.group(1) for where, match in not_run if match}
    assert all(len(reason) >= 20 for reason in reasons.values()), reasons
    assert len(reasons) <= MAX_NOT_RUN, reasons


def test_the_readme_commands_are_the_ones_ci_and_users_run() -> None:
    """The two commands of the README, byte for byte; CI runs the second."""
    readme = (REPO / "README.md").read_text()
    train = (
        "python3 -m venv .venv && .venv/bin/pip install -e . && "
        ".venv/bin/vaeflow fit --config configs/quickstart.yaml"
    )
    test = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/pytest'
    assert f"```bash\n{train}\n```" in readme and f"```bash\n{test}\n```" in readme
    assert test in ci_lines()


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page, the API reference from the docstrings, the
    notebooks; a link to a missing page or anchor fails it."""
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=tmp_path,  # mkdocs-jupyter's cache goes there
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (site / "reference" / "models" / "index.html").is_file()
    reference = (site / "reference" / "models" / "index.html").read_text()
    assert "log_likelihood" in reference  # FactorAnalysis.log_likelihood's docstring
    assert (site / "notebooks" / "02_em_and_the_elbo" / "index.html").is_file()


def test_the_readme_links_to_files_that_exist() -> None:
    """The README is read on the repository's page, outside the site: its relative links."""
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert targets and not [t for t in targets if not (REPO / t).exists()]
