"""Goodness of fit of a maximum-likelihood factor analysis, as R's psych::fa reports it, and the
two checks of whether a correlation matrix is worth factoring (KMO, Bartlett's sphericity).

Every statistic starts from the ML discrepancy between the sample covariance S and the model's
C = P Phi P^T + Psi (p features, m factors),

    F = log det C - log det S + tr(C^-1 S) - p,

which is twice the log-likelihood lost per example against the saturated model, and from the
null model's F0 = -log det R (diagonal C; R the correlation matrix of S). Both are invariant to
rescaling the features, so the covariance and the correlation matrix give the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from scipy import optimize, stats
from torch import Tensor

from vaeflow.analysis.saturated import SaturatedFit
from vaeflow.likelihoods import LOG_2PI
from vaeflow.models.fa_math import factorise, log_likelihood_from_moments, moments_at


@dataclass(frozen=True)
class ChiSquareTest:
    """The likelihood-ratio test of m factors against the saturated model and what derives from
    it, with psych's conventions (n the number of examples, p features):

    Attributes:
        chi_square: (n - 1 - (2p + 5)/6 - 2m/3) F, Bartlett's (1950) corrected statistic, as R's
            ``factanal`` and psych report it (0 if F < 0 from round-off).
        dof: ((p - m)^2 - (p + m)) / 2, the covariances left over after the m factors.
        p_value: P(chi^2_dof > chi_square); NaN when dof <= 0.
        null_chi_square: (n - 1 - (2p + 5)/6) F0, the test of independent features.
        null_dof: p (p - 1) / 2.
        tli: the Tucker-Lewis (1973) reliability (M0 - Mm) / (M0 - 1/k), M0 = F0 / null_dof,
            Mm = F / dof, k = the model's Bartlett factor, as psych computes it (above 1 for a
            model that fits better than its degrees of freedom expect).
        rmsea: sqrt(max(chi_square / (dof n) - 1 / (n - 1), 0)), psych's formula.
        rmsea_lower: lower end of its ``confidence`` interval: sqrt(lambda / ((n - 1) dof)) with
            lambda the noncentrality whose chi-square CDF at chi_square is 1 - (1 - confidence)/2
            (0 when even lambda = 0 leaves it below).
        rmsea_upper: the same for (1 - confidence)/2 (0 when no lambda reaches it).
        bic: chi_square - dof ln n (psych's BIC: smaller is better, comparable across m).
    """

    chi_square: float
    dof: float
    p_value: float
    null_chi_square: float
    null_dof: float
    tli: float
    rmsea: float
    rmsea_lower: float
    rmsea_upper: float
    bic: float


@dataclass(frozen=True)
class FitStatistics(ChiSquareTest):
    """:class:`ChiSquareTest` with the quantities it was computed from and the residual sizes.

    Attributes:
        discrepancy: the ML discrepancy F.
        null_discrepancy: the null model's F0 = -log det R.
        log_likelihood: mean log-likelihood per example (nats) of the data whose covariance
            was given, -1/2 [p log 2 pi + log det C + tr(C^-1 S)].
        srmr: standardised root mean square residual (Bentler): the residuals S - C divided by
            sqrt(S_ii S_jj), root mean square over the p (p + 1) / 2 entries with i <= j.
        rmsr: psych's RMSR, the same over the off-diagonal entries only.
    """

    discrepancy: float
    null_discrepancy: float
    log_likelihood: float
    srmr: float
    rmsr: float


class KMO(NamedTuple):
    """Kaiser-Meyer-Olkin measure of sampling adequacy: sum r_ij^2 / (sum r_ij^2 + sum a_ij^2)
    over i != j, r the correlations and a the partial correlations given all other features,
    overall and per feature (sums over j only). Near 1 the correlations are shared (factorable);
    below about 0.5 they are mostly pairwise."""

    overall: float
    per_feature: Tensor


class SphericityTest(NamedTuple):
    """Bartlett's (1951) test that the correlation matrix is the identity:
    chi_square = -(n - 1 - (2p + 5)/6) ln det R on p (p - 1)/2 degrees of freedom."""

    chi_square: float
    dof: float
    p_value: float


def bartlett_factor(num_obs: int, num_features: int, latent_dim: int) -> float:
    """n - 1 - (2p + 5)/6 - 2m/3: Bartlett's multiplier that turns F into a chi-square."""
    return num_obs - 1 - (2 * num_features + 5) / 6 - 2 * latent_dim / 3


def degrees_of_freedom(num_features: int, latent_dim: int) -> float:
    """((p - m)^2 - (p + m)) / 2: free covariances minus free parameters of m factors."""
    return ((num_features - latent_dim) ** 2 - (num_features + latent_dim)) / 2


def chi_square_test(
    discrepancy: float,
    null_discrepancy: float,
    num_features: int,
    latent_dim: int,
    num_obs: int,
    confidence: float = 0.9,
) -> ChiSquareTest:
    """The chi-square test and the indices derived from it (see :class:`ChiSquareTest`) from the
    discrepancies F and F0 alone.

    Args:
        discrepancy: the ML discrepancy F of the m-factor model.
        null_discrepancy: F0 of the independence model.
        num_features: p.
        latent_dim: m.
        num_obs: n, the number of examples S was computed from.
        confidence: level of the RMSEA interval (psych's default 0.9).
    """
    n, p, m = num_obs, num_features, latent_dim
    dof, null_dof = degrees_of_freedom(p, m), p * (p - 1) / 2
    scale = bartlett_factor(n, p, m)
    chi = max(scale * discrepancy, 0.0)
    null_chi = bartlett_factor(n, p, 0) * null_discrepancy
    if dof <= 0:
        nan = math.nan
        return ChiSquareTest(chi, dof, nan, null_chi, null_dof, nan, nan, nan, nan, nan)
    m0 = null_discrepancy / null_dof
    tli = (m0 - discrepancy / dof) / (m0 - 1 / scale)
    rmsea = math.sqrt(max(chi / (dof * n) - 1 / (n - 1), 0.0))
    tail = (1 - confidence) / 2
    bound = max(n, chi) + 2 * n  # psych's search interval for the noncentrality
    lower, upper = (
        math.sqrt(_noncentrality(chi, dof, level, bound) / ((n - 1) * dof))
        for level in (1 - tail, tail)
    )
    return ChiSquareTest(
        chi_square=chi,
        dof=dof,
        p_value=float(stats.chi2.sf(chi, dof)),
        null_chi_square=null_chi,
        null_dof=null_dof,
        tli=tli,
        rmsea=rmsea,
        rmsea_lower=lower,
        rmsea_upper=upper,
        bic=chi - dof * math.log(n),
    )


def _noncentrality(chi: float, dof: float, level: float, bound: float) -> float:
    """The noncentrality lambda in [0, bound] at which the chi-square CDF at ``chi`` is
    ``level`` (it decreases in lambda); 0 when it is below ``level`` already at lambda = 0."""
    if stats.chi2.cdf(chi, dof) <= level:
        return 0.0
    return optimize.brentq(lambda lam: stats.ncx2.cdf(chi, dof, lam) - level, 0.0, bound)


def ml_discrepancy(
    cov: Tensor, loadings: Tensor, noise_variance: Tensor, phi: Tensor | None = None
) -> tuple[float, float]:
    """(F, mean log-likelihood per example) of the model (P, Psi, Phi) for the covariance S.

    The model is taken in its unrotated form A = P K, Phi = K K^T (Cholesky), so the whitened
    formulas of :mod:`vaeflow.models.fa_math` give log det C and tr(C^-1 S) without a D x D
    inverse; F = -2 log-likelihood - p log 2 pi - log det S - p.
    """
    unrotated = loadings if phi is None else loadings @ torch.linalg.cholesky(phi)
    factors = factorise(unrotated, noise_variance)
    log_likelihood = log_likelihood_from_moments(factors, moments_at(cov, factors)).item()
    dim = cov.shape[0]
    log_det = torch.linalg.cholesky(cov).diagonal().log().sum().item() * 2
    return -2 * log_likelihood - dim * LOG_2PI - log_det - dim, log_likelihood


def fit_statistics(
    cov: Tensor,
    loadings: Tensor,
    noise_variance: Tensor,
    num_obs: int,
    phi: Tensor | None = None,
    confidence: float = 0.9,
) -> FitStatistics:
    """How well a factor model fits the sample covariance S of ``num_obs`` examples.

    Args:
        cov: S (p x p), the maximum-likelihood covariance (divided by n) or the correlation
            matrix the model was fitted to.
        loadings: the pattern P (p x m) on the scale of ``cov``, rotated or not.
        noise_variance: Psi (p), on the same scale.
        num_obs: n.
        phi: factor correlations of an oblique rotation (identity when None).
        confidence: level of the RMSEA interval.
    """
    f, log_likelihood = ml_discrepancy(cov, loadings, noise_variance, phi)
    std = cov.diagonal().sqrt()
    correlation = cov / torch.outer(std, std)
    null = -torch.linalg.cholesky(correlation).diagonal().log().sum().item() * 2
    return _statistics(
        f, null, log_likelihood, cov, loadings, noise_variance, num_obs, phi, confidence
    )


def fiml_fit_statistics(
    saturated: SaturatedFit,
    independence_log_likelihood: float,
    log_likelihood: float,
    loadings: Tensor,
    noise_variance: Tensor,
    phi: Tensor | None = None,
    confidence: float = 0.9,
) -> FitStatistics:
    """The fit statistics of a full-information maximum-likelihood fit to data with missing
    values, as lavaan's for ``missing = "ml"``: F = 2 (l_sat - l) and F0 = 2 (l_sat - l_0) from
    the mean observed-data log-likelihoods per row of the saturated model
    (:func:`vaeflow.analysis.saturated.fit_saturated`), the factor model and the independence
    model, with n the rows that observe a value. lavaan's chi-square is n F; this one keeps
    Bartlett's correction, (n - 1 - (2p + 5)/6 - 2m/3) F, so that without missing values it is
    the complete data's (F is then the ML discrepancy). SRMR compares the model's covariance
    with the saturated model's.

    Args:
        saturated: the saturated model's FIML fit.
        independence_log_likelihood: the independence model's
            (:func:`vaeflow.analysis.saturated.independence_log_likelihood`).
        log_likelihood: the factor model's.
        loadings: its pattern P (p x m), in the data's units.
        noise_variance: its Psi (p).
        phi: factor correlations of an oblique rotation (identity when None).
        confidence: level of the RMSEA interval.
    """
    f = 2 * (saturated.log_likelihood - log_likelihood)
    null = 2 * (saturated.log_likelihood - independence_log_likelihood)
    return _statistics(
        f,
        null,
        log_likelihood,
        saturated.covariance,
        loadings,
        noise_variance,
        saturated.num_rows,
        phi,
        confidence,
    )


def _statistics(
    f: float,
    null: float,
    log_likelihood: float,
    cov: Tensor,
    loadings: Tensor,
    noise_variance: Tensor,
    num_obs: int,
    phi: Tensor | None,
    confidence: float,
) -> FitStatistics:
    """:class:`FitStatistics` from the discrepancies and the residuals of the model's
    covariance against ``cov``."""
    std = cov.diagonal().sqrt()
    common = loadings @ loadings.T if phi is None else loadings @ phi @ loadings.T
    residual = (cov - common - torch.diag(noise_variance)) / torch.outer(std, std)
    dim = cov.shape[0]
    squares = residual**2
    diagonal = squares.diagonal().sum().item()
    off_diagonal = squares.triu(1).sum().item() * 2
    test = chi_square_test(f, null, dim, loadings.shape[1], num_obs, confidence)
    return FitStatistics(
        **vars(test),
        discrepancy=f,
        null_discrepancy=null,
        log_likelihood=log_likelihood,
        srmr=math.sqrt((off_diagonal / 2 + diagonal) / (dim * (dim + 1) / 2)),
        rmsr=math.sqrt(off_diagonal / (dim * (dim - 1))),
    )


def kmo(corr: Tensor) -> KMO:
    """Kaiser-Meyer-Olkin sampling adequacy of a correlation matrix (:class:`KMO`)."""
    precision = torch.linalg.inv(corr)
    scale = precision.diagonal().rsqrt()
    partial = -precision * torch.outer(scale, scale)
    off = ~torch.eye(len(corr), dtype=torch.bool, device=corr.device)
    r2 = torch.where(off, corr**2, 0.0)
    a2 = torch.where(off, partial**2, 0.0)
    overall = (r2.sum() / (r2.sum() + a2.sum())).item()
    return KMO(overall, r2.sum(0) / (r2.sum(0) + a2.sum(0)))


def bartlett_sphericity(corr: Tensor, num_obs: int) -> SphericityTest:
    """Bartlett's test of sphericity of a correlation matrix of ``num_obs`` examples."""
    num_features = len(corr)
    log_det = torch.linalg.cholesky(corr).diagonal().log().sum().item() * 2
    chi = -bartlett_factor(num_obs, num_features, 0) * log_det
    dof = num_features * (num_features - 1) / 2
    return SphericityTest(chi, dof, float(stats.chi2.sf(chi, dof)))
