"""LightningDataModules that keep their data in memory as tensors."""

from vaeflow.data.array import ArrayDataModule
from vaeflow.data.base import InMemoryDataModule
from vaeflow.data.covariance import CovarianceDataModule
from vaeflow.data.digits import DigitsDataModule
from vaeflow.data.h5ad import AnnDataModule
from vaeflow.data.synthetic import SyntheticFADataModule
from vaeflow.data.torchvision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "AnnDataModule",
    "ArrayDataModule",
    "CIFAR10DataModule",
    "CovarianceDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "SyntheticFADataModule",
]
