"""The mathematics of factor analysis, free of Lightning: likelihood, posterior, E- and M-step, EM.

Every formula works with the whitened loadings Psi^(-1/2) W = U diag(s) R (thin SVD, U: D x M
orthonormal, R: M x M orthogonal), never with a D x D inverse nor with the precision
I + W^T Psi^-1 W. That matrix has condition number ~ 1 + max s^2, which grows like the inverse
of the smallest noise variance relative to its feature's variance: inverting it (Woodbury, the
determinant lemma) loses about that factor of float64's precision, which put the "exact"
log-likelihood of a fit with near-zero noise variances 2.6e9 nats off. In the whitened frame
C~ = Psi^(-1/2) C Psi^(-1/2) = I + U diag(s^2) U^T, so

- log det C = sum log Psi + sum log(1 + s^2),
- C~^-1 = I - U diag(s^2 / (1 + s^2)) U^T, and
- z | x ~ N(R^T diag(s / (1 + s^2)) U^T Psi^(-1/2) (x - mu), R^T diag(1 / (1 + s^2)) R),

each computed to float64 round-off; what is left is the rounding of S itself, relative
float64 precision times sum_d S_dd / Psi_d, which the noise floor keeps small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from vaeflow.likelihoods import LOG_2PI
from vaeflow.models.fa_blas import matmul
from vaeflow.models.squarem import EMMap, squarem_step
from vaeflow.models.stopping import StoppingRule


class Factors(NamedTuple):
    """(W, Psi) in the whitened form every formula uses: Psi^(-1/2) W = U diag(s) R."""

    noise_variance: Tensor
    basis: Tensor
    singular_values: Tensor
    rotation: Tensor

    @property
    def probe(self) -> Tensor:
        """P = Psi^(-1/2) U (D x M): the E-step needs S only through S P."""
        return self.basis / self.noise_variance.sqrt()[:, None]

    @property
    def shrinkage(self) -> Tensor:
        """s / (1 + s^2): the posterior mean is R^T diag(shrinkage) P^T (x - mu)."""
        return self.singular_values / (1 + self.singular_values**2)

    @property
    def log_det(self) -> Tensor:
        """log det C = sum log Psi + sum log(1 + s^2)."""
        return self.noise_variance.log().sum() + torch.log1p(self.singular_values**2).sum()


class Moments(NamedTuple):
    """Second-order E-step statistics of the data about the fitted mean, normalised by n:
    ``sp`` = S P (D x M), ``psp`` = P^T S P (M x M) and ``var`` = diag S (D), with S the
    covariance and P the probe of the parameters they were taken at."""

    sp: Tensor
    psp: Tensor
    var: Tensor


class EStep(NamedTuple):
    """An E-step on the covariance: the parameters' factors, the statistics, the exact
    mean log-likelihood per example."""

    factors: Factors
    moments: Moments
    log_likelihood: Tensor


class Iterate(NamedTuple):
    """One EM iterate, as :func:`em_on_covariance` reports it."""

    iteration: int
    loadings: Tensor
    noise_variance: Tensor
    log_likelihood: Tensor
    elbo: Tensor


def factorise(loadings: Tensor, noise_variance: Tensor) -> Factors:
    """The thin SVD of the whitened loadings Psi^(-1/2) W (O(D M^2)), as a QR factorisation and
    the SVD of its M x M factor: as accurate, and about half the time of a D x M SVD."""
    q, r = torch.linalg.qr(loadings / noise_variance.sqrt()[:, None])
    u, s, rotation = torch.linalg.svd(r)
    return Factors(noise_variance, q @ u, s, rotation)


def posterior_covariance(factors: Factors) -> Tensor:
    """G = (I + W^T Psi^-1 W)^-1 = R^T diag(1 / (1 + s^2)) R, the same for every example."""
    r = factors.rotation
    return (r.T / (1 + factors.singular_values**2)) @ r


def posterior_mean(centred: Tensor, factors: Factors) -> Tensor:
    """E[z | x] = G W^T Psi^-1 (x - mu) of each row of ``centred`` (N x D -> N x M)."""
    return (centred @ factors.probe * factors.shrinkage) @ factors.rotation


def log_likelihood(centred: Tensor, factors: Factors) -> Tensor:
    """Exact log p(x) of each row of ``centred`` = x - mu (N,), in O(N D M).

    With y = Psi^(-1/2) (x - mu) and a = U^T y, the quadratic form is
    |y - U a|^2 + sum a^2 / (1 + s^2): two non-negative terms, the first an explicit residual,
    so nothing large cancels.
    """
    y = centred / factors.noise_variance.sqrt()
    a = y @ factors.basis
    residual = y - a @ factors.basis.T
    quad = (residual**2).sum(1) + (a**2 / (1 + factors.singular_values**2)).sum(1)
    return -0.5 * (centred.shape[1] * LOG_2PI + factors.log_det + quad)


def moments_at(cov: Tensor, factors: Factors) -> Moments:
    """The E-step statistics from the covariance S: one D x D x M product."""
    probe = factors.probe
    sp = matmul(cov, probe)
    return moments_from(sp, probe, cov.diagonal())


def moments_from(sp: Tensor, probe: Tensor, var: Tensor) -> Moments:
    """The statistics from S P (summed over the data when streaming) and diag S."""
    psp = probe.T @ sp
    return Moments(sp, (psp + psp.T) / 2, var)


def log_likelihood_from_moments(factors: Factors, moments: Moments) -> Tensor:
    """Exact mean log-likelihood per example, -1/2 [D log 2pi + log det C + tr(C^-1 S)], with
    tr(C^-1 S) = tr(S~) - sum_k s_k^2 / (1 + s_k^2) (U^T S~ U)_kk, S~ = Psi^(-1/2) S Psi^(-1/2)."""
    s2 = factors.singular_values**2
    trace = (moments.var / factors.noise_variance).sum() - (
        s2 / (1 + s2) * moments.psp.diagonal()
    ).sum()
    return -0.5 * (moments.var.numel() * LOG_2PI + factors.log_det + trace)


def _expectations(factors: Factors, moments: Moments) -> tuple[Tensor, Tensor]:
    """Under the posterior q at ``factors``: mean of (x - mu) E[z]^T (D x M), S B^T with B the
    posterior-mean map, and mean of E[z z^T] = G + B S B^T (M x M), returned in the rotated
    frame R (multiply by R on the right, and R^T . R) as K = diag(1/(1+s^2)) + h P^T S P h."""
    h = factors.shrinkage
    s_beta = moments.sp * h
    second = torch.diag(1 / (1 + factors.singular_values**2)) + h[:, None] * moments.psp * h
    return s_beta, second


def elbo_from_moments(
    loadings: Tensor, noise_variance: Tensor, posterior: Factors, moments: Moments
) -> Tensor:
    """Mean ELBO per example, E_q[log p(x, z)] + H[q], with q the posterior under the parameters
    at which ``moments`` were taken (``posterior``) and p under (loadings, noise_variance).

    Written as the expected complete-data log-likelihood, independently of the likelihood's
    formula, so that ELBO = log-likelihood right after an E-step is a real check.
    """
    dim, latent = loadings.shape
    s_beta, second = _expectations(posterior, moments)
    r = posterior.rotation
    s_beta, second = s_beta @ r, r.T @ second @ r
    w_scaled = loadings / noise_variance[:, None]
    eye = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    expected = (
        dim * LOG_2PI
        + noise_variance.log().sum()
        + (moments.var / noise_variance).sum()
        - 2 * (s_beta * w_scaled).sum()
        + ((eye + loadings.T @ w_scaled) * second).sum()
    )
    log_det_cov = -torch.log1p(posterior.singular_values**2).sum()  # log det G
    return -0.5 * (expected - latent - log_det_cov)


def m_step(
    factors: Factors, moments: Moments, floor: Tensor, isotropic: bool
) -> tuple[Tensor, Tensor]:
    """Closed-form M-step from the E-step statistics: W = (S B^T) E[zz^T]^-1 and
    Psi = max(diag(S - W B S), floor), the exact maximiser under the floor constraint."""
    s_beta, second = _expectations(factors, moments)
    # K is well conditioned (its entries are O(1) near a fit) and small: its inverse times the
    # D x M statistics is 3x faster than a solve with D right-hand sides
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(second))
    loadings = s_beta @ inverse @ factors.rotation
    residual = moments.var - (loadings * (s_beta @ factors.rotation)).sum(1)
    if isotropic:
        residual = residual.mean().expand_as(residual)
    return loadings, torch.maximum(residual, floor)


def e_step(cov: Tensor, loadings: Tensor, noise_variance: Tensor) -> EStep:
    """E-step on the covariance: factors, statistics and exact log-likelihood."""
    factors = factorise(loadings, noise_variance)
    moments = moments_at(cov, factors)
    return EStep(factors, moments, log_likelihood_from_moments(factors, moments))


def covariance_em(cov: Tensor, floor: Tensor, isotropic: bool) -> EMMap[EStep]:
    """EM on the covariance S as :func:`~vaeflow.models.squarem.squarem_step` takes it: (W,
    log Psi) the coordinates, W in units of each feature's standard deviation."""
    units = cov.diagonal().sqrt().where(cov.diagonal() > 0, 1.0)[:, None]
    return EMMap(
        e_step=lambda p: e_step(cov, *p),
        m_step=lambda state: m_step(state.factors, state.moments, floor, isotropic),
        log_likelihood=lambda state: state.log_likelihood,
        chart=lambda p: (p[0] / units, p[1].log()),
        point=lambda t: (t[0] * units, torch.maximum(t[1].exp(), floor)),
    )


def em_on_covariance(
    cov: Tensor,
    w: Tensor,
    psi: Tensor,
    *,
    floor: Tensor,
    isotropic: bool,
    stopping: StoppingRule,
    iterations: range,
    accelerate: bool,
    record: Callable[[Iterate], None],
) -> tuple[Tensor, Tensor]:
    """EM on the covariance S from (w, psi) until ``stopping`` says the fit has converged, or
    the ``iterations`` run out. An iteration is one EM step, or with ``accelerate`` one SQUAREM
    cycle (three EM steps and an extrapolation: on MNIST about 4x fewer D x D x M products
    than plain EM). ``record`` sees the start (``iterations.start - 1``) and every iterate.
    """
    em = covariance_em(cov, floor, isotropic)
    state = e_step(cov, w, psi)
    record(Iterate(iterations.start - 1, w, psi, state.log_likelihood, _elbo(w, psi, state)))
    if stopping.last is None:  # a fresh fit (a resumed one has this iterate's value)
        stopping.converged(state.log_likelihood.item(), roundoff_scale(state))
    remaining = 0.0
    for iteration in iterations:
        if accelerate:
            (w, psi), state, remaining = squarem_step(em, (w, psi), state)
        else:
            w, psi = em.m_step(state)
            state = em.e_step((w, psi))
        record(Iterate(iteration, w, psi, state.log_likelihood, _elbo(w, psi, state)))
        if stopping.converged(state.log_likelihood.item(), roundoff_scale(state), remaining):
            break
    return w, psi


def roundoff_scale(state: EStep) -> float:
    """Size of the terms that the mean log-likelihood sums, which sets its round-off:
    tr(S~) = sum_d S_dd / Psi_d (see the module docstring) and the log-likelihood itself."""
    trace = (state.moments.var / state.factors.noise_variance).sum()
    return (trace + state.log_likelihood.abs()).item()


def _elbo(w: Tensor, psi: Tensor, state: EStep) -> Tensor:
    return elbo_from_moments(w, psi, state.factors, state.moments)


def ppca_solution(
    eigenvalues: Tensor, eigenvectors: Tensor, latent_dim: int, trace: Tensor, dim: int
) -> tuple[Tensor, Tensor]:
    """Closed-form PPCA from the leading eigenpairs (descending) of S: sigma^2 is the mean of
    the discarded eigenvalues, W = U_M (L_M - sigma^2 I)^(1/2)."""
    top = eigenvalues[:latent_dim]
    sigma2 = (trace - top.sum()) / (dim - latent_dim)
    loadings = eigenvectors[:, :latent_dim] * (top - sigma2).clamp_min(0).sqrt()
    return loadings, sigma2.expand(dim)


def leading_eigenpairs(
    cov: Tensor, k: int, seed: int, iterations: int = 10
) -> tuple[Tensor, Tensor]:
    """About the k leading eigenpairs (descending) of a symmetric D x D matrix by randomised
    subspace iteration with Rayleigh-Ritz: O(D^2 k) per iteration against O(D^3) for a full
    eigh. It only starts EM (which refines it), and it is exact when k >= D."""
    k = min(k, cov.shape[0])
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(cov.shape[0], k, generator=generator, dtype=cov.dtype).to(cov.device)
    for _ in range(iterations):
        basis = torch.linalg.qr(matmul(cov, basis)).Q
    eigenvalues, vectors = torch.linalg.eigh(basis.T @ matmul(cov, basis))
    return eigenvalues.flip(0), basis @ vectors.flip(1)
