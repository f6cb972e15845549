"""The two reference models of fit statistics for data with missing values (NaN), fitted by
full-information maximum likelihood as lavaan fits them for ``missing = "ml"``:

- the saturated model, x ~ N(mu, S) with every mean and covariance free, by the classic EM for
  a multivariate normal with missing values (Dempster, Laird & Rubin, 1977; Little & Rubin,
  2002, section 11.2): the E-step fills each row's missing values by their regression on its
  observed ones, E[x_M | x_O] = mu_M + S_MO S_OO^-1 (x_O - mu_O), and adds their conditional
  covariance S_MM - S_MO S_OO^-1 S_OM to the sums of squares; the M-step is the sample mean and
  covariance of the filled-in data;
- the independence model (a mean and a variance per feature), whose FIML fit is each feature's
  mean and variance over the rows that observe it.

Rows come as batches (the ones a fit kept), and every sum goes through ``reduce`` (the sum over
processes under DDP). Per batch, each distinct pattern of observed values costs one D x D
Cholesky factor, each row O(D^2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vaeflow.likelihoods import LOG_2PI
from vaeflow.models.fa_missing import patterns
from vaeflow.models.stopping import StoppingRule

F64 = torch.float64
Reduce = Callable[[Tensor], Tensor]
#: Rows per chunk are cut so that a chunk's gathered D x D matrices take about this many bytes.
CHUNK_BYTES = 16 * 2**20


class SaturatedFit(NamedTuple):
    """The saturated model's FIML fit: ``mean`` (D), ``covariance`` (D x D, divided by n),
    ``log_likelihood`` (mean observed-data log-likelihood per row, nats), ``num_rows`` (n, the
    rows that observe a value) and ``n_iter`` (EM iterations)."""

    mean: Tensor
    covariance: Tensor
    log_likelihood: float
    num_rows: int
    n_iter: int


def _identity(total: Tensor) -> Tensor:
    return total


def saturated_e_step(
    batches: Sequence[Tensor], mean: Tensor, cov: Tensor, reduce: Reduce = _identity
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The E-step sums at (mu, S) over every row that observes a value: (n, sum E[x - mu]
    (D), sum E[(x - mu)(x - mu)^T] (D x D), sum log p(x_O)), each through ``reduce``.

    With K_p the inverse of S_OO of pattern p embedded in D x D (zero elsewhere) and r the
    row's x - mu with 0 where missing, E[x - mu | x_O] = S K_p r (r itself on the observed
    values) and Cov[x | x_O] = S - S K_p S (zero on them).
    """
    dim = len(mean)
    rows = mean.new_zeros(())
    first, second, log_likelihood = (
        mean.new_zeros(dim),
        mean.new_zeros(dim, dim),
        mean.new_zeros(()),
    )
    chunk = max(1, CHUNK_BYTES // (8 * dim * dim))
    eye = torch.eye(dim, dtype=F64, device=mean.device)
    for batch in batches:
        for x in batch.split(chunk):
            x = x.to(F64) - mean
            observed = ~torch.isnan(x)
            keep = observed.any(1)
            x, observed = x[keep], observed[keep]
            groups = patterns(observed)
            inverse, counts = groups.index, groups.counts
            mask = groups.mask.to(F64)
            pairs = mask[:, :, None] * mask[:, None, :]
            embedded = cov * pairs + torch.diag_embed(1 - mask)  # S_OO, identity elsewhere
            chol = torch.linalg.cholesky(embedded)
            # K_p = L^-T L^-1: twice as fast as cholesky_inverse's LAPACK call per matrix
            root = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            precision = root.mT @ root * pairs  # K_p
            log_det = 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)  # log det S_OO
            r = torch.where(observed, x, 0.0)
            kr = (precision[inverse] @ r[:, :, None])[:, :, 0]
            filled = kr @ cov  # S K_p r, S symmetric
            explained = cov @ (precision * counts[:, None, None]).sum(0) @ cov
            rows += len(x)
            first += filled.sum(0)
            second += filled.T @ filled + counts.sum() * cov - explained
            log_likelihood -= 0.5 * (
                observed.sum(dtype=F64) * LOG_2PI + log_det[inverse].sum() + (r * kr).sum()
            )
    return reduce(rows), reduce(first), reduce(second), reduce(log_likelihood)


def fit_saturated(
    batches: Sequence[Tensor],
    mean: Tensor,
    cov: Tensor,
    *,
    reduce: Reduce = _identity,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> SaturatedFit:
    """EM for the mean and covariance of rows with missing values (NaN), from (``mean``,
    ``cov``), e.g. a factor model's fit, which is close: it stops when the log-likelihood is
    within ``tol`` nats per row of its Aitken-estimated limit, or at round-off
    (:class:`~vaeflow.models.stopping.StoppingRule`)."""
    stopping = StoppingRule(tol)
    for iteration in range(max_iter + 1):
        n, first, second, total = saturated_e_step(batches, mean, cov, reduce)
        log_likelihood = (total / n).item()
        if stopping.converged(log_likelihood, abs(log_likelihood) + len(mean)) or (
            iteration == max_iter
        ):
            break
        step = first / n
        mean, cov = mean + step, second / n - torch.outer(step, step)
    return SaturatedFit(mean, cov, log_likelihood, int(n), iteration)


def independence_log_likelihood(
    batches: Sequence[Tensor], shift: Tensor, reduce: Reduce = _identity
) -> float:
    """The independence model's FIML log-likelihood, mean per row that observes a value: each
    feature's normal at its observed mean and (ML) variance, -N_d/2 (log 2 pi + log v_d + 1)
    summed over features. Values are taken about ``shift`` (any value near the mean)."""
    dim = len(shift)
    rows = shift.new_zeros(())
    count, total, squares = (shift.new_zeros(dim) for _ in range(3))
    for batch in batches:
        x = batch.to(F64) - shift
        observed = ~torch.isnan(x)
        values = torch.where(observed, x, 0.0)
        rows += observed.any(1).sum()
        count += observed.sum(0)
        total += values.sum(0)
        squares += (values**2).sum(0)
    count, total, squares, rows = (reduce(s) for s in (count, total, squares, rows))
    variance = squares / count - (total / count) ** 2
    return (-0.5 * (count * (LOG_2PI + variance.log() + 1)).sum() / rows).item()
