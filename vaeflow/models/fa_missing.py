"""Factor analysis of data with missing values (NaN) by full-information maximum likelihood.

Row n observes the coordinates O_n. As Psi is diagonal, the model of what it observes is the
factor model of those coordinates, x_O ~ N(mu_O, W_O W_O^T + Psi_O): the missing ones are
integrated out exactly, and the observed-data log-likelihood sum_n log p(x_(n,O_n)) is what the
fit maximises (Anderson, 1957; in SEM software "FIML", lavaan's ``missing = "ml"``).

EM takes z as the latent variable and the observed coordinates as the data (Ghahramani &
Hinton, 1996; Ilin & Raiko, 2010, for PPCA). With B_n = Psi_O^(-1/2) W_O and
y_n = Psi_O^(-1/2) (x_O - mu_O), the posterior is z | x_O ~ N(m_n, G_n),
G_n = (I + B_n^T B_n)^-1, m_n = G_n B_n^T y_n. G_n depends on the row only through its
pattern of observed values, so rows are grouped by pattern (:func:`patterns`) and each pattern
takes one M x M inverse and Cholesky factor (628 patterns among 2000 rows of 12 features with
a fifth missing; one for complete data). Each
feature's M-step is a regression of its observed values on z~ = (z, 1) under the posterior,
which updates its loadings, its mean and its noise variance together (the mean is no longer
the sample mean):

    [w_d; mu_d] = (sum_(n: d in O_n) E[z~ z~^T]_n)^-1 sum_(n: d in O_n) x_nd E[z~]_n,
    psi_d = (sum x_nd^2 - [w_d; mu_d]^T sum x_nd E[z~]_n) / N_d.

Every statistic is a sum over rows (D x (M + 1), D x (M + 1)^2 and D numbers), so a fit
streams batch by batch and adds the sums across processes once per pass, like the complete
data's. Values enter about the current mean and the M-step moves it, so a large offset does not
round away the spread.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vaeflow.likelihoods import LOG_2PI

F64 = torch.float64


class Patterns(NamedTuple):
    """The distinct patterns of observed values among some rows: ``mask`` (P x D, bool), the
    pattern of each row ``index`` (N, into ``mask``) and how many rows have each, ``counts``
    (P). Rows of one pattern share every factorisation of the E-step."""

    mask: Tensor
    index: Tensor
    counts: Tensor


#: Bits of a row's mask packed into one int64 word by :func:`patterns` (2^0 .. 2^62).
WORD_BITS = 63


def patterns(observed: Tensor) -> Patterns:
    """The patterns of the rows of ``observed`` (N x D, bool), in no particular order.

    Each row's mask is packed into int64 words (one up to D = 63) and the words sorted as
    numbers: ``torch.unique(dim=0)`` compares rows pair by pair, 3.5 ms for 2000 x 12 values,
    most of an E-step of the saturated model, against 0.05 ms.
    """
    powers = 2 ** torch.arange(WORD_BITS, device=observed.device)
    index = None
    for block in observed.split(WORD_BITS, dim=1):
        word = (block * powers[: block.shape[1]]).sum(1)
        if index is not None:  # the pair (pattern so far, this word), numbered
            word = torch.unique(word, return_inverse=True)[1] + index * len(observed)
        _, index, counts = torch.unique(word, return_inverse=True, return_counts=True)
    every = torch.arange(len(index), device=index.device)
    rows = torch.empty_like(counts).scatter_(0, index, every)  # a row of each pattern
    return Patterns(observed[rows], index, counts)


class Posterior(NamedTuple):
    """z | x_O of each row: means (N x M) and the observed-data log-likelihood log p(x_O)
    (N,); the rows' ``patterns`` and each pattern's posterior covariance
    G_p = (I + B_p^T B_p)^-1 (P x M x M)."""

    mean: Tensor
    log_likelihood: Tensor
    patterns: Patterns
    covariance: Tensor


class MissingSums(NamedTuple):
    """The E-step's sums over rows for the M-step, per feature d over the rows observing it:
    ``count`` N_d (D), ``cross`` sum x_nd E[z~]_n (D x (M + 1)), ``second`` sum E[z~ z~^T]_n
    (D x (M + 1) x (M + 1)) and ``squares`` sum x_nd^2 (D), with z~ = (z, 1) and x about the
    current mean; ``rows``, the rows that observe a value, and ``log_likelihood``, the sum of
    their log p(x_O) (scalars)."""

    rows: Tensor
    count: Tensor
    cross: Tensor
    second: Tensor
    squares: Tensor
    log_likelihood: Tensor


def posterior(x: Tensor, loadings: Tensor, noise_variance: Tensor, mean: Tensor) -> Posterior:
    """The posterior of z given each row's observed coordinates (NaN: missing), and the row's
    observed-data log-likelihood, in O(N D M + P D M^2) for P patterns of observed values: one
    M x M Cholesky factor per pattern.

    The quadratic form y^T (I + B B^T)^-1 y is |y - B m|^2 + |m|^2: two non-negative terms, the
    first an explicit residual, so nothing large cancels (as in
    :func:`vaeflow.models.fa_math.log_likelihood`). A row that observes nothing has the prior
    as posterior and log-likelihood 0.
    """
    observed = ~torch.isnan(x)
    groups = patterns(observed)
    mask = groups.mask.to(x.dtype)
    dim, latent = loadings.shape
    outer = (loadings[:, :, None] * loadings[:, None, :]).reshape(dim, latent * latent)
    eye = torch.eye(latent, dtype=x.dtype, device=x.device)
    inverse = eye + (mask / noise_variance @ outer).reshape(-1, latent, latent)  # G_p^-1
    precision = observed / noise_variance  # Psi_O^-1 on each row's diagonal, 0 where missing
    centred = torch.where(observed, x - mean, 0.0)
    projected = (centred * precision) @ loadings  # B^T y = W_O^T Psi_O^-1 (x_O - mu_O)
    # P small inverses in one batched call: cholesky_solve and cholesky_inverse take 4-6x as
    # long (a LAPACK call per matrix); the quadratic form below is stationary in the mean, so
    # its error from the inverse's is second order
    covariance = torch.linalg.inv(inverse)
    post_mean = (covariance[groups.index] @ projected[:, :, None])[:, :, 0]
    residual = (centred - post_mean @ loadings.T) ** 2 * precision
    quad = residual.sum(1) + (post_mean**2).sum(1)
    chol = torch.linalg.cholesky(inverse)
    log_det = mask @ noise_variance.log() + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
    ll = -0.5 * (observed.sum(1, dtype=x.dtype) * LOG_2PI + log_det[groups.index] + quad)
    return Posterior(post_mean, ll, groups, covariance)


def observed_log_likelihood(
    x: Tensor, loadings: Tensor, noise_variance: Tensor, mean: Tensor
) -> Tensor:
    """log p(x_O) of each row (N,), its missing coordinates (NaN) integrated out."""
    return posterior(x, loadings, noise_variance, mean).log_likelihood


def observed_regression_scores(
    x: Tensor, loadings: Tensor, noise_variance: Tensor, mean: Tensor, rotation: Tensor
) -> Tensor:
    """Regression (Thurstone) factor scores of rows with missing values: E[f | x_O] for the
    rotated factors f = T^T z (``rotation`` T, from :func:`vaeflow.analysis.rotate`), the
    posterior mean of the unrotated factors z given the observed values, turned by T. For a
    complete row they are the complete-data regression scores."""
    return posterior(x, loadings, noise_variance, mean).mean @ rotation


def zero_sums(dim: int, latent: int, like: Tensor) -> MissingSums:
    """The sums before any row, float64 on ``like``'s device."""
    k = latent + 1
    return MissingSums(
        like.new_zeros((), dtype=F64),
        like.new_zeros(dim, dtype=F64),
        like.new_zeros(dim, k, dtype=F64),
        like.new_zeros(dim, k, k, dtype=F64),
        like.new_zeros(dim, dtype=F64),
        like.new_zeros((), dtype=F64),
    )


def add_sums_(
    sums: MissingSums, x: Tensor, loadings: Tensor, noise_variance: Tensor, mean: Tensor
) -> None:
    """Add one batch's E-step sums at the parameters W (D x M), Psi (D) and mu (D), float64,
    in place; the values are taken about mu.

    Args:
        sums: the running sums (:func:`zero_sums`).
        x: rows (N x D, any float dtype; NaN marks a missing value).
        loadings, noise_variance, mean: the parameters.
    """
    xs = x.to(F64) - mean
    post = posterior(xs, loadings, noise_variance, torch.zeros_like(mean))
    observed = ~torch.isnan(xs)
    weights = observed.to(F64)
    values = torch.where(observed, xs, 0.0)
    n, latent = post.mean.shape
    ones = post.mean.new_ones(n, 1)
    first = torch.cat([post.mean, ones], 1)  # E[z~] (N x (M + 1))
    # E[z~ z~^T] = G~ + E[z~] E[z~]^T, its G~ summed per pattern
    second = (weights.T @ (first[:, :, None] * first[:, None, :]).flatten(1)).reshape(
        sums.second.shape
    )
    groups = post.patterns
    weighted = groups.mask.to(F64) * groups.counts[:, None]  # rows of each pattern observing d
    second[:, :latent, :latent] += (weighted.T @ post.covariance.flatten(1)).reshape(
        -1, latent, latent
    )
    sums.rows.add_(observed.any(1).sum())
    sums.count.add_(weights.sum(0))
    sums.cross.add_(values.T @ first)
    sums.second.add_(second)
    sums.squares.add_((values**2).sum(0))
    sums.log_likelihood.add_(post.log_likelihood.sum())


def m_step(sums: MissingSums, floor: Tensor, isotropic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The exact maximiser of the expected complete-data log-likelihood given the sums:
    loadings (D x M), noise variances (D, at least ``floor``) and the mean's step (D, to add to
    the mean the sums were taken about). With ``isotropic`` noise one variance, pooled over
    every observed value."""
    solved = torch.linalg.solve(sums.second, sums.cross[:, :, None])[:, :, 0]  # [w_d; mu_d]
    residual = sums.squares - (solved * sums.cross).sum(1)
    if isotropic:
        noise = (residual.sum() / sums.count.sum()).expand_as(residual)
    else:
        noise = residual / sums.count
    return solved[:, :-1], torch.maximum(noise, floor), solved[:, -1]
