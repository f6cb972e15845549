"""The example plugin in plugins/, installed for real: its entry point adds a likelihood that
`vaeflow list` shows and a config can use by name, without any change to vaeflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaeflow.registry import Registry

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "vaeflow-student-t"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin pip-installed into a private folder (not into the test environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
    )
    return target


def vaeflow(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "vaeflow", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_the_entry_point_registers_the_family(installed_plugin, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugin))
    registry = Registry("likelihood", "vaeflow.likelihoods")
    likelihood = registry.build("student_t")
    likelihood.bind((3,))
    dist = likelihood(torch.zeros(2, likelihood.num_outputs))
    assert dist.event_shape == (3,) and dist.batch_shape == (2,)
    sys.modules.pop("vaeflow_student_t", None)


def test_list_shows_the_plugin_and_a_config_uses_it_by_name(installed_plugin, tmp_path) -> None:
    listed = vaeflow(installed_plugin, "list", cwd=tmp_path)
    assert listed.returncode == 0 and "student_t" in listed.stdout
    fit = vaeflow(
        installed_plugin,
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--model.init_args.likelihood",
        "student_t",
        "--data.init_args.binarize",
        "none",
        "--trainer.fast_dev_run",
        "1",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
