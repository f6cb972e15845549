"""A covariance or correlation matrix as the data of a factor analysis, as R's
``psych::fa(r, n.obs = )`` takes one: a published matrix, or data that cannot be shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from vaeflow.analysis.moments import Moments, check_covariance
from vaeflow.data.array import csv_header, read_array
from vaeflow.errors import DataError


class CovarianceDataModule(LightningDataModule):
    """A D x D covariance or correlation matrix of ``n_obs`` examples, for
    :class:`~vaeflow.models.FactorAnalysis`: the model fits the matrix (``method: moments``)
    and reports its fit statistics with N = ``n_obs``, exactly as for the data whose matrix it
    is. A correlation matrix gives the standardised solution (the loadings and noise
    variances on the correlation scale); the mean is taken as 0.

    The file is a ``.csv`` (a header line of the D feature names, which the tables carry, then
    D rows of D numbers: in R, ``write.csv(cor(x), "r.csv", row.names = FALSE, quote =
    FALSE)``), or a ``.npy``, ``.npz`` or ``.pt`` array. It is checked when the module is made:
    square, symmetric, positive definite, ``n_obs`` above D.

    There are no examples to validate, test or predict: ``vaeflow test`` and ``vaeflow
    predict`` need rows (:class:`~vaeflow.data.ArrayDataModule`).

    Args:
        path: the matrix file.
        n_obs: the number of examples the matrix was computed from (psych's ``n.obs``).
        key: the array to use when the file holds several (``.npz``, or a ``.pt`` dict).
    """

    def __init__(self, path: str, n_obs: int, key: str | None = None) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self.n_obs = n_obs
        matrix = torch.from_numpy(np.array(read_array(self.path, key), dtype=np.float64))
        self.covariance = check_covariance(matrix, n_obs, str(self.path))
        names = csv_header(self.path) if self.path.suffix.lower() == ".csv" else None
        if names is not None and len(names) != len(self.covariance):
            raise DataError(
                f"{self.path}: the header names {len(names)} features but the matrix is "
                f"{len(self.covariance)} x {len(self.covariance)}: name each column once"
            )
        #: The header's feature names (None for files without one), which the tables carry.
        self.feature_names = names

    @property
    def dims(self) -> tuple[int, ...]:
        """One example's shape, (D,): the CLI links it into the model."""
        return (len(self.covariance),)

    @property
    def log_scale(self) -> float:
        """The data are in their own units (0: no rescaling, for bits per dimension)."""
        return 0.0

    @override
    def train_dataloader(self) -> DataLoader:
        """One batch, the matrix's :class:`~vaeflow.analysis.Moments`; under DDP, processes
        other than the first get it with count 0, so it counts once."""
        first = self.trainer is None or self.trainer.global_rank == 0
        count = torch.tensor(float(self.n_obs if first else 0), dtype=torch.float64)
        mean = torch.zeros(len(self.covariance), dtype=torch.float64)
        # batch_size None: the one item is the batch (a list would be many data loaders)
        return DataLoader([Moments(count, mean, self.covariance)], batch_size=None)

    @override
    def val_dataloader(self) -> list:
        """None: a matrix has no examples to hold out."""
        return []

    def _no_rows(self) -> DataError:
        return DataError(
            f"CovarianceDataModule: {self.path} is a matrix, not examples: vaeflow test and "
            "predict need rows of data (vaeflow.data.ArrayDataModule); the fit statistics of "
            "the matrix are in the fit's summary.txt"
        )

    @override
    def test_dataloader(self) -> list:
        raise self._no_rows()

    @override
    def predict_dataloader(self) -> list:
        raise self._no_rows()
