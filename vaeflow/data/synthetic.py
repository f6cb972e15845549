"""Data drawn from a known factor-analysis model, for testing that EM recovers it."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from vaeflow.data.base import InMemoryDataModule, check_seed
from vaeflow.errors import DataError


class SyntheticFADataModule(InMemoryDataModule):
    """Examples x = W z + mu + eps, z ~ N(0, I_M), eps ~ N(0, Psi), from parameters drawn once
    with ``data_seed``: W ~ N(0, 1), mu ~ N(0, 1), Psi_dd ~ U(0.1, 1) (``diagonal``) or
    sigma^2 = 0.5 (``isotropic``). The true parameters are exposed as ``loadings`` (D x M),
    ``noise_variance`` (D), ``mean`` (D) and ``covariance`` (W W^T + Psi), all float64.

    Args:
        num_train: training examples (before the validation split).
        num_test: test examples, drawn independently from the same model.
        dim: data dimension D.
        latent_dim: number of true factors M.
        noise: ``diagonal`` (factor analysis) or ``isotropic`` (probabilistic PCA).
        data_seed: seed of the true parameters and of the examples.
        batch_size: examples per batch.
        scale: map the data to [0, 1] by their min and max (off: keep the model's scale).
        **kwargs: the other options of :class:`~vaeflow.data.base.InMemoryDataModule`.
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_test: int = 1000,
        dim: int = 20,
        latent_dim: int = 3,
        noise: Literal["diagonal", "isotropic"] = "diagonal",
        data_seed: int = 0,
        batch_size: int = 500,
        scale: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, scale=scale, **kwargs)
        if dim < 1 or latent_dim < 0 or num_train < 0 or num_test < 0:
            raise DataError(
                "SyntheticFADataModule: dim must be positive and latent_dim, num_train, "
                f"num_test non-negative; got {dim}, {latent_dim}, {num_train}, {num_test}"
            )
        check_seed("data_seed", data_seed)
        self.num_train, self.num_test = num_train, num_test
        self.dim, self.latent_dim = dim, latent_dim
        self.data_seed = data_seed
        g, f64 = torch.Generator().manual_seed(data_seed), torch.float64
        self.loadings = torch.randn(dim, latent_dim, generator=g, dtype=f64)
        self.mean = torch.randn(dim, generator=g, dtype=f64)
        if noise == "isotropic":
            self.noise_variance = torch.full((dim,), 0.5, dtype=f64)
        else:
            self.noise_variance = 0.1 + 0.9 * torch.rand(dim, generator=g, dtype=f64)

    @property
    def covariance(self) -> Tensor:
        """The true covariance W W^T + Psi of x."""
        return self.loadings @ self.loadings.T + torch.diag(self.noise_variance)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """n examples (float64) from the true model."""
        g = generator
        z = torch.randn(n, self.latent_dim, generator=g, dtype=torch.float64)
        eps = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.mean + z @ self.loadings.T + eps * self.noise_variance.sqrt()

    def load(self) -> tuple[Tensor, Tensor]:
        # A generator made here, not kept: a module holding one cannot go to ddp_spawn workers.
        generator = torch.Generator().manual_seed(self.data_seed + 1)
        return self.draw(self.num_train, generator), self.draw(self.num_test, generator)
