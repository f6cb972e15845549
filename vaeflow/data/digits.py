"""scikit-learn's bundled 8x8 digits: the embedded default data set (no download, 1,797 images)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor
from typing_extensions import override

from vaeflow.data.base import InMemoryDataModule


class DigitsDataModule(InMemoryDataModule):
    """The 8x8 handwritten digits shipped with scikit-learn (pixel values 0..16).

    There is no official test split: a fixed 20% (independent of ``seed``) is held out.
    """

    value_range = (0, 16)
    test_fraction = 0.2

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def load(self) -> tuple[Tensor, None]:
        images = torch.from_numpy(load_digits().images).reshape(-1, *self.example_shape)
        return images, None

    @override
    def load_labels(self) -> tuple[Tensor, None]:
        return torch.from_numpy(load_digits().target), None
