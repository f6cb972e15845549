"""Factor analysis with missing values by full-information maximum likelihood (FIML): the
observed-data log-likelihood against a dense per-pattern float64 computation, EM's guarantees,
the fit against complete-case factor analysis on values missing at random, DDP, the data
modules, the CLI and the scikit-learn estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from vaeflow.models import fa_math
from vaeflow.models.fa_missing import (
    add_sums_,
    m_step,
    observed_log_likelihood,
    posterior,
    zero_sums,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: a second thread only adds synchronisation on the shared cores."""


def factor_model(dim: int = 8, latent: int = 2, seed: int = 0):
    """Random (W, Psi, mu) in float64."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.randn(dim, latent, generator=g, dtype=F64)
    noise = 0.2 + torch.rand(dim, generator=g, dtype=F64)
    mean = torch.randn(dim, generator=g, dtype=F64)
    return loadings, noise, mean


def draw(n: int, loadings, noise, mean, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, loadings.shape[1], generator=g, dtype=F64)
    eps = torch.randn(n, len(noise), generator=g, dtype=F64) * noise.sqrt()
    return mean + z @ loadings.T + eps


def missing_at_random(x: torch.Tensor, fraction: float, seed: int = 2) -> torch.Tensor:
    """NaN in about ``fraction`` of the cells, missing at random (MAR, not MCAR): the first
    feature is always observed, and each other value is missing with a probability that grows
    with the first feature's value (a logistic in it, scaled to the fraction asked for)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = x.shape
    anchor = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std()
    weight = torch.sigmoid(1.5 * anchor)[:, None].expand(n, dim - 1)
    probability = (weight * fraction * dim / (dim - 1) / weight.mean()).clamp(max=0.95)
    drop = torch.rand(n, dim - 1, generator=g, dtype=F64) < probability
    out = x.clone()
    out[:, 1:][drop] = torch.nan
    return out


def dense_observed_log_likelihood(x: torch.Tensor, loadings, noise, mean) -> np.ndarray:
    """log p(x_O) row by row, grouped by pattern of observed coordinates, from the dense
    covariance C_OO = W_O W_O^T + Psi_O by scipy in float64."""
    cov = (loadings @ loadings.T + torch.diag(noise)).numpy()
    values = x.numpy()
    observed = ~np.isnan(values)
    out = np.zeros(len(values))
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse.ravel() == index)
        if pattern.any():
            mvn = multivariate_normal(mean.numpy()[pattern], cov[np.ix_(pattern, pattern)])
            out[rows] = np.atleast_1d(mvn.logpdf(values[np.ix_(rows, pattern)]))
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_observed_log_likelihood_is_the_dense_per_pattern_value(fraction: float) -> None:
    loadings, noise, mean = factor_model()
    x = missing_at_random(draw(2000, loadings, noise, mean), fraction)
    assert torch.isnan(x).double().mean().item() == pytest.approx(fraction, abs=0.02)
    exact = dense_observed_log_likelihood(x, loadings, noise, mean)
    ours = observed_log_likelihood(x, loadings, noise, mean).numpy()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-8)
    assert abs(ours.mean() - exact.mean()) < 1e-8


def test_complete_rows_give_the_complete_data_likelihood_and_posterior() -> None:
    loadings, noise, mean = factor_model(seed=3)
    x = draw(300, loadings, noise, mean)
    factors = fa_math.factorise(loadings, noise)
    post = posterior(x, loadings, noise, mean)
    torch.testing.assert_close(
        post.log_likelihood, fa_math.log_likelihood(x - mean, factors), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        post.mean, fa_math.posterior_mean(x - mean, factors), rtol=0, atol=1e-10
    )


def test_a_row_that_observes_nothing_has_the_prior_and_likelihood_zero() -> None:
    loadings, noise, mean = factor_model()
    x = torch.full((1, len(noise)), torch.nan, dtype=F64)
    post = posterior(x, loadings, noise, mean)
    assert post.log_likelihood.item() == 0
    assert torch.equal(post.mean, torch.zeros(1, 2, dtype=F64))


def em_step(x: torch.Tensor, loadings, noise, mean, batches: int = 1):
    """One FIML EM step over ``x`` cut into ``batches``: the mean log-likelihood at the
    parameters and the new parameters."""
    sums = zero_sums(*loadings.shape, x)
    for batch in x.tensor_split(batches):
        add_sums_(sums, batch, loadings, noise, mean)
    assert sums.rows.item() == (~torch.isnan(x)).any(1).sum().item()
    w, psi, step = m_step(sums, torch.full_like(noise, 1e-8), isotropic=False)
    return sums.log_likelihood / sums.rows, (w, psi, mean + step)


def test_with_complete_data_at_the_sample_mean_the_m_step_is_complete_data_em() -> None:
    """At mu = the sample mean, the joint update of (W, mu, Psi) keeps the mean and gives the
    complete-data M-step of :mod:`vaeflow.models.fa_math`."""
    loadings, noise, mean = factor_model(seed=4)
    x = draw(500, loadings, noise, mean)
    centre = x.mean(0)
    start = (0.5 * loadings, noise + 0.3)
    _, (w, psi, mu) = em_step(x, *start, centre)
    xc = x - centre
    factors = fa_math.factorise(*start)
    moments = fa_math.moments_at(xc.T @ xc / len(x), factors)
    w_ref, psi_ref = fa_math.m_step(factors, moments, torch.full_like(noise, 1e-8), False)
    torch.testing.assert_close(mu, centre, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(psi, psi_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_em_is_monotone_and_ends_at_a_stationary_point(fraction: float) -> None:
    """Every step raises the observed-data log-likelihood (to round-off), batches sum to the
    one-batch step, and after the fit the dense log-likelihood's gradient in (W, mu, log Psi),
    by autograd in float64, vanishes."""
    truth = factor_model(seed=5)
    x = missing_at_random(draw(1000, *truth), fraction)
    mean = torch.nanmean(x, 0)
    observed = ~torch.isnan(x)
    noise = torch.where(observed, x - mean, 0).pow(2).sum(0) / observed.sum(0)
    loadings = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    history = []
    for step in range(400):
        ll, update = em_step(x, loadings, noise, mean)
        if step == 0:
            _, batched = em_step(x, loadings, noise, mean, batches=7)
            for a, b in zip(update, batched, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
        history.append(ll.item())
        loadings, noise, mean = update
    gains = np.diff(history)
    assert gains.min() > -1e-12, gains.min()
    assert history[-1] - history[0] > 0.1

    params = [p.clone().requires_grad_() for p in (loadings, mean, noise.log())]
    w, mu, log_psi = params
    cov = w @ w.T + torch.diag(log_psi.exp())
    total = 0
    for pattern in observed.unique(dim=0):
        rows = (observed == pattern).all(1)
        sub = x[rows][:, pattern]
        mvn = torch.distributions.MultivariateNormal(mu[pattern], cov[pattern][:, pattern])
        total = total + mvn.log_prob(sub).sum()
    (total / len(x)).backward()
    for p in params:
        assert p.grad.abs().max().item() < 1e-6
