"""The Registry: decorator, clashes, lookup errors, and discovery of real entry points."""

import sys
import textwrap

import pytest

from vaeflow.errors import ConfigError
from vaeflow.registry import LIKELIHOODS, NO_PLUGINS_ENV, PRIORS, Registry


class Base:
    """A registrable thing."""


def test_decorator_registers_and_builds() -> None:
    registry = Registry("widget", "vaeflow_test.none")

    @registry.register("plain")
    class Plain(Base):
        """Plain widget."""

    assert registry.get("plain") is Plain
    assert isinstance(registry.build("plain"), Plain)
    instance = Plain()
    assert registry.build(instance) is instance
    assert list(registry.describe()) == [
        ("plain", f"{__name__}.{Plain.__qualname__}", "Plain widget.")
    ]


def test_duplicate_names_are_refused_unless_overridden() -> None:
    registry = Registry("widget", "vaeflow_test.none")
    registry.add("a", Base)

    class Other(Base):
        pass

    with pytest.raises(ConfigError, match=r"already registered.*override=True"):
        registry.add("a", Other)
    registry.add("a", Other, override=True)
    assert registry.get("a") is Other


def test_unknown_name_lists_what_exists_and_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        LIKELIHOODS.get("bernouli")
    message = str(info.value)
    assert "Did you mean 'bernoulli'?" in message
    for name in LIKELIHOODS.names():
        assert name in message
    with pytest.raises(ConfigError, match=r"unknown prior 'laplace'.*standard_normal"):
        PRIORS.get("laplace")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info with entry_points.txt) on sys.path."""
    (tmp_path / "vaeflow_fake_plugin.py").write_text(
        textwrap.dedent(
            '''
            class Fancy:
                """A fancy family from a plugin."""
            '''
        )
    )
    dist = tmp_path / "vaeflow_fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vaeflow-fake-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[vaeflow_test.families]\n"
        "fancy = vaeflow_fake_plugin:Fancy\n"
        "broken = vaeflow_fake_plugin_missing:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(NO_PLUGINS_ENV, raising=False)
    yield tmp_path
    sys.modules.pop("vaeflow_fake_plugin", None)


def test_entry_points_are_discovered_and_broken_plugins_named(plugin_path) -> None:
    registry = Registry("family", "vaeflow_test.families")
    with pytest.warns(UserWarning, match="plugin 'broken'.*failed to load"):
        names = registry.names()
    assert names == ["fancy"]
    assert registry.get("fancy").__name__ == "Fancy"
    assert "broken" in registry.failed_plugins
    with pytest.raises(ConfigError, match="failed to load: broken"):
        registry.get("broken")


def test_environment_variable_turns_plugins_off(plugin_path, monkeypatch) -> None:
    monkeypatch.setenv(NO_PLUGINS_ENV, "1")
    registry = Registry("family", "vaeflow_test.families")
    assert registry.names() == []
