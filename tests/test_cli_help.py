"""What the ``vaeflow`` command tells a new user: the options of the shipped models and data
modules, registered names with options of their own, ``vaeflow list`` whole at any width and as
JSON, ``vaeflow --help`` and ``--version``, and those answers without importing Lightning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from vaeflow import data as shipped_data
from vaeflow import models as shipped_models
from vaeflow.cli import main
from vaeflow.models import VAE, FactorAnalysis
from vaeflow.registry import LIKELIHOODS, NETS, POSTERIORS, PRIORS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
#: a fit of a few batches of the bundled digits, writing into the test's folder
TINY_FIT = [
    "--data",
    "DigitsDataModule",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]


def help_text(capsys: pytest.CaptureFixture, *args: str) -> str:
    """What ``vaeflow ARGS`` prints before exiting 0 (help exits)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def unwrapped(text: str) -> str:
    """``text`` with every run of white space (its line wrapping) one space."""
    return " ".join(text.split())


def vaeflow(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """``python -m vaeflow ARGS`` with its output piped, in a terminal of ``columns``."""
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "vaeflow", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )


@pytest.mark.parametrize("config", [[], ["--config", QUICKSTART]], ids=["bare", "config"])
def test_fit_help_shows_the_options_of_the_shipped_models_and_data_modules(
    capsys: pytest.CaptureFixture, config: list[str]
) -> None:
    text = help_text(capsys, "fit", *config, "--help")
    for option in ("--model.latent_dim", "--model.likelihood", "--model.noise", "--data.root"):
        assert option in text
    for name in shipped_models.__all__:  # every model and data module a newcomer can pick
        assert f"--model {name}" in text
    for name in set(shipped_data.__all__) - {"InMemoryDataModule"}:  # the base, not a choice
        assert f"--data {name}" in text
    assert "torch.nn.Identity" not in text and "torchvision.ops" not in text
    assert "``" not in text


def test_short_class_names_show_one_class_in_under_200_lines(
    capsys: pytest.CaptureFixture,
) -> None:
    for option, name, expected in [
        ("--model.help", "VAE", "--model.latent_dim"),
        ("--model.help", "FactorAnalysis", "--model.noise"),
        ("--data.help", "DigitsDataModule", "--data.batch_size"),
    ]:
        text = help_text(capsys, "fit", option, name)
        assert expected in text
        assert len(text.splitlines()) < 200, (name, len(text.splitlines()))


def test_network_help_lists_the_registered_nets_not_every_module_installed(
    capsys: pytest.CaptureFixture,
) -> None:
    text = unwrapped(help_text(capsys, "fit", "--model.help", "VAE"))
    assert "registered nets: conv_decoder, conv_encoder, mlp" in text
    assert "registered likelihoods: bernoulli, beta, categorical," in text
    assert "torch.nn.Identity" not in text and "torchvision" not in text


@pytest.mark.parametrize(
    ("option", "name", "expected"),
    [
        ("--model.likelihood.help", "gaussian", "--likelihood.variance"),
        ("--model.prior.help", "vamp", "--prior.components"),
        ("--model.encoder.help", "mlp", "--encoder.hidden"),
    ],
)
def test_help_of_a_registered_name(
    capsys: pytest.CaptureFixture, option: str, name: str, expected: str
) -> None:
    assert expected in help_text(capsys, "fit", "--config", QUICKSTART, option, name)


def test_a_registered_name_takes_its_own_options_and_trains(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--model",
            "VAE",
            "--model.likelihood",
            "gaussian",
            "--model.likelihood.variance",
            "fixed",
            "--model.encoder",
            "mlp",
            "--model.encoder.hidden",
            "[16]",
            *TINY_FIT,
        ]
    )
    (run,) = (tmp_path / "runs").glob("*/version_*")
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert config["likelihood"]["class_path"] == "vaeflow.likelihoods.GaussianLikelihood"
    assert config["likelihood"]["init_args"]["variance"] == "fixed"
    assert config["encoder"]["init_args"]["hidden"] == [16]
    assert config["decoder"] == "mlp"  # a name given alone stays a name
    assert list((run / "checkpoints").glob("*.ckpt"))


def test_a_registered_name_as_a_class_path_in_yaml(capsys, tmp_path) -> None:
    """``likelihood: {class_path: gaussian, init_args: ...}``, as a short class name would be;
    options after a name given by the config apply to it."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n"
        "  class_path: VAE\n"
        "  init_args:\n"
        "    likelihood: {class_path: gaussian, init_args: {variance: fixed, std: 0.5}}\n"
        "    prior: vamp\n"
        "data: DigitsDataModule\n"
    )
    text = help_text(
        capsys, "fit", "--config", str(config), "--model.prior.components", "7", "--print_config"
    )
    model = yaml.safe_load(text)["model"]["init_args"]
    assert model["likelihood"]["class_path"] == "vaeflow.likelihoods.GaussianLikelihood"
    assert model["likelihood"]["init_args"]["std"] == 0.5
    assert model["prior"]["class_path"] == "vaeflow.priors.VampPrior"
    assert model["prior"]["init_args"]["components"] == 7


def test_which_parameters_take_registered_names() -> None:
    from vaeflow.registry import registry_of

    hints = typing.get_type_hints(VAE.__init__)
    found = {name: registry_of(hint) for name, hint in hints.items()}
    assert found["likelihood"] is LIKELIHOODS and found["prior"] is PRIORS
    assert found["encoder"] is NETS and found["decoder"] is NETS
    assert found["latent_dim"] is None and found["optimizer"] is None
    assert not any(registry_of(h) for h in typing.get_type_hints(FactorAnalysis.__init__).values())


def test_list_is_whole_at_80_columns_and_when_piped() -> None:
    out = vaeflow("list", columns=80).stdout
    [line] = [line for line in out.splitlines() if "continuous_bernoulli" in line]
    assert "vaeflow.likelihoods.ContinuousBernoulliLikelihood" in line
    assert "…" not in out and "``" not in out
    listing = json.loads(vaeflow("list", "--json", columns=80).stdout)
    names = {entry["name"]: entry for entry in listing["likelihoods"]}
    assert names["continuous_bernoulli"]["class_path"].endswith("ContinuousBernoulliLikelihood")
    assert {e["name"] for e in listing["nets"]} == {"mlp", "conv_encoder", "conv_decoder"}


def test_list_one_kind_or_one_entry_with_its_options(capsys: pytest.CaptureFixture) -> None:
    main(["list", "priors"])
    out = capsys.readouterr().out
    assert "vaeflow.priors.VampPrior" in out and "bernoulli" not in out
    main(["list", "likelihood", "gaussian"])
    out = capsys.readouterr().out
    assert "vaeflow.likelihoods.GaussianLikelihood" in out
    assert "variance: Literal['fixed', 'shared', 'per_dimension'] = 'shared'" in out
    assert "``" not in out and ":class:" not in out
    main(["list", "vamp", "--json"])
    entry = json.loads(capsys.readouterr().out)
    assert entry["class_path"] == "vaeflow.priors.VampPrior"
    assert [o["name"] for o in entry["options"]] == ["components", "init_range"]
    assert entry["options"][0]["default"] == 500


def test_list_refuses_an_unknown_name_with_the_names_it_knows(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "gausian"])
    assert exit_info.value.code == 2
    assert "'gausian'" in capsys.readouterr().err


def test_list_help(capsys: pytest.CaptureFixture) -> None:
    text = help_text(capsys, "list", "--help")
    assert "vaeflow list" in text and "--json" in text and "KIND" in text


def test_top_level_help_lists_every_subcommand_whole_and_version(
    capsys: pytest.CaptureFixture,
) -> None:
    text = help_text(capsys, "--help")
    assert "Lightning Trainer command line tool" not in text
    for subcommand in ("fit", "validate", "test", "predict", "list"):
        assert f"\n    {subcommand} " in text
    assert "you never run on your test set" not in text  # Lightning's docstring, cut
    assert help_text(capsys, "--version").startswith("vaeflow 0.1.0 (lightning ")


def test_help_list_and_version_answer_without_importing_lightning() -> None:
    """Importing Lightning is most of a training command's start-up; these need none of it
    (benchmarks/cli_startup.py measures the times)."""
    code = (
        "import sys, contextlib, io; from vaeflow.cli import main\n"
        "for args in (['list'], ['list', 'gaussian'], ['--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(args)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'jsonargparse')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]"


def test_plain_text_drops_rest_markup() -> None:
    from vaeflow.listing import plain_text

    text = "``x`` of :class:`~vaeflow.nets.MLP`, :func:`vaeflow.metrics.bits_per_dim`, `y`"
    assert plain_text(text) == "x of MLP, vaeflow.metrics.bits_per_dim, y"


def test_a_misspelt_name_or_option_after_a_name_is_named_with_the_right_one(capsys) -> None:
    for mistake, expected in [
        (["gausian", "--model.likelihood.variance"], "Did you mean 'gaussian'?"),
        (["gaussian", "--model.likelihood.varianse"], "Did you mean 'variance'?"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--model", "VAE", "--model.likelihood", *mistake, "fixed", *TINY_FIT])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_the_parser_reads_a_name_with_options_as_its_class() -> None:
    """The forms the parser of a class's init args receives: the command line's
    ``--key=value`` (name and options together, or the name given earlier), and config blocks."""
    from jsonargparse import Namespace

    from vaeflow.cli_parser import VaeflowArgumentParser

    parser = VaeflowArgumentParser()
    parser.add_class_arguments(VAE)
    assert parser.registered == {
        "likelihood": LIKELIHOODS,
        "prior": PRIORS,
        "encoder": NETS,
        "decoder": NETS,
        "posterior": POSTERIORS,
    }
    args, _ = parser.names_with_options_as_class_paths(
        [
            "--likelihood=gaussian",
            "--likelihood.variance=fixed",
            "--prior.help=vamp",
            "--decoder=mlp",
        ],
        None,
    )
    assert args == [
        "--likelihood=vaeflow.likelihoods.GaussianLikelihood",
        "--likelihood.variance=fixed",
        "--prior.help=vaeflow.priors.VampPrior",
        "--decoder=mlp",
    ]
    _, earlier = parser.names_with_options_as_class_paths(
        ["--encoder.hidden=[8]"], Namespace(encoder="mlp", decoder="mlp")
    )
    assert earlier.encoder.class_path == "vaeflow.nets.MLP" and earlier.decoder == "mlp"
    block = parser.class_path_names_resolved(
        Namespace(likelihood=Namespace(init_args=Namespace(variance="fixed"))),
        Namespace(likelihood="gaussian"),
    )
    assert block.likelihood.class_path == "vaeflow.likelihoods.GaussianLikelihood"
    config = parser.class_path_names_resolved({"prior": {"class_path": "vamp"}}, None)
    assert config == {"prior": {"class_path": "vaeflow.priors.VampPrior"}}


def test_a_google_style_docstring_splits_into_text_and_arguments() -> None:
    from vaeflow.listing import parse_docstring

    doc = (
        "Summary line.\n\nMore text.\n\nArgs:\n    alpha: first line\n        and its rest.\n"
        "    beta (int): the second.\n\nRaises:\n    ValueError: never listed as an argument.\n"
    )
    assert parse_docstring(doc) == (
        "Summary line.\n\nMore text.",
        {"alpha": "first line and its rest.", "beta": "the second."},
    )


def test_an_unknown_subcommand_is_named_with_the_closest_one(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["lst"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'lst'. Did you mean 'list'?" in err and "predict, list" in err
