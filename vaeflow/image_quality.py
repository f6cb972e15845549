"""Image quality at ``vaeflow test``: how faithful reconstructions are and how sharp samples are.

Likelihoods are the VAE's measure of fit, but the lecture's question, why samples look blurry,
is about pictures. On image data (a data module whose examples are ``(C, H, W)`` pixels on a
known grid) the test epoch also reports, per example and averaged like every test metric:

- ``psnr`` and ``ssim`` of the reconstructions E[x | z = E[z|x]] against the test images, by
  torchmetrics (peak signal-to-noise ratio in dB; structural similarity with a Gaussian window
  of side 11 and width 1.5, or on a smaller image the largest odd side that fits and a width
  shrunk in proportion);
- ``sample_sharpness``: the variance of the Laplacian of samples E[x | z], z ~ p(z), the
  blurriness measure of Pech-Pacheco et al. (2000): each channel filtered with the 4-neighbour
  Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (valid region), the variance of the filtered
  values over the pixels, averaged over channels and images, on values divided by the data's
  range (so it does not depend on the scaling). ``data_sharpness`` and
  ``reconstruction_sharpness`` are the same measure of the test images and of the
  reconstructions: a blurry model's samples sit well below the data.

torchmetrics has no Laplacian-variance metric, hence :func:`laplacian_variance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

#: the 4-neighbour discrete Laplacian
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
#: side of the SSIM window on images at least this large (Wang et al., 2004)
SSIM_WINDOW = 11


@dataclass(frozen=True)
class ImageGeometry:
    """How the model's flat or shaped examples are pictures.

    Attributes:
        shape: ``(C, H, W)`` of one example.
        data_range: the span of the pixel values the model sees (1 for pixels scaled to [0, 1]).
    """

    shape: tuple[int, int, int]
    data_range: float

    def images(self, values: Tensor) -> Tensor:
        """``values`` ``(N, ...)`` as float ``(N, C, H, W)`` images."""
        return values.reshape(len(values), *self.shape).float()


def image_geometry(datamodule: object, input_shape: tuple[int, ...]) -> ImageGeometry | None:
    """The geometry of a data module's examples when they are pictures: a three-dimensional
    ``example_shape`` of the model's size and a known pixel grid (``value_range``); else None."""
    shape = getattr(datamodule, "example_shape", None)
    value_range = getattr(datamodule, "value_range", None)
    preprocessing = getattr(datamodule, "preprocessing", None)
    if shape is None or len(shape) != 3 or value_range is None or preprocessing is None:
        return None
    if math.prod(shape) != math.prod(input_shape) or min(shape[1:]) < 3:
        return None
    # scaled (binarised, dequantised or not) the values span [0, 1]; else the raw levels, one
    # level wider with dequantisation noise
    low, high = value_range
    dequantized = preprocessing.dequantize != "none"
    data_range = 1.0 if preprocessing.scale else high - low + dequantized
    return ImageGeometry(tuple(shape), float(data_range))


def laplacian_variance(images: Tensor) -> Tensor:
    """Per image ``(N,)``: the variance over pixels of the 4-neighbour Laplacian of each channel
    (valid region), averaged over channels (Pech-Pacheco et al., 2000)."""
    channels = images.shape[1]
    kernel = images.new_tensor(LAPLACIAN).expand(channels, 1, 3, 3)
    filtered = F.conv2d(images, kernel, groups=channels)
    return filtered.flatten(2).var(-1, unbiased=False).mean(-1)


def ssim_window(shape: tuple[int, int, int]) -> int:
    """:data:`SSIM_WINDOW`, or the largest odd side that fits a smaller image."""
    side = min(SSIM_WINDOW, min(shape[1:]))
    return side if side % 2 else side - 1


def image_quality(
    images: Tensor, reconstructions: Tensor, samples: Tensor, geometry: ImageGeometry
) -> dict[str, Tensor]:
    """Per-example image metrics ``(N,)`` of one test batch (module docstring)."""
    x, r, s = (geometry.images(v) for v in (images, reconstructions, samples))
    data_range = geometry.data_range
    psnr = peak_signal_noise_ratio(r, x, data_range=data_range, reduction="none", dim=(1, 2, 3))
    window = ssim_window(geometry.shape)
    sigma = 1.5 * window / SSIM_WINDOW
    ssim = structural_similarity_index_measure(
        r, x, data_range=data_range, kernel_size=window, sigma=sigma, reduction="none"
    )
    return {
        "psnr": psnr,
        "ssim": ssim,
        "data_sharpness": laplacian_variance(x / data_range),
        "reconstruction_sharpness": laplacian_variance(r / data_range),
        "sample_sharpness": laplacian_variance(s / data_range),
    }
