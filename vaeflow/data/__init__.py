"""LightningDataModules that keep their data in memory as tensors."""

from vaeflow.data.base import InMemoryDataModule
from vaeflow.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule", "InMemoryDataModule"]
