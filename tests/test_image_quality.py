"""Image quality at ``vaeflow test``: PSNR and SSIM of reconstructions (torchmetrics) and the
variance-of-the-Laplacian sharpness of samples, checked on images whose answers are known, and
reported by the test epoch on image data only."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import gaussian_blur

from vaeflow.data import DigitsDataModule, SyntheticFADataModule
from vaeflow.image_quality import (
    ImageGeometry,
    image_geometry,
    image_quality,
    laplacian_variance,
    ssim_window,
)
from vaeflow.models import VAE

GEOMETRY = ImageGeometry((1, 28, 28), 1.0)


def images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_identical_images_have_infinite_psnr_and_ssim_one() -> None:
    x = images()
    metrics = image_quality(x.flatten(1), x.flatten(1), x.flatten(1), GEOMETRY)
    assert torch.isinf(metrics["psnr"]).all() and (metrics["psnr"] > 0).all()
    torch.testing.assert_close(metrics["ssim"], torch.ones(6))
    torch.testing.assert_close(metrics["reconstruction_sharpness"], metrics["data_sharpness"])


def test_psnr_is_the_closed_form_of_a_known_error() -> None:
    """A uniform error d on data of range R: PSNR = 10 log10(R^2 / d^2), per image; SSIM of a
    noisy copy is below 1 and falls with the noise."""
    x = images()
    for data_range, d in ((1.0, 0.1), (16.0, 0.5)):
        geometry = ImageGeometry((1, 28, 28), data_range)
        psnr = image_quality(x, x + d, x, geometry)["psnr"]
        torch.testing.assert_close(psnr, torch.full((6,), 10 * math.log10(data_range**2 / d**2)))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ssim = [image_quality(x, x + s * noise, x, GEOMETRY)["ssim"].mean() for s in (0.05, 0.2)]
    assert 1 > ssim[0] > ssim[1]


def test_laplacian_variance_of_known_images_and_blur() -> None:
    """A constant image has sharpness 0; a 0/1 checkerboard's Laplacian is +-4 everywhere, so
    16; blurring an image lowers it, more blur lower still."""
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    board = ((rows + cols) % 2).float().expand(2, 3, 28, 28)
    torch.testing.assert_close(laplacian_variance(board), torch.full((2,), 16.0))
    torch.testing.assert_close(laplacian_variance(torch.full((2, 1, 9, 9), 0.7)), torch.zeros(2))
    x = images()
    sharp, blurred, more = (
        laplacian_variance(gaussian_blur(x, 5, sigma)) if sigma else laplacian_variance(x)
        for sigma in (0, 0.8, 1.6)
    )
    assert (blurred < 0.5 * sharp).all() and (more < blurred).all()


def test_ssim_window_fits_small_images() -> None:
    assert ssim_window((1, 28, 28)) == 11
    assert ssim_window((3, 8, 8)) == 7
    assert ssim_window((1, 9, 12)) == 9


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"binarize": "static"}, ((1, 8, 8), 1.0)),
        ({}, ((1, 8, 8), 1.0)),  # scaled from 0..16 to [0, 1]
        ({"scale": False}, ((1, 8, 8), 16.0)),
        ({"dequantize": "dynamic"}, ((1, 8, 8), 1.0)),  # 17 levels, each 1/17 of [0, 1]
        ({"scale": False, "dequantize": "static"}, ((1, 8, 8), 17.0)),  # 0..16 plus [0, 1)
    ],
)
def test_the_geometry_of_image_data(options, expected) -> None:
    data = DigitsDataModule(**options)
    geometry = image_geometry(data, data.dims)
    assert geometry.shape == expected[0]
    assert geometry.data_range == pytest.approx(expected[1])


def test_data_that_are_not_pictures_have_no_geometry() -> None:
    data = SyntheticFADataModule()
    assert image_geometry(data, data.dims) is None
    assert image_geometry(object(), (784,)) is None


def test_vaeflow_test_reports_image_quality_on_image_data_only(silent_trainer) -> None:
    """On the digits the test epoch logs PSNR, SSIM and the sharpness of samples,
    reconstructions and data; the data's is the mean of :func:`laplacian_variance` over the
    test images, computed here directly. A plain tensor loader (no picture geometry) logs none."""
    torch.manual_seed(0)
    data = DigitsDataModule(binarize="static", batch_size=64)
    model = VAE(data.dims, latent_dim=4)
    trainer = silent_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    test_images = data.splits["test"].reshape(-1, 1, 8, 8).float()
    expected = laplacian_variance(test_images).mean()
    assert metrics["test/data_sharpness"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["test/sample_sharpness"] > 0 and 0 < metrics["test/psnr"] < math.inf
    assert -1 < metrics["test/ssim"] < 1
    plain_loader = DataLoader(data.splits["test"], 64)
    (plain,) = silent_trainer().test(model, plain_loader, verbose=False)
    assert not any(key in plain for key in ("test/psnr", "test/ssim", "test/sample_sharpness"))
