"""Plugins: ``vaeflow list`` names the installed package each entry came from, and registration
refuses a class that would not survive a checkpoint (an argument not kept as an attribute)."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vaeflow import listing
from vaeflow.errors import ConfigError
from vaeflow.likelihoods import Likelihood
from vaeflow.registry import LIKELIHOODS, NO_PLUGINS_ENV, REGISTRIES, Registry

PLUGIN = '''
from vaeflow.likelihoods import Likelihood


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
