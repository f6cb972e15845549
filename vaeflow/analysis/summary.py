"""What a fitted factor model says about its features, on the correlation scale: pattern and
structure loadings, communalities, uniquenesses and the variance each factor explains, as
psych::fa and R's factanal print them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vaeflow.analysis.rotation import explained_variance


@dataclass(frozen=True)
class LoadingSummary:
    """A factor solution standardised to unit feature variances.

    Attributes:
        pattern: P (D x M), the standardised loadings: feature d's regression on the factors.
        structure: P Phi (D x M), the correlations of the features with the factors (equal to
            the pattern for orthogonal factors).
        phi: factor correlations (M x M).
        communalities: diag(P Phi P^T) (D), the share of each feature's variance the factors
            explain.
        uniquenesses: 1 - communalities (D).
        variance: variance explained by each factor, diag(Phi P^T P) (M) (psych's and
            factanal's "SS loadings"; for oblique factors the sum over features of pattern times
            structure, which adds up to the total communality).
        proportion_variance: variance / D, the share of the total (standardised) variance.
        cumulative_variance: running sum of ``proportion_variance``.
        proportion_explained: variance / sum(variance), the share of the common variance.
        cumulative_proportion: running sum of ``proportion_explained``.
    """

    pattern: Tensor
    structure: Tensor
    phi: Tensor
    communalities: Tensor
    uniquenesses: Tensor
    variance: Tensor
    proportion_variance: Tensor
    cumulative_variance: Tensor
    proportion_explained: Tensor
    cumulative_proportion: Tensor


def model_std(loadings: Tensor, noise_variance: Tensor, phi: Tensor | None = None) -> Tensor:
    """Each feature's standard deviation under the model, sqrt(diag(P Phi P^T) + Psi) (D)."""
    phi = _phi_or_identity(loadings, phi)
    return (((loadings @ phi) * loadings).sum(1) + noise_variance).sqrt()


def standardize(
    loadings: Tensor, noise_variance: Tensor, phi: Tensor | None = None, std: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Loadings and noise variances on the correlation scale: rows of P divided by the feature
    standard deviations, Psi by their squares.

    Args:
        loadings: P (D x M) in the data's units.
        noise_variance: Psi (D).
        phi: factor correlations (identity when None).
        std: the features' standard deviations; the model's (:func:`model_std`) when None, so
            that communality + uniqueness = 1 exactly. At a maximum-likelihood fit the model's
            variances equal the sample's, so the data's standard deviations give the same.
    """
    if std is None:
        std = model_std(loadings, noise_variance, phi)
    return loadings / std[:, None], noise_variance / std**2


def summarize(
    loadings: Tensor, noise_variance: Tensor, phi: Tensor | None = None, std: Tensor | None = None
) -> LoadingSummary:
    """The :class:`LoadingSummary` of a (rotated) solution, standardised by :func:`standardize`.

    Args:
        loadings: the pattern P (D x M) in the data's units or already standardised.
        noise_variance: Psi (D).
        phi: factor correlations of an oblique rotation (identity when None).
        std: the features' standard deviations (the model's when None).
    """
    phi = _phi_or_identity(loadings, phi)
    pattern, _ = standardize(loadings, noise_variance, phi, std)
    structure = pattern @ phi
    communalities = (structure * pattern).sum(1)
    variance = explained_variance(pattern, phi)
    proportion = variance / pattern.shape[0]
    explained = variance / variance.sum()
    return LoadingSummary(
        pattern=pattern,
        structure=structure,
        phi=phi,
        communalities=communalities,
        uniquenesses=1 - communalities,
        variance=variance,
        proportion_variance=proportion,
        cumulative_variance=proportion.cumsum(0),
        proportion_explained=explained,
        cumulative_proportion=explained.cumsum(0),
    )


def _phi_or_identity(loadings: Tensor, phi: Tensor | None) -> Tensor:
    if phi is not None:
        return phi
    return torch.eye(loadings.shape[1], dtype=loadings.dtype, device=loadings.device)
