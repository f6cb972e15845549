"""The linear algebra of factor analysis, free of Lightning: moments, E-step, M-step, EM on S.

Everything is written in terms of the covariance S, V = Psi^-1 W and G = (I + W^T V)^-1, never a
D x D inverse: log det C = log det Psi - log det G (determinant lemma) and
tr(C^-1 S) = tr(Psi^-1 S) - tr(G V^T S V) (Woodbury), so one EM iteration costs one D x D x M
product on S, and the exact log-likelihood comes free with the E-step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import NamedTuple

import torch
from scipy.linalg.blas import dsyrk
from threadpoolctl import ThreadpoolController
from torch import Tensor

from vaeflow.likelihoods import LOG_2PI

#: Flops per EM iteration under which EM on the covariance runs on one thread.
SMALL_WORK = 1e8

#: Rows converted to float64 at a time by :func:`add_moments_`: enough for an efficient syrk,
#: few enough (12 MB at D = 784) for the buffer to stay in cache and be reused, so no batch
#: allocates (and page-faults) a float64 copy of itself.
CHUNK_ROWS = 2048


class Moments(NamedTuple):
    """Second-order E-step statistics at the parameters (W, Psi), normalised by n.

    ``sv`` = S V (D x M), ``vsv`` = V^T S V (M x M) and ``var`` = diag S (D), with S the
    covariance of the data about the fitted mean and V = Psi^-1 W.
    """

    sv: Tensor
    vsv: Tensor
    var: Tensor


class EStep(NamedTuple):
    """E-step on the covariance: statistics, Cholesky factor of G^-1, exact log-likelihood."""

    moments: Moments
    chol: Tensor
    log_likelihood: Tensor


@cache
def _blas() -> ThreadpoolController:
    """Handle on OpenBLAS's thread pools (found once: a scan of the loaded libraries)."""
    return ThreadpoolController()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def single_thread_if(small: bool) -> Iterator[None]:
    """One torch and one OpenBLAS thread for small matrix work. An EM iteration on MNIST's
    covariance is about a millisecond of small operations; with two threads each waits at a
    barrier for the other, which costs ~10x when other processes share the cores."""
    if not small:
        yield
        return
    with one_torch_thread(), _blas().limit(limits=1, user_api="blas"):
        yield


def add_moments_(total: Tensor, gram: Tensor, x: Tensor, shift: Tensor, buffer: Tensor) -> None:
    """Add sum (x - shift) to ``total`` and (x - shift)^T (x - shift) to ``gram``, in float64.

    Rows go through ``buffer`` (float64, up to :data:`CHUNK_ROWS` x D) a chunk at a time. On
    the CPU only the lower triangle of ``gram`` is filled, in place, by OpenBLAS's syrk (half
    the flops, and about 3x faster than torch's MKL matmul on AMD processors), and torch runs
    on one thread meanwhile: its idle OpenMP threads would otherwise spin on the cores that
    OpenBLAS's threads need (measured 2-5x slower on two cores). Elsewhere a full matmul.
    """
    cpu = gram.device.type == "cpu"
    with one_torch_thread() if cpu else nullcontext():
        for start in range(0, len(x), len(buffer)):
            rows = x[start : start + len(buffer)]
            xs = buffer[: len(rows)].copy_(rows).sub_(shift)
            total += xs.sum(0)
            if cpu:  # gram^T in Fortran order is gram: syrk's upper triangle is its lower one
                dsyrk(1.0, xs.numpy().T, beta=1.0, c=gram.numpy().T, trans=0, overwrite_c=1)
            else:
                gram.addmm_(xs.T, xs)


def symmetric_from_lower(lower: Tensor) -> Tensor:
    return lower.tril() + lower.tril(-1).T


def cholesky_of_precision(loadings: Tensor, noise_variance: Tensor) -> tuple[Tensor, Tensor]:
    """V = Psi^-1 W and the Cholesky factor L of I + W^T V = G^-1 (M x M)."""
    v = loadings / noise_variance[:, None]
    eye = torch.eye(loadings.shape[1], dtype=loadings.dtype, device=loadings.device)
    return v, torch.linalg.cholesky(eye + loadings.T @ v)


def log_likelihood_from_moments(
    loadings: Tensor, noise_variance: Tensor, chol: Tensor, moments: Moments
) -> Tensor:
    """Exact mean log-likelihood per example, -1/2 [D log 2pi + log det C + tr(C^-1 S)]."""
    dim = noise_variance.numel()
    log_det = noise_variance.log().sum() + 2 * chol.diagonal().log().sum()
    trace = (moments.var / noise_variance).sum() - (
        torch.cholesky_inverse(chol) * moments.vsv
    ).sum()
    return -0.5 * (dim * LOG_2PI + log_det + trace)


def elbo_from_moments(
    loadings: Tensor, noise_variance: Tensor, posterior_chol: Tensor, moments: Moments
) -> Tensor:
    """Mean ELBO per example, E_q[log p(x, z)] + H[q], with q the posterior under the parameters
    at which ``moments`` were taken (``posterior_chol``) and p under (loadings, noise_variance).

    Written as the expected complete-data log-likelihood, independently of the Woodbury form, so
    that ELBO = log-likelihood right after an E-step is a real check.
    """
    dim, latent = loadings.shape
    cov = torch.cholesky_inverse(posterior_chol)  # G of q
    s_beta = moments.sv @ cov  # S beta^T, beta = G V^T: mean of x E[z]^T
    second = cov + cov @ moments.vsv @ cov  # mean of E[z z^T]
    w_scaled = loadings / noise_variance[:, None]
    eye = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    expected = (
        dim * LOG_2PI
        + noise_variance.log().sum()
        + (moments.var / noise_variance).sum()
        - 2 * (s_beta * w_scaled).sum()
        + ((eye + loadings.T @ w_scaled) * second).sum()
    )
    log_det_cov = -2 * posterior_chol.diagonal().log().sum()
    return -0.5 * (expected - latent - log_det_cov)


def m_step(moments: Moments, chol: Tensor, floor: float, isotropic: bool) -> tuple[Tensor, Tensor]:
    """Closed-form M-step from the E-step statistics: W = (S beta^T) E[zz^T]^-1 and
    Psi = max(diag(S - W beta S), floor), the exact maximiser under the floor constraint."""
    cov = torch.cholesky_inverse(chol)
    s_beta = moments.sv @ cov
    second = cov + cov @ moments.vsv @ cov
    loadings = torch.linalg.solve(second, s_beta.T).T
    residual = moments.var - (loadings * s_beta).sum(1)
    if isotropic:
        residual = residual.mean().expand_as(residual)
    return loadings, residual.clamp_min(floor)


def _times(cov: Tensor, v: Tensor) -> Tensor:
    """S V, the one D x D x M product of an E-step; on the CPU through OpenBLAS, about 1.5x
    faster than torch's MKL on AMD processors."""
    if cov.device.type == "cpu":
        return torch.from_numpy(cov.numpy() @ v.numpy())
    return cov @ v


def e_step(cov: Tensor, loadings: Tensor, noise_variance: Tensor) -> EStep:
    """E-step on the covariance: statistics, Cholesky factor and exact log-likelihood."""
    v, chol = cholesky_of_precision(loadings, noise_variance)
    sv = _times(cov, v)
    moments = Moments(sv, v.T @ sv, cov.diagonal())
    ll = log_likelihood_from_moments(loadings, noise_variance, chol, moments)
    return EStep(moments, chol, ll)


def _squarem_step(
    cov: Tensor, w: Tensor, psi: Tensor, state: EStep, floor: float, isotropic: bool
) -> tuple[Tensor, Tensor, EStep]:
    """One SQUAREM cycle (Varadhan & Roland, 2008, step length S3) on (W, log Psi).

    Two EM steps give r = F(t) - t and v = F(F(t)) - 2 F(t) + t; the extrapolated point
    t + 2 a r + a^2 v, a = |r| / |v|, is followed by one stabilising EM step and kept only if its
    log-likelihood is at least that of F(t), else the two EM steps are taken. Either way the
    log-likelihood never decreases, and a kept extrapolation costs three E-steps: F(F(t)) is
    never evaluated. log Psi keeps the extrapolated variances positive.
    """
    w1, psi1 = m_step(state.moments, state.chol, floor, isotropic)
    state1 = e_step(cov, w1, psi1)
    w2, psi2 = m_step(state1.moments, state1.chol, floor, isotropic)
    log_psi, log_psi1 = psi.log(), psi1.log()
    r_w, r_p = w1 - w, log_psi1 - log_psi
    v_w, v_p = w2 - w1 - r_w, psi2.log() - log_psi1 - r_p
    a = math.sqrt(
        ((r_w**2).sum() + (r_p**2).sum()).item()
        / max(((v_w**2).sum() + (v_p**2).sum()).item(), 1e-300)
    )
    if 1 < a < math.inf:  # a = 1 is the point of the two EM steps
        w3 = w + 2 * a * r_w + a**2 * v_w
        psi3 = (log_psi + 2 * a * r_p + a**2 * v_p).exp().clamp_min(floor)
        try:
            state3 = e_step(cov, w3, psi3)
            w4, psi4 = m_step(state3.moments, state3.chol, floor, isotropic)
            state4 = e_step(cov, w4, psi4)
            if state4.log_likelihood >= state1.log_likelihood:  # False for NaN
                return w4, psi4, state4
        except torch.linalg.LinAlgError:  # an overflowing extrapolation: not positive definite
            pass
    return w2, psi2, e_step(cov, w2, psi2)


def em_on_covariance(
    cov: Tensor,
    w: Tensor,
    psi: Tensor,
    *,
    floor: float,
    isotropic: bool,
    tol: float,
    max_iter: int,
    accelerate: bool,
    record: Callable[[int, Tensor, Tensor], None],
) -> tuple[Tensor, Tensor]:
    """EM on the covariance S from (w, psi) until an iteration gains less than ``tol`` nats
    per example, or ``max_iter`` iterations. An iteration is one EM step, or with ``accelerate``
    one SQUAREM cycle (three EM steps and an extrapolation: on MNIST about 4x fewer D x D x M
    products than plain EM with the same ``tol``, and 100x closer to the optimum).
    ``record(iteration, ll, elbo)`` is called at the start (iteration 0) and after every
    iteration; the log-likelihood never decreases."""
    state = e_step(cov, w, psi)
    record(0, state.log_likelihood, elbo_from_moments(w, psi, state.chol, state.moments))
    for iteration in range(1, max_iter + 1):
        if accelerate:
            w_new, psi_new, new = _squarem_step(cov, w, psi, state, floor, isotropic)
        else:
            w_new, psi_new = m_step(state.moments, state.chol, floor, isotropic)
            new = e_step(cov, w_new, psi_new)
        gain = (new.log_likelihood - state.log_likelihood).item()
        w, psi, state = w_new, psi_new, new
        record(
            iteration, state.log_likelihood, elbo_from_moments(w, psi, state.chol, state.moments)
        )
        if gain < tol:
            break
    return w, psi


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
        basis = torch.linalg.qr(_times(cov, basis)).Q
    eigenvalues, vectors = torch.linalg.eigh(basis.T @ _times(cov, basis))
    return eigenvalues.flip(0), basis @ vectors.flip(1)


def varimax(loadings: Tensor, tol: float = 1e-6, max_iter: int = 100) -> Tensor:
    """Varimax rotation of D x M loadings (Kaiser, 1958; the same iteration as scikit-learn's).

    It maximises the variance of the squared loadings in each column, so each factor loads on
    few features; the model's covariance, and so its likelihood, is unchanged.
    """
    dim, latent = loadings.shape
    rotation = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    criterion = 0.0
    for _ in range(max_iter):
        rotated = loadings @ rotation
        target = rotated**3 - rotated * (rotated**2).sum(0) / dim
        u, s, vh = torch.linalg.svd(loadings.T @ target)
        rotation = u @ vh
        new = s.sum().item()
        if criterion != 0 and new < criterion * (1 + tol):
            break
        criterion = new
    return loadings @ rotation
