"""Bits per dimension on the data's original grid: the data modules' ``log_scale``, its link into
the model through the CLI, and what ``vaeflow fit`` logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule

from vaeflow.cli import VaeflowCLI, main
from vaeflow.data import ArrayDataModule, DigitsDataModule, SyntheticFADataModule
from vaeflow.metrics import bits_per_dim

D = 16  # values per example of the tiny image files below


@pytest.fixture
def pixels(tmp_path: Path) -> Path:
    """200 random 4x4 uint8 images (0..255): the data of a user's own .npy."""
    path = tmp_path / "pixels.npy"
    images = np.random.default_rng(0).integers(0, 256, (200, 1, 4, 4), dtype=np.uint8)
    np.save(path, images)
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: ArrayDataModule(str(p), dequantize="dynamic"), math.log(256)),
        (lambda p: ArrayDataModule(str(p), dequantize="static"), math.log(256)),
        (lambda p: ArrayDataModule(str(p)), math.log(255)),  # scaled by the range, no noise
        (lambda p: ArrayDataModule(str(p), binarize="static"), 0.0),
        (lambda p: ArrayDataModule(str(p), binarize="dynamic", dequantize="dynamic"), 0.0),
        (lambda p: ArrayDataModule(str(p), scale=False), 0.0),
        (lambda p: DigitsDataModule(dequantize="dynamic"), math.log(17)),
        (lambda p: SyntheticFADataModule(), 0.0),
    ],
)
def test_log_scale_is_the_log_of_what_each_value_was_divided_by(make, expected, pixels) -> None:
    assert make(pixels).log_scale == pytest.approx(expected, rel=1e-12)


def test_min_max_scaled_floats_have_the_log_of_their_range(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.linspace(-3.0, 5.0, 40).reshape(20, 2))
    module = ArrayDataModule(str(tmp_path / "x.npy"), scale=True)
    assert module.log_scale == pytest.approx(math.log(8.0), rel=1e-12)
    module.setup()  # the values the model sees are the raw ones, shifted, over that factor
    raw = torch.from_numpy(np.load(tmp_path / "x.npy"))[module.indices["train"]]  # float64
    torch.testing.assert_close(module.splits["train"] * 8.0 - 3.0, raw)
    assert ArrayDataModule(str(tmp_path / "x.npy")).log_scale == 0.0, "own units by default"


def fit_and_read_metrics(tmp_path: Path, pixels: Path, likelihood: str, **data: object) -> dict:
    """``vaeflow fit`` from a user's YAML over ``pixels``; the last row of its metrics.csv."""
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "vaeflow.models.VAE",
            "init_args": {"latent_dim": 2, "likelihood": likelihood},
        },
        "data": {
            "class_path": "vaeflow.data.ArrayDataModule",
            "init_args": {"path": str(pixels), "batch_size": 50, **data},
        },
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "run.yaml")])
    [metrics] = list(tmp_path.rglob("metrics.csv"))
    with metrics.open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/elbo")]
    return {name: float(value) for name, value in rows[-1].items() if value}


def test_bernoulli_on_binary_data_has_no_offset(tmp_path, pixels, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    metrics = fit_and_read_metrics(tmp_path, pixels, "bernoulli", binarize="static")
    expected = -metrics["val/elbo"] / (D * math.log(2))
    assert metrics["val/elbo_bits_per_dim"] == pytest.approx(expected, rel=1e-5)


def test_gaussian_on_dequantised_pixels_is_on_the_256_level_grid(
    tmp_path, pixels, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    metrics = fit_and_read_metrics(tmp_path, pixels, "gaussian", dequantize="dynamic")
    elbo = metrics["val/elbo"]
    expected = (-elbo + D * math.log(256)) / (D * math.log(2))
    assert metrics["val/elbo_bits_per_dim"] == pytest.approx(expected, rel=1e-5)
    # A bound on the probability of each 8-bit image: positive, at most 8 bits for noise-like
    # images plus what one short epoch leaves
    assert metrics["val/elbo_bits_per_dim"] > 0 and elbo > -D * math.log(256) * 2


class NoLogScale(LightningModule):
    """A user's model that takes the data's shape but not their log scale."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = input_shape


def test_the_cli_links_the_log_scale_and_skips_models_without_it(pixels) -> None:
    common = ["--data", "vaeflow.data.ArrayDataModule", "--data.path", str(pixels)]
    vae = ["--model", "vaeflow.models.VAE", "--model.init_args.likelihood", "gaussian"]
    cli = VaeflowCLI(args=[*vae, *common, "--data.dequantize", "dynamic"], run=False)
    assert cli.model.data_log_scale == pytest.approx(math.log(256), rel=1e-12)
    # the uniform density on [0, 1]: 8 bits per value, as uniform bytes
    assert bits_per_dim(0.0, D, cli.model.data_log_scale).item() == pytest.approx(8.0)
    other = f"{NoLogScale.__module__}.{NoLogScale.__qualname__}"
    cli = VaeflowCLI(args=["--model", other, *common], run=False)
    assert isinstance(cli.model, NoLogScale) and cli.model.input_shape == (D,)
