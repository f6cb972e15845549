"""The example plugins in plugins/, installed for real: their entry points add a likelihood and
a variational family (posterior) that `vaeflow list` shows and a config can use by name, and
that reload from the checkpoint alone, without any change to vaeflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaeflow.registry import Registry

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "vaeflow-student-t"
POSTERIOR_PLUGIN = REPO / "plugins" / "vaeflow-laplace-posterior"


def install(plugin: Path, target: Path) -> Path:
    """``plugin`` pip-installed into the folder ``target`` (not into the test environment)."""
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
            str(plugin),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The likelihood plugin, installed into a private folder."""
    return install(PLUGIN, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def installed_posterior_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The posterior plugin, installed into a private folder."""
    return install(POSTERIOR_PLUGIN, tmp_path_factory.mktemp("site"))


def vaeflow(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return python(site, "-m", "vaeflow", *args, cwd=cwd)


def fit_quickstart(site: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """``vaeflow fit`` of the quickstart config with ``overrides``, the plugin in ``site``."""
    return vaeflow(
        site, "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *overrides, cwd=cwd
    )


def python(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter that sees the plugin installed in ``site``."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    return subprocess.run(
        [sys.executable, *args],
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
    fit = fit_quickstart(
        installed_plugin,
        "--model.init_args.likelihood=student_t",
        "--data.init_args.binarize=none",
        "--trainer.fast_dev_run=1",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]


def test_a_plugin_posterior_is_listed_trains_by_name_and_reloads_alone(
    installed_posterior_plugin, tmp_path
) -> None:
    site = installed_posterior_plugin
    listed = vaeflow(site, "list", cwd=tmp_path)
    posteriors = listed.stdout.partition("posteriors (vaeflow.posteriors)")[2]
    assert listed.returncode == 0 and "laplace" in posteriors and "vaeflow_laplace_" in posteriors
    fit = fit_quickstart(
        site,
        "--model.init_args.posterior=laplace",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    (checkpoint,) = tmp_path.rglob("last.ckpt")
    reload = (
        "import sys, torch; from vaeflow.models import VAE; "
        "model = VAE.load_from_checkpoint(sys.argv[1]); "
        "elbo = model.elbo(torch.rand(3, 64).round()); "
        "print(type(model.posterior).__name__, bool(torch.isfinite(elbo).all()))"
    )
    reloaded = python(site, "-c", reload, str(checkpoint), cwd=tmp_path)
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    assert reloaded.stdout.split() == ["LaplacePosterior", "True"]
