"""The ``vaeflow`` command: every shipped config runs, runs leave their artefacts, and bad input
gets a clear message and a non-zero exit instead of a traceback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from make_h5ad_fixture import example_file

from vaeflow.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def run_cli(*args: str) -> None:
    main(list(args))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_runs_one_step(
    config: Path, tmp_path, mnist_root, monkeypatch
) -> None:
    """CIFAR-10 is not among the local data sets: its configs are parsed (``--print_config``)
    but not run."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "1"]
    data = yaml.safe_load(config.read_text())["data"]
    if "root" in data.get("init_args", {}):
        args += ["--data.init_args.root", str(mnist_root)]
    if data["class_path"].endswith("AnnDataModule"):  # the cells.h5ad it names
        pytest.importorskip("h5py", reason="h5py (vaeflow[anndata]) reads .h5ad files")
        example_file(tmp_path / data["init_args"]["path"])
    if "CIFAR" in data["class_path"]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*args, "--print_config")
        assert exit_info.value.code == 0
        return
    run_cli(*args)


def test_quickstart_leaves_a_run_folder_with_config_checkpoint_and_metrics(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs", "2")
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["model"]["class_path"]
        == "vaeflow.models.VAE"
    )
    # the epoch's checkpoint, and last.ckpt for --ckpt_path last
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "epoch=1-step=42.ckpt",
        "last.ckpt",
    ]
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert {"train/elbo", "val/elbo", "train/kl", "val/log_likelihood"} <= set(header.split(","))
    assert rows
    # a second run goes beside the first, which stays untouched
    first = (run / "metrics.csv").read_bytes()
    run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs", "1")
    assert (tmp_path / "runs" / "quickstart" / "version_1" / "metrics.csv").exists()
    assert (run / "metrics.csv").read_bytes() == first


def test_list_prints_every_likelihood_prior_and_net_with_a_description(capsys) -> None:
    run_cli("list")
    out = capsys.readouterr().out
    for text in ("bernoulli", "gaussian", "standard_normal", "learned_gaussian", "Standard normal"):
        assert text in out
    for text in ("nets (vaeflow.nets)", "mlp", "conv_encoder", "conv_decoder"):
        assert text in out


def test_print_config_shows_the_resolved_config(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", QUICKSTART, "--print_config")
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["likelihood"] == "bernoulli"
    assert config["trainer"]["max_epochs"] == 30


def expect_user_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def array_config(path: Path, likelihood: str = "bernoulli", scale: bool = True) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--data",
        "vaeflow.data.ArrayDataModule",
        "--data.path",
        str(path),
        "--data.scale",
        str(scale).lower(),
        "--data.binarize",
        "none",
        "--model.init_args.likelihood",
        likelihood,
        "--trainer.fast_dev_run",
        "1",
    ]


def test_unknown_likelihood_prior_and_net_names_list_what_exists(capsys) -> None:
    err = expect_user_error(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.likelihood", "bernouli"
    )
    assert "unknown likelihood 'bernouli'. Did you mean 'bernoulli'? Available: bernoulli, " in err
    err = expect_user_error(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.prior", "normal"
    )
    assert "unknown prior 'normal'" in err and "standard_normal" in err
    err = expect_user_error(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.encoder", "conv"
    )
    assert "unknown net 'conv'" in err
    assert "Available: conv_decoder, conv_encoder, mlp" in err


def test_a_config_key_that_does_not_exist_is_named(capsys) -> None:
    err = expect_user_error(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.latent_dimm", "3"
    )
    assert "latent_dimm" in err


def test_missing_and_misshapen_data_files(capsys, tmp_path) -> None:
    err = expect_user_error(capsys, *array_config(tmp_path / "nope.npy"))
    assert str(tmp_path / "nope.npy") in err and "not" in err
    np.save(tmp_path / "flat.npy", np.zeros(10))
    err = expect_user_error(capsys, *array_config(tmp_path / "flat.npy"))
    assert "(N, ...)" in err or "shape" in err
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    err = expect_user_error(capsys, *array_config(tmp_path / "corrupt.npy"))
    assert "corrupt.npy could not be read as .npy numeric data" in err


def test_a_sparse_tensor_file_is_a_message(capsys, tmp_path) -> None:
    torch.save(torch.eye(4).to_sparse(), tmp_path / "sparse.pt")
    err = expect_user_error(capsys, *array_config(tmp_path / "sparse.pt"))
    assert "torch.sparse_coo tensor" in err and "to_dense()" in err


def test_data_outside_the_support_and_non_finite_data(capsys, tmp_path) -> None:
    np.save(tmp_path / "big.npy", np.full((20, 4), 2.0))
    err = expect_user_error(capsys, *array_config(tmp_path / "big.npy", scale=False))
    assert "outside the support of the 'bernoulli' likelihood" in err and "scale: true" in err
    values = np.random.default_rng(0).random((20, 4))
    values[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", values)
    err = expect_user_error(capsys, *array_config(tmp_path / "nan.npy"))
    assert "NaN" in err


def test_the_console_script_exits_non_zero_without_a_traceback(tmp_path) -> None:
    np.save(tmp_path / "big.npy", np.full((20, 4), 2.0))
    result = subprocess.run(
        [sys.executable, "-m", "vaeflow", *array_config(tmp_path / "big.npy", scale=False)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "vaeflow: error: " in result.stderr


def test_an_earlier_run_is_never_overwritten(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ("fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    run_cli(*args)
    config = tmp_path / "runs" / "config.yaml"
    before = config.read_bytes()
    err = expect_user_error(capsys, *args, "--model.init_args.latent_dim", "3")
    assert "exists from an earlier run" in err
    assert config.read_bytes() == before


def test_the_default_progress_bar_redraws_every_few_steps_and_yields_to_the_config(
    tmp_path, monkeypatch
) -> None:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from vaeflow.cli import VaeflowCLI

    monkeypatch.chdir(tmp_path)
    base = ["--config", QUICKSTART]  # run=False: no subcommand
    (bar,) = [
        c
        for c in VaeflowCLI(args=base, run=False).trainer.callbacks
        if isinstance(c, TQDMProgressBar)
    ]
    assert bar.refresh_rate == 25
    mine = VaeflowCLI(args=[*base, "--trainer.callbacks+=RichProgressBar"], run=False).trainer
    assert isinstance(mine.progress_bar_callback, RichProgressBar)
    assert (
        VaeflowCLI(
            args=[*base, "--trainer.enable_progress_bar=false"], run=False
        ).trainer.progress_bar_callback
        is None
    )
