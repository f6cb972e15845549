"""Maximum-likelihood factor analysis of a covariance or correlation matrix, for analyses that
start from a matrix rather than from data (a published correlation matrix, a number of factors
to choose): the same EM as :class:`vaeflow.models.FactorAnalysis`, without Lightning."""

from __future__ import annotations

import torch
from torch import Tensor

from vaeflow.errors import ConfigError
from vaeflow.models.fa_math import em_on_covariance, ppca_solution
from vaeflow.models.stopping import StoppingRule


def fit_covariance(
    cov: Tensor,
    latent_dim: int,
    *,
    tol: float = 1e-12,
    max_iter: int = 100_000,
    noise_floor: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood loadings W (D x M) and noise variances Psi (D) of the covariance S.

    EM with SQUAREM acceleration (:func:`vaeflow.models.fa_math.em_on_covariance`) from the
    closed-form PPCA solution with per-feature residual variances, the start
    ``FactorAnalysis(init="ppca")`` uses. The ML solution depends on S only, not on the number
    of examples, and is equivariant to rescaling features: fitting a correlation matrix gives
    the standardised solution. The default ``tol`` (nats per example) is far below what
    printed fit statistics need; ML factor analysis converges slowly near Heywood cases.

    Args:
        cov: a covariance or correlation matrix S (D x D), float64.
        latent_dim: number of factors M, 1 <= M < D.
        tol: stop when the log-likelihood is estimated to be within this many nats per
            example of its limit (:class:`~vaeflow.models.stopping.StoppingRule`), or its gains
            are round-off.
        max_iter: most EM (SQUAREM) iterations.
        noise_floor: lower bound of Psi_d relative to S_dd (as ``FactorAnalysis.noise_floor``).

    Raises:
        ConfigError: ``latent_dim`` is out of range.
    """
    dim = cov.shape[0]
    if not 1 <= latent_dim < dim:
        raise ConfigError(f"fit_covariance: latent_dim must be in [1, {dim - 1}], got {latent_dim}")
    var = cov.diagonal()
    floor = noise_floor * var
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    loadings, _ = ppca_solution(
        eigenvalues.flip(0), eigenvectors.flip(1), latent_dim, var.sum(), dim
    )
    noise = torch.maximum(var - (loadings**2).sum(1), floor)
    return em_on_covariance(
        cov,
        loadings,
        noise,
        floor=floor,
        isotropic=False,
        stopping=StoppingRule(tol),
        iterations=range(1, max_iter + 1),
        accelerate=True,
        record=lambda _: None,
    )
