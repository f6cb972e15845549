"""Checkpoints survive upgrades: the tiny checkpoints of every model and registered family that
each checkpoint format's release wrote (``tests/data/checkpoints/format_<n>/``, made by
``tests/make_checkpoint_fixtures.py``) load in this vaeflow and give the numbers they gave
then; earlier formats are migrated; a newer format is refused with a message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_resume import fit

from vaeflow import models
from vaeflow.checkpointing import FORMAT, FORMAT_KEY, read_checkpoint
from vaeflow.cli import main
from vaeflow.errors import CheckpointError
from vaeflow.registry import LIKELIHOODS, POSTERIORS, PRIORS

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = DATA / "checkpoints"
REPO = Path(__file__).resolve().parents[1]
#: Same numbers up to float32 round-off across platforms and torch releases.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def fixtures() -> list[tuple[Path, str, dict]]:
    found = []
    for record in sorted(FIXTURES.glob("format_*/expected.json")):
        for name, expected in json.loads(record.read_text()).items():
            found.append((record.parent / f"{name}.ckpt", name, expected))
    return found


@pytest.mark.parametrize(
    ("path", "name", "expected"), fixtures(), ids=[f"{p.parent.name}/{n}" for p, n, _ in fixtures()]
)
def test_every_kept_checkpoint_loads_and_gives_its_numbers(path, name, expected) -> None:
    model = getattr(models, expected["class"]).load_from_checkpoint(path)
    dtype = torch.float64 if "log_likelihood" in expected else torch.float32
    x = torch.tensor(expected["x"], dtype=dtype)
    with torch.no_grad():
        if "log_likelihood" in expected:
            found = {"log_likelihood": model.log_likelihood(x)}
        else:
            z = torch.linspace(-1, 1, 2 * model.latent_dim).reshape(2, model.latent_dim)
            torch.manual_seed(1)
            found = {"elbo": model.elbo(x), "decoded": model.decode(z).mean.flatten()}
    for key, value in found.items():
        torch.testing.assert_close(
            value.double(), torch.tensor(expected[key], dtype=torch.float64), **TOLERANCE
        )


def test_the_current_format_has_a_checkpoint_of_every_model_and_family() -> None:
    """A family registered later gets its fixture (run tests/make_checkpoint_fixtures.py)."""
    names = json.loads((FIXTURES / f"format_{FORMAT}" / "expected.json").read_text())
    wanted = {"factor_analysis", "ppca", "bayesian_factor_analysis", "mixture_of_factor_analyzers"}
    for kind, registry in (
        ("likelihood", LIKELIHOODS),
        ("prior", PRIORS),
        ("posterior", POSTERIORS),
    ):
        wanted |= {f"vae_{kind}_{name}" for name in registry.names()}
    assert wanted <= set(names)
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*"))
    assert total < 1_000_000


def test_a_checkpoint_before_formats_is_migrated() -> None:
    """Format 0, written before formats were recorded: a VAE from before posteriors."""
    checkpoint = read_checkpoint(DATA / "vae_before_posteriors.ckpt")
    assert checkpoint[FORMAT_KEY] == FORMAT
    assert checkpoint["hyper_parameters"]["posterior"] == "diagonal_gaussian"


def test_a_checkpoint_of_a_newer_vaeflow_is_refused(tmp_path, monkeypatch, capsys) -> None:
    newer = read_checkpoint(FIXTURES / "format_1" / "vae_likelihood_bernoulli.ckpt")
    newer[FORMAT_KEY] = FORMAT + 1
    path = tmp_path / "newer.ckpt"
    torch.save(newer, path)
    message = f"written by a newer vaeflow (checkpoint format {FORMAT + 1}; this vaeflow reads"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        models.VAE.load_from_checkpoint(path)
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit) as stop:
        main(["test", "--config", config, "--ckpt_path", str(path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_write_the_current_format(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart.yaml")
    assert fit("--config", config, "--trainer.max_steps", "1", "--trainer.callbacks", "[]") == 0
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)[FORMAT_KEY] == FORMAT
