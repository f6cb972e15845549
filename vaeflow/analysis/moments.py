"""A covariance or correlation matrix in place of its data: the checks it must pass and the
batch (:class:`Moments`) that carries it into :class:`vaeflow.models.FactorAnalysis`."""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple

import torch
from torch import Tensor

from vaeflow.errors import DataError

#: Largest asymmetry |S_ij - S_ji| / sqrt(S_ii S_jj) taken for rounding (a matrix computed in
#: floating point); a larger one is a wrong matrix, not a rounded one.
SYMMETRY_TOLERANCE = 1e-8


class Moments(NamedTuple):
    """What factor analysis needs of complete data, as one batch for
    :class:`vaeflow.models.FactorAnalysis` (``method: moments``): ``count`` examples (a float64
    scalar tensor) with mean ``mean`` (D) and covariance ``covariance`` (D x D, either divisor:
    the fit and its statistics do not change when S is multiplied by a constant). A batch of
    count 0 adds nothing (what processes other than the first get under DDP)."""

    count: Tensor
    mean: Tensor
    covariance: Tensor


def check_covariance(cov: Tensor, num_obs: int, source: str = "the matrix") -> Tensor:
    """A covariance or correlation matrix of ``num_obs`` examples, checked for factor analysis
    and made exactly symmetric (float64).

    Args:
        cov: the matrix (D x D).
        num_obs: the number of examples it was computed from (psych's ``n.obs``), which the
            fit statistics need.
        source: what messages call the matrix (a file name).

    Raises:
        DataError: the matrix is not square, not finite, not symmetric, has a variance that is
            not positive or is not positive definite, or ``num_obs`` is not above D.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] < 2:
        raise DataError(
            f"{source} must be a square D x D covariance or correlation matrix with D >= 2, "
            f"got shape {tuple(cov.shape)}"
        )
    dim = cov.shape[0]
    cov = cov.to(torch.float64)
    if not torch.isfinite(cov).all():
        raise DataError(f"{source} has NaN or infinite entries: a matrix needs every entry")
    var = cov.diagonal()
    if not (var > 0).all():
        bad = int((var <= 0).nonzero()[0])
        raise DataError(
            f"{source}: diagonal entry {bad} (counting from 0) is {var[bad].item():g}; the "
            "diagonal holds variances (1 in a correlation matrix), which must be positive"
        )
    std = var.sqrt()
    asymmetry = ((cov - cov.T).abs() / torch.outer(std, std)).max().item()
    if asymmetry > SYMMETRY_TOLERANCE:
        i, j = divmod(int((cov - cov.T).abs().argmax()), dim)
        raise DataError(
            f"{source} is not symmetric: entry ({i}, {j}) is {cov[i, j].item():g} but "
            f"({j}, {i}) is {cov[j, i].item():g}; a covariance or correlation matrix has "
            "S_ij = S_ji (give the full matrix, not one triangle)"
        )
    cov = (cov + cov.T) / 2
    if torch.linalg.cholesky_ex(cov).info != 0:
        smallest = torch.linalg.eigvalsh(cov / torch.outer(std, std))[0].item()
        raise DataError(
            f"{source} is not positive definite (the smallest eigenvalue of its correlation "
            f"matrix is {smallest:.3g}): a feature is a linear combination of others, or the "
            "matrix was assembled from pairwise correlations; drop the redundant features"
        )
    if isinstance(num_obs, bool) or not isinstance(num_obs, Integral) or num_obs <= dim:
        raise DataError(
            f"n_obs must be the number of examples the {dim} x {dim} matrix was computed from, "
            f"an integer above D = {dim} (fewer examples give a singular covariance), got "
            f"{num_obs!r}"
        )
    return cov
