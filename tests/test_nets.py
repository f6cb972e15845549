"""Convolutional encoder and decoder for 28x28 and 32x32 images, and the conv CIFAR-10 config on
CIFAR-shaped pixels (the real archive is not in the test data)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vaeflow.cli import main
from vaeflow.errors import ConfigError
from vaeflow.models import VAE
from vaeflow.nets import ConvDecoder, ConvEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("image", [(1, 28, 28), (3, 32, 32)])
def test_conv_encoder_and_decoder_shapes(image: tuple[int, int, int]) -> None:
    encoder = ConvEncoder(image, (10,))
    assert encoder(torch.rand(4, *image)).shape == (4, 10)
    assert encoder(torch.rand(2, 4, *image)).shape == (2, 4, 10)  # any leading dimensions
    output = (2 * image[0], *image[1:])  # two parameters per sub-pixel
    decoder = ConvDecoder((5,), output)
    assert decoder(torch.randn(3, 4, 5)).shape == (3, 4, *output)


def test_a_conv_vae_trains_on_images_with_a_two_parameter_likelihood() -> None:
    torch.manual_seed(0)
    model = VAE(
        (1, 28, 28), latent_dim=4, likelihood="laplace", encoder=ConvEncoder, decoder=ConvDecoder
    )
    x = torch.rand(8, 1, 28, 28)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.elbo(x).mean().item()
    for _ in range(20):
        optimiser.zero_grad()
        (-model.elbo(x).mean()).backward()
        optimiser.step()
    assert model.elbo(x).mean().item() > before
    assert model.sample(2).shape == (2, 1, 28, 28)


def test_conv_nets_refuse_flat_or_odd_shapes() -> None:
    with pytest.raises(ConfigError, match="flatten: false"):
        ConvEncoder((784,), (10,))
    with pytest.raises(ConfigError, match="divisible by 4"):
        ConvDecoder((5,), (1, 30, 30))


def test_the_cifar10_config_runs_a_step_with_bits_per_dim(tmp_path, monkeypatch) -> None:
    """configs/conv_vae_cifar10.yaml, its data swapped for 16 random 8-bit images of CIFAR's
    shape: one step, then bits/dim with no offset (the likelihood is a mass on the levels)."""
    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "cifar.npy", images)
    config = yaml.safe_load((REPO / "configs" / "conv_vae_cifar10.yaml").read_text())
    assert config["data"]["class_path"] == "vaeflow.data.CIFAR10DataModule"
    config["data"] = {
        "class_path": "vaeflow.data.ArrayDataModule",
        "init_args": {"path": str(tmp_path / "cifar.npy"), "flatten": False, "batch_size": 8},
    }
    config["model"]["init_args"]["eval_samples"] = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(
        [
            "fit",
            "--config",
            "run.yaml",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    header, *rows = metrics.read_text().splitlines()
    values = dict(zip(header.split(","), rows[-1].split(","), strict=True))
    elbo, bits = float(values["train/elbo"]), float(values["train/elbo_bits_per_dim"])
    assert bits == pytest.approx(-elbo / (3 * 32 * 32 * math.log(2)), rel=1e-4)


def test_nets_by_registered_name_from_the_cli(tmp_path, monkeypatch) -> None:
    """``encoder: conv_encoder`` works in YAML as ``likelihood: bernoulli`` does: the run's
    config keeps the names and its checkpoint reloads the convolutional nets."""
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--model.init_args.encoder=conv_encoder",
            "--model.init_args.decoder=conv_decoder",
            "--data.init_args.flatten=false",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (run,) = (tmp_path / "runs").glob("*/version_*")
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert (config["encoder"], config["decoder"]) == ("conv_encoder", "conv_decoder")
    model = VAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.encoder, ConvEncoder) and isinstance(model.decoder, ConvDecoder)
