"""Factor scores: estimates of each example's factors f from its features x, for a model
x = mu + P f + e, f ~ N(0, Phi), e ~ N(0, Psi), C = P Phi P^T + Psi (Grice, 2001, reviews them).

Every method is linear, f_hat = W^T (x - mu), and differs in what W trades off:

- ``regression`` (Thurstone, 1935): W = C^-1 P Phi, the posterior mean E[f | x]; least squares
  error, but shrunk towards 0 and, for oblique factors, not correlated as Phi.
- ``bartlett`` (Bartlett, 1937): W = Psi^-1 P (P^T Psi^-1 P)^-1, weighted least squares of x on
  P; conditionally unbiased, E[f_hat | f] = f, at the price of a larger error.
- ``ten_berge`` (ten Berge, Krijnen, Wansbeek & Shapiro, 1999): W = C^-1 L (L^T C^-1 L)^(-1/2)
  Phi^(1/2) with L = P Phi^(1/2), the least-squares scores whose covariance W^T C W is Phi
  exactly (correlation preserving; orthogonal factors get uncorrelated unit-variance scores).
  This is psych's ``tenBerge`` (Grice's equation 8 as corrected there), with the model's C in
  place of the sample correlation matrix, so the property holds in the population.

The model's C^-1 enters only through the whitened factorisation of
:mod:`vaeflow.models.fa_math`, never as a D x D inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaeflow.errors import ConfigError
from vaeflow.models.fa_math import factorise

ScoreWeights = Callable[[Tensor, Tensor, Tensor], Tensor]


def _precision_times(
    matrix: Tensor, loadings: Tensor, noise_variance: Tensor, phi: Tensor
) -> Tensor:
    """C^-1 B for B (D x k): with the unrotated A = P K (Phi = K K^T) whitened as
    Psi^(-1/2) A = U diag(s) R, C^-1 = Psi^(-1/2) (I - U diag(s^2 / (1 + s^2)) U^T) Psi^(-1/2)."""
    factors = factorise(loadings @ torch.linalg.cholesky(phi), noise_variance)
    root = noise_variance.sqrt()[:, None]
    y = matrix / root
    s2 = factors.singular_values**2
    return (y - factors.basis * (s2 / (1 + s2)) @ (factors.basis.T @ y)) / root


def _symmetric_power(matrix: Tensor, power: float) -> Tensor:
    """M^power of a symmetric positive definite M (the symmetric root for power 1/2)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values**power) @ vectors.T


def regression_weights(loadings: Tensor, noise_variance: Tensor, phi: Tensor) -> Tensor:
    """W = C^-1 P Phi: Thurstone's regression scores, the posterior means E[f | x]."""
    return _precision_times(loadings @ phi, loadings, noise_variance, phi)


def bartlett_weights(loadings: Tensor, noise_variance: Tensor, phi: Tensor) -> Tensor:
    """W = Psi^-1 P (P^T Psi^-1 P)^-1: Bartlett's conditionally unbiased scores (Phi unused)."""
    scaled = loadings / noise_variance[:, None]
    return torch.linalg.solve(loadings.T @ scaled, scaled.T).T


def ten_berge_weights(loadings: Tensor, noise_variance: Tensor, phi: Tensor) -> Tensor:
    """W = C^-1 L (L^T C^-1 L)^(-1/2) Phi^(1/2), L = P Phi^(1/2): scores correlated as Phi."""
    root_phi = _symmetric_power(phi, 0.5)
    weighted = loadings @ root_phi
    solved = _precision_times(weighted, loadings, noise_variance, phi)
    return solved @ _symmetric_power(weighted.T @ solved, -0.5) @ root_phi


#: Factor-score methods by name: each maps (P, Psi, Phi) to the weights W (D x M).
SCORE_METHODS: dict[str, ScoreWeights] = {
    "regression": regression_weights,
    "bartlett": bartlett_weights,
    "ten_berge": ten_berge_weights,
}


def factor_score_weights(
    loadings: Tensor, noise_variance: Tensor, method: str = "regression", phi: Tensor | None = None
) -> Tensor:
    """The weights W (D x M) of a factor-score method: scores = (x - mu) W.

    Args:
        loadings: the pattern P (D x M), rotated or not, in the data's units.
        noise_variance: Psi (D).
        method: ``regression``, ``bartlett`` or ``ten_berge`` (see the module's docstring).
        phi: factor correlations of an oblique rotation (identity when None).

    Raises:
        ConfigError: ``method`` is not one of :data:`SCORE_METHODS`.
    """
    try:
        weights = SCORE_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"unknown factor-score method {method!r}. Available: {', '.join(SCORE_METHODS)}"
        ) from None
    if phi is None:
        phi = torch.eye(loadings.shape[1], dtype=loadings.dtype, device=loadings.device)
    return weights(loadings, noise_variance, phi)


def factor_scores(
    x: Tensor,
    mean: Tensor,
    loadings: Tensor,
    noise_variance: Tensor,
    method: str = "regression",
    phi: Tensor | None = None,
) -> Tensor:
    """Factor scores (N x M) of the examples x (N x D): (x - mean) W with W from
    :func:`factor_score_weights` (the same arguments)."""
    weights = factor_score_weights(loadings, noise_variance, method, phi)
    return (x.to(weights) - mean) @ weights
