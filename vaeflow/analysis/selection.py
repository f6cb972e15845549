"""How many factors: Horn's parallel analysis and the Bayesian information criterion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaeflow.analysis.fit import fit_covariance
from vaeflow.analysis.statistics import degrees_of_freedom, fit_statistics


@dataclass(frozen=True)
class ParallelAnalysis:
    """Eigenvalues of the correlation matrix against those of random data of the same shape.

    Attributes:
        eigenvalues: of the observed correlation matrix, descending (D).
        thresholds: the ``quantile`` of each ordered eigenvalue over the simulations (D).
        num_factors: how many leading eigenvalues exceed their thresholds before the first
            that does not.
        quantile: the quantile the thresholds are.
    """

    eigenvalues: Tensor
    thresholds: Tensor
    num_factors: int
    quantile: float = 0.95

    def picture(self, path: str | Path | None = None) -> Tensor:
        """The scree picture: the eigenvalues and the thresholds against their rank 1..D
        (:func:`vaeflow.callbacks.plots.lines`), as a (3, H, W) image with values in [0, 1];
        written to ``path`` as a PNG when given."""
        from vaeflow.callbacks.pictures import save_png  # drawing is not the analysis's
        from vaeflow.callbacks.plots import lines

        image = lines(
            range(1, len(self.eigenvalues) + 1),
            {
                "eigenvalues": self.eigenvalues.tolist(),
                f"random data ({self.quantile:.0%})": self.thresholds.tolist(),
            },
            f"Scree: parallel analysis suggests {self.num_factors} factor(s)",
            ("factor", "eigenvalue of the correlation matrix"),
        )
        if path is not None:
            save_png(image, Path(path))
        return image


@dataclass(frozen=True)
class BICSelection:
    """BIC (:class:`vaeflow.analysis.statistics.ChiSquareTest`) of each number of factors.

    Attributes:
        bic: number of factors -> its BIC.
        num_factors: the number with the smallest BIC.
    """

    bic: dict[int, float]
    num_factors: int


def correlation(x: Tensor) -> Tensor:
    """The correlation matrix of the rows of x (N x D), in float64."""
    return torch.corrcoef(x.to(torch.float64).T)


def parallel_analysis(
    corr: Tensor,
    num_obs: int,
    *,
    num_simulations: int = 100,
    quantile: float = 0.95,
    seed: int = 0,
) -> ParallelAnalysis:
    """Horn's (1965) parallel analysis: keep the leading factors whose correlation-matrix
    eigenvalues exceed what independent normal data of the same size (``num_obs`` x D) give,
    here the ``quantile`` of each ordered eigenvalue over ``num_simulations`` data sets (Glorfeld's
    95th percentile rather than Horn's mean, which retains too many). The random correlation
    matrices are drawn from their Wishart distribution (:func:`random_eigenvalues`: O(D^3) per
    simulation, not O(N D^2)) with a generator seeded by ``seed``, so the result is
    reproducible. :meth:`ParallelAnalysis.picture` draws the scree picture.

    Args:
        corr: the correlation matrix (D x D) of the data, e.g. :func:`correlation`.
        num_obs: the number of examples it was computed from.
        num_simulations: random data sets.
        quantile: the quantile of the random eigenvalues an observed one must exceed.
        seed: seed of the random data.
    """
    dim = corr.shape[0]
    rng = np.random.default_rng(seed)
    simulated = torch.from_numpy(
        np.stack([random_eigenvalues(dim, num_obs, rng) for _ in range(num_simulations)])
    )
    thresholds = torch.quantile(simulated, quantile, dim=0).to(corr)
    eigenvalues = torch.linalg.eigvalsh(corr).flip(0)
    below = (eigenvalues <= thresholds).nonzero()
    num_factors = int(below[0]) if len(below) else dim
    return ParallelAnalysis(eigenvalues, thresholds, num_factors, quantile)


def random_eigenvalues(dim: int, num_obs: int, rng: np.random.Generator) -> np.ndarray:
    """The eigenvalues (descending) of the correlation matrix of ``num_obs`` independent
    standard normal examples of ``dim`` features, drawn in O(D^3) whatever N: the centred
    sums of squares A are Wishart W_D(k, I), k = N - 1, drawn by Bartlett's (1933)
    decomposition A = L L^T (L lower triangular, L_ii^2 ~ chi^2(k - i) for i = 0..D-1,
    L_ij ~ N(0, 1) below the diagonal); for k < D, A = G G^T with G a D x k normal matrix. The
    correlation matrix is A scaled to a unit diagonal."""
    dof = num_obs - 1
    if dof < dim:
        g = rng.standard_normal((dim, dof))
        a = g @ g.T
    else:
        lower = np.tril(rng.standard_normal((dim, dim)), -1)
        lower[np.diag_indices(dim)] = np.sqrt(rng.chisquare(dof - np.arange(dim)))
        a = lower @ lower.T
    scale = 1 / np.sqrt(a.diagonal())
    return np.linalg.eigvalsh(a * np.outer(scale, scale))[::-1]


def max_latent_dim(num_features: int) -> int:
    """The most factors that leave positive degrees of freedom (the Ledermann bound): beyond it
    the model fits any covariance and the chi-square test and BIC say nothing."""
    latent = 0
    while degrees_of_freedom(num_features, latent + 1) > 0:
        latent += 1
    return latent


def select_by_bic(
    cov: Tensor,
    num_obs: int,
    latent_dims: Sequence[int] | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 10_000,
) -> BICSelection:
    """Fit each number of factors by maximum likelihood (:func:`fit_covariance`) and pick the
    smallest BIC = chi-square - dof ln n (Schwarz, 1978, in psych's form).

    Args:
        cov: the covariance or correlation matrix (D x D).
        num_obs: the number of examples it was computed from.
        latent_dims: the numbers of factors to try; every one with positive degrees of freedom
            (1 to :func:`max_latent_dim`) when None.
        tol: :func:`fit_covariance`'s tolerance (nats per example). Looser than its default:
            the BIC moves by at most ``num_obs * tol`` (1e-3 for 100,000 examples), far below
            the differences that choose M, and fits of an M far from the truth crawl (minutes
            each at 1e-12).
        max_iter: :func:`fit_covariance`'s most iterations per M.
    """
    if latent_dims is None:
        latent_dims = range(1, max_latent_dim(cov.shape[0]) + 1)
    bic = {}
    for latent in latent_dims:
        loadings, noise = fit_covariance(cov, latent, tol=tol, max_iter=max_iter)
        bic[latent] = fit_statistics(cov, loadings, noise, num_obs).bic
    return BICSelection(bic, min(bic, key=bic.__getitem__))
