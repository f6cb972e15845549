"""Plugins: ``vaeflow list`` names the installed package each entry came from, registration
refuses a class that would not survive a checkpoint (an argument not kept as an attribute), a
part of the wrong shape or type is refused when a VAE binds it, and a plugin that exits on import
is skipped."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

from vaeflow import listing
from vaeflow.errors import ConfigError
from vaeflow.likelihoods import Likelihood
from vaeflow.models import VAE
from vaeflow.posteriors import DiagonalGaussianPosterior
from vaeflow.priors import Prior, PriorContext
from vaeflow.registry import LIKELIHOODS, NO_PLUGINS_ENV, REGISTRIES, Registry

PLUGIN = '''
from vaeflow.likelihoods import Likelihood
from vaeflow.models import VAE
from vaeflow.posteriors import DiagonalGaussianPosterior
from vaeflow.priors import Prior, PriorContext


class Heavy(Likelihood):
    """A heavy-tailed family from a plugin."""

    def __init__(self, df: float = 3.0) -> None:
        super().__init__()
        self.df = df


class Forgetful(Likelihood):
    """Keeps its argument under another name."""

    def __init__(self, df: float = 3.0) -> None:
        super().__init__()
        self.degrees = df
'''


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution ``vaeflow-heavy 2.5`` (a .dist-info) with two likelihoods."""
    (tmp_path / "vaeflow_heavy.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "vaeflow_heavy-2.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vaeflow-heavy\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text(
        "[vaeflow.likelihoods]\nheavy = vaeflow_heavy:Heavy\nforgetful = vaeflow_heavy:Forgetful\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(NO_PLUGINS_ENV, raising=False)
    yield tmp_path
    sys.modules.pop("vaeflow_heavy", None)


def test_vaeflow_list_names_the_package_of_every_entry(
    installed_plugin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    likelihoods = Registry("likelihood", "vaeflow.likelihoods")
    for name in LIKELIHOODS.names():  # the built-ins, registered by vaeflow's own modules
        likelihoods.add(name, LIKELIHOODS.get(name))
    monkeypatch.setenv("COLUMNS", "80")  # no cut: names, classes and packages come whole
    with pytest.warns(UserWarning, match="'forgetful'.*self.df = df"):
        assert listing.main([], registries=(likelihoods, *REGISTRIES[1:])) == 0
    lines = capsys.readouterr().out.splitlines()
    [heavy] = [line for line in lines if " heavy " in line]
    assert "vaeflow_heavy.Heavy" in heavy and "vaeflow-heavy 2.5" in heavy
    [bernoulli] = [line for line in lines if " bernoulli " in line]
    assert f"vaeflow {importlib.metadata.version('vaeflow')}" in bernoulli
    assert any("forgetful" in line and "failed to load" in line for line in lines)


def test_a_class_that_renames_an_argument_is_refused_at_registration() -> None:
    registry = Registry("likelihood", "vaeflow_test.none")

    class Renamed(Likelihood):
        def __init__(self, df: float = 3.0, scale: float = 1.0) -> None:
            super().__init__()
            self.degrees, self.scale = df, scale

    with pytest.raises(ConfigError, match=r"'df' as attributes.*add self\.df = df"):
        registry.add("renamed", Renamed)


def test_the_registration_check_leaves_the_random_stream_as_it_was() -> None:
    class RandomInit(Likelihood):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.width = width
            self.weight = torch.nn.Parameter(torch.randn(width))

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Registry("likelihood", "vaeflow_test.none").add("random_init", RandomInit)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


# -- parts exercised on two examples when a VAE binds them ----------------------------------------


class ElementParams(Likelihood):
    """The issue's plugin: builds the element distribution from ``params`` itself (shape
    ``(..., D, 1)``) instead of ``params[..., 0]``."""

    def distribution(self, params: torch.Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Bernoulli(logits=params, validate_args=False)


class WrongLogProb(Likelihood):
    """Its own log_prob returns one number per element instead of per example."""

    def distribution(self, params: torch.Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Bernoulli(logits=params[..., 0], validate_args=False)

    def log_prob(self, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self(outputs).base_dist.log_prob(x)


class Raising(Likelihood):
    def distribution(self, params: torch.Tensor) -> torch.distributions.Distribution:
        raise KeyError("scale")


class BatchedPrior(Prior):
    """Returns a batch of latent_dim one-dimensional Gaussians, not one over z."""

    def forward(self) -> torch.distributions.Distribution:
        return torch.distributions.Normal(torch.zeros(self.latent_dim), 1.0)

    def bind(self, context: PriorContext) -> None:
        self.latent_dim = context.latent_dim


class FlatPosterior(DiagonalGaussianPosterior):
    """Forgets the Independent wrapper: batch shape (N, latent_dim), event shape ()."""

    def distribution(self, params: dict[str, torch.Tensor]) -> torch.distributions.Distribution:
        return torch.distributions.Normal(params["loc"], params["scale"])


def half_decoder(input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> torch.nn.Module:
    """A net factory whose network outputs half the numbers asked for."""
    return torch.nn.Linear(math.prod(input_shape), math.prod(output_shape) // 2)


#: part -> (VAE argument, what the message must say: the class, what it returned, expected)
BROKEN_PARTS = {
    "element distribution of params": (
        {"likelihood": ElementParams()},
        r"likelihood .*ElementParams: forward\(outputs\) returned a Independent of batch shape "
        r"\(2, 6\) and event shape \(1,\); expected batch shape \(2,\) and event shape \(6,\)\. "
        r"distribution\(params\) receives params of shape \(\*data_shape, num_params\)",
    ),
    "log_prob per element": (
        {"likelihood": WrongLogProb()},
        r"WrongLogProb: log_prob\(outputs, x\) returned a tensor of shape \(2, 6\); expected a "
        r"tensor of shape \(2,\)",
    ),
    "likelihood raising": (
        {"likelihood": Raising()},
        r"likelihood .*Raising failed on a batch of 2 examples: KeyError: 'scale'",
    ),
    "prior of the wrong event shape": (
        {"prior": BatchedPrior()},
        r"prior .*BatchedPrior: forward\(\) returned a Normal of batch shape \(3,\) and event "
        r"shape \(\); expected a distribution of batch shape \(\) and event shape \(3,\)",
    ),
    "posterior without its event dimension": (
        {"posterior": FlatPosterior()},
        r"posterior .*FlatPosterior: forward\(outputs\) returned a Normal of batch shape "
        r"\(2, 3\) and event shape \(\); expected batch shape \(2,\) and event shape \(3,\)",
    ),
    "decoder of the wrong width": (
        {"decoder": half_decoder},
        r"decoder .*Linear: forward\(x\) returned a tensor of shape \(2, 3\); expected 6 "
        r"numbers for each of the 2 examples",
    ),
}


@pytest.mark.parametrize("part", BROKEN_PARTS)
def test_a_part_of_the_wrong_shape_is_refused_when_bound(part: str) -> None:
    arguments, message = BROKEN_PARTS[part]
    with pytest.raises(ConfigError, match=message):
        VAE((6,), latent_dim=3, **arguments)


def test_exercising_the_parts_leaves_the_random_stream_and_modes_as_they_were() -> None:
    """Building a VAE draws its initial weights and nothing else; its parts stay in train mode."""
    torch.manual_seed(0)
    model = VAE((6,), latent_dim=3, posterior="iaf", prior="vamp")
    after = torch.rand(3)
    torch.manual_seed(0)
    with contracts_disabled():
        reference = VAE((6,), latent_dim=3, posterior="iaf", prior="vamp")
        expected = torch.rand(3)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    for (name, value), (_, ref) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(value, ref, rtol=0, atol=0, msg=name)
    assert all(module.training for module in model.modules())


def contracts_disabled() -> contextlib.AbstractContextManager:
    """The VAE built without the contract checks (each replaced by a function doing nothing)."""
    stack = contextlib.ExitStack()
    for name in ("check_likelihood", "check_posterior", "check_net", "check_prior"):
        stack.enter_context(mock.patch(f"vaeflow.models.vae.{name}", lambda *args: None))
    return stack


def test_a_plugin_that_exits_on_import_is_skipped_not_obeyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sys.exit(0)`` in a plugin's module made every command exit 0 having done nothing."""
    (tmp_path / "vaeflow_quitter.py").write_text("import sys\nsys.exit(0)\n")
    dist = tmp_path / "vaeflow_quitter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vaeflow-quitter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vaeflow.priors]\nquitter = vaeflow_quitter:Q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(NO_PLUGINS_ENV, raising=False)
    registry = Registry("prior", "vaeflow.priors")
    with pytest.warns(UserWarning, match=r"'quitter'.*it called sys\.exit\(0\) on import"):
        failed = registry.load_plugins()
    assert failed == {"quitter": "it called sys.exit(0) on import"}
    sys.modules.pop("vaeflow_quitter", None)
