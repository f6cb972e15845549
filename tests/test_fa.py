"""FactorAnalysis / PPCA by EM: exact likelihood, EM guarantees, recovery of a known model, parity
with scikit-learn and the closed-form PPCA solution, DDP, checkpoints and the CLI."""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from scipy.linalg import solve_triangular
from scipy.stats import multivariate_normal
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.decomposition import FactorAnalysis as SklearnFA
from sklearn.decomposition._factor_analysis import _ortho_rotation
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from vaeflow.analysis import rotate
from vaeflow.cli import main
from vaeflow.data import DigitsDataModule, SyntheticFADataModule
from vaeflow.errors import ConfigError, DataError
from vaeflow.metrics import bits_per_dim
from vaeflow.models import FactorAnalysis
from vaeflow.models.fa import MIN_NOISE_FLOOR
from vaeflow.models.fa_blas import add_moments_, symmetric_from_lower
from vaeflow.models.fa_math import (
    Moments,
    elbo_from_moments,
    factorise,
    log_likelihood_from_moments,
    m_step,
    moments_at,
)

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


#: These matrices are tiny: one thread (conftest's ``one_thread``).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trainer(em_trainer) -> Callable[..., Trainer]:
    """Quiet trainers that run EM to its own stopping rule (conftest's ``em_trainer``)."""
    return em_trainer


def fitted(
    trainer: Callable[..., Trainer], data: SyntheticFADataModule, **kwargs
) -> FactorAnalysis:
    model = FactorAnalysis(data.dims, latent_dim=data.latent_dim, **kwargs)
    trainer().fit(model, datamodule=data)
    return model


def random_model(dim: int = 6, latent: int = 2, seed: int = 0) -> FactorAnalysis:
    g = torch.Generator().manual_seed(seed)
    model = FactorAnalysis((dim,), latent_dim=latent)
    with torch.no_grad():
        model.loadings.copy_(torch.randn(dim, latent, generator=g, dtype=F64))
        model.noise_variance.copy_(0.2 + torch.rand(dim, generator=g, dtype=F64))
        model.mean.copy_(torch.randn(dim, generator=g, dtype=F64))
    return model


def covariance(model: FactorAnalysis) -> torch.Tensor:
    return model.loadings @ model.loadings.T + torch.diag(model.noise_variance)


def train_data(data: SyntheticFADataModule) -> torch.Tensor:
    return data.splits["train"].to(F64)


def moments_of(x: torch.Tensor, model: FactorAnalysis) -> Moments:
    xc = x - model.mean
    return moments_at(xc.T @ xc / len(x), factorise(model.loadings, model.noise_variance))


# -- inference under given parameters, against scipy and dense formulas (float64) --------------


def test_log_likelihood_is_exact_against_scipy() -> None:
    model = random_model()
    x = torch.randn(50, 6, dtype=F64) * 2
    expected = multivariate_normal(model.mean.detach().numpy(), covariance(model).detach()).logpdf(
        x.numpy()
    )
    np.testing.assert_allclose(model.log_likelihood(x).numpy(), expected, rtol=1e-12, atol=1e-10)


def test_posterior_matches_the_dense_closed_form() -> None:
    model = random_model()
    x = torch.randn(20, 6, dtype=F64)
    mean, cov = model.posterior(x)
    with torch.no_grad():
        w, c_inv = model.loadings, torch.linalg.inv(covariance(model))
        torch.testing.assert_close(mean, (x - model.mean) @ c_inv @ w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cov, torch.eye(2, dtype=F64) - w.T @ c_inv @ w)


def test_samples_have_the_model_shape_and_covariance() -> None:
    model = random_model()
    torch.manual_seed(0)
    x = model.sample(100_000)
    assert x.shape == (100_000, 6)
    # 1e5 draws: sampling error of a covariance entry ~ 1/sqrt(1e5) relative, so 3% is loose
    error = torch.linalg.norm(x.T.cov() - covariance(model)) / torch.linalg.norm(covariance(model))
    assert error < 0.03


def test_after_an_e_step_the_elbo_equals_the_log_likelihood_and_the_m_step_raises_it() -> None:
    model, x = random_model(seed=1), torch.randn(400, 6, dtype=F64) * 1.5
    with torch.no_grad():
        w, psi = model.loadings.clone(), model.noise_variance.clone()
        model.mean.copy_(x.mean(0))  # the ML mean, as EM uses
        stats, q = moments_of(x, model), factorise(w, psi)
        ll = log_likelihood_from_moments(q, stats)
        assert ll.item() == pytest.approx(model.log_likelihood(x).mean().item(), abs=1e-10)
        assert elbo_from_moments(w, psi, q, stats).item() == pytest.approx(ll.item(), abs=1e-10)
        w_new, psi_new = m_step(q, stats, torch.full((6,), 1e-9, dtype=F64), isotropic=False)
        elbo_new = elbo_from_moments(w_new, psi_new, q, stats)  # old q, new parameters
        model.loadings.copy_(w_new)
        model.noise_variance.copy_(psi_new)
        assert elbo_new > ll  # the M-step raises the bound ...
        assert model.log_likelihood(x).mean() >= elbo_new - 1e-12  # ... which stays below LL


def test_moment_sums_in_chunks_are_the_float64_sums() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(53, 6, generator=g) * 3 + 100).float()  # a large mean against the spread
    shift = x[:10].mean(0, dtype=F64)
    total, gram, buffer = (
        torch.zeros(6, dtype=F64),
        torch.zeros(6, 6, dtype=F64),
        torch.empty(7, 6, dtype=F64),
    )
    for batch in x.split(20):  # batches larger than the buffer, and a ragged last one
        add_moments_(total, gram, batch, shift, buffer)
    xs = x.to(F64) - shift
    torch.testing.assert_close(total, xs.sum(0), rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(symmetric_from_lower(gram), xs.T @ xs, rtol=1e-13, atol=1e-10)


# -- EM guarantees ------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_em_never_lowers_the_log_likelihood(trainer, seed: int, noise: str) -> None:
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2, noise=noise, data_seed=seed)
    model = FactorAnalysis(
        data.dims,
        latent_dim=2,
        noise=noise,
        method="streaming",
        init="random",
        seed=seed,
        max_iter=12,
        tol=0.0,
    )
    trainer().fit(model, datamodule=data)
    ll = np.array([row["train/log_likelihood"] for row in model.history])
    elbo = np.array([row["train/elbo"] for row in model.history])
    assert len(ll) == 13  # one E-step per epoch: max_iter M-steps, then the last E-step
    assert (np.diff(ll) >= -1e-10).all()
    np.testing.assert_allclose(elbo, ll, rtol=0, atol=1e-9)  # ELBO = LL right after an E-step
    assert model.log_likelihood(train_data(data)).mean().item() == pytest.approx(ll[-1], abs=1e-6)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accelerated_em_on_the_moments_never_lowers_the_log_likelihood(
    trainer, seed: int, noise: str
) -> None:
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2, noise=noise, data_seed=seed)
    model = fitted(
        trainer, data, noise=noise, method="moments", init="random", seed=seed, tol=1e-10
    )
    ll = np.array([row["train/log_likelihood"] for row in model.history])
    elbo = np.array([row["train/elbo"] for row in model.history])
    assert len(ll) > 5
    assert (np.diff(ll) >= -1e-10).all()
    np.testing.assert_allclose(elbo, ll, rtol=0, atol=1e-9)
    assert model.log_likelihood(train_data(data)).mean().item() == pytest.approx(ll[-1], abs=1e-8)


def test_squarem_reaches_plain_em_s_fit_in_fewer_iterations(trainer) -> None:
    data = SyntheticFADataModule(num_train=2000, dim=10, latent_dim=3)
    plain = fitted(trainer, data, accelerate=False, init="random", tol=1e-10)
    fast = fitted(trainer, data, init="random", tol=1e-10)
    ll_plain, ll_fast = (m.log_likelihood(train_data(data)).mean().item() for m in (plain, fast))
    assert ll_fast == pytest.approx(ll_plain, abs=1e-7)
    assert int(fast.n_iter) < int(plain.n_iter) / 2


def test_streaming_and_moments_reach_the_same_fit(trainer) -> None:
    data = SyntheticFADataModule(num_train=2000, dim=10, latent_dim=3)
    ll = {
        method: fitted(trainer, data, method=method, tol=1e-8)
        .log_likelihood(train_data(data))
        .mean()
        for method in ("moments", "streaming")
    }
    assert ll["moments"].item() == pytest.approx(ll["streaming"].item(), abs=1e-5)


@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_mixed_precision_training_leaves_em_in_float64(trainer, method: str) -> None:
    """Under bf16 autocast the E-step sums and the M-step still run in float64: the fit equals
    the full-precision one to float64 round-off, not to bf16's three digits."""
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2)
    kwargs = dict(method=method, max_iter=5, tol=0.0)
    full = fitted(trainer, data, **kwargs)
    mixed = FactorAnalysis(data.dims, latent_dim=2, **kwargs)
    trainer(precision="bf16-mixed").fit(mixed, datamodule=data)
    assert mixed.loadings.dtype == F64
    torch.testing.assert_close(covariance(mixed), covariance(full), rtol=1e-10, atol=1e-12)


# -- recovery and parity ------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_recovers_the_true_covariance_and_beats_the_true_parameters(trainer, noise: str) -> None:
    data = SyntheticFADataModule(num_train=20_000, dim=12, latent_dim=3, noise=noise)
    model = fitted(trainer, data, noise=noise)
    truth = data.covariance
    error = torch.linalg.norm(covariance(model) - truth) / torch.linalg.norm(truth)
    assert error < 0.03  # sampling error with 18,000 examples is about 1%
    true_model = FactorAnalysis(data.dims, latent_dim=3)
    with torch.no_grad():
        true_model.loadings.copy_(data.loadings)
        true_model.noise_variance.copy_(data.noise_variance)
        true_model.mean.copy_(data.mean)
    x = train_data(data)
    assert model.log_likelihood(x).mean() >= true_model.log_likelihood(x).mean()


def test_isotropic_em_converges_to_the_closed_form_ppca_solution(trainer) -> None:
    data = SyntheticFADataModule(num_train=3000, dim=10, latent_dim=3, noise="isotropic")
    model = fitted(trainer, data, noise="isotropic", init="random", tol=0.0, max_iter=20_000)
    x = train_data(data)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(x.T, correction=0))
    sigma2 = eigenvalues[:-3].mean()
    assert model.noise_variance[0].item() == pytest.approx(sigma2.item(), rel=1e-7)
    # same subspace: every principal angle between span(W) and the top-3 eigenvectors ~ 0
    basis = torch.linalg.qr(model.loadings.detach()).Q
    cosines = torch.linalg.svdvals(basis.T @ vectors[:, -3:])
    assert cosines.min().item() > 1 - 1e-9
    closed = vectors[:, -3:] @ torch.diag(eigenvalues[-3:] - sigma2) @ vectors[:, -3:].T
    # W W^T is flat in the likelihood near the optimum, so EM pins it less tightly than sigma^2
    torch.testing.assert_close(model.loadings @ model.loadings.T, closed, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_log_likelihood_at_least_scikit_learns(trainer, seed: int) -> None:
    data = SyntheticFADataModule(num_train=4000, dim=15, latent_dim=4, data_seed=seed)
    model = fitted(trainer, data)
    x = train_data(data)
    reference = SklearnFA(4, random_state=0).fit(x.numpy())
    assert model.log_likelihood(x).mean().item() >= reference.score(x.numpy()) - 1e-3


@pytest.mark.parametrize("rotation", ["varimax", "oblimin"])
def test_a_rotation_keeps_the_likelihood_and_matches_scikit_learns_varimax(
    trainer, rotation: str
) -> None:
    """``rotation`` leaves the fitted model (its likelihood) alone and is reported by
    ``rotated()``: the pattern and Phi imply the model's covariance; without Kaiser
    normalisation, varimax is scikit-learn's."""
    data = SyntheticFADataModule(num_train=2000, dim=10, latent_dim=3)
    plain, rotated = fitted(trainer, data), fitted(trainer, data, rotation=rotation)
    x = train_data(data)
    torch.testing.assert_close(rotated.log_likelihood(x), plain.log_likelihood(x))
    pattern, phi, _ = rotated.rotated()
    implied = pattern @ phi @ pattern.T + torch.diag(rotated.noise_variance.detach())
    torch.testing.assert_close(implied, covariance(rotated).detach(), rtol=1e-9, atol=1e-12)
    w = plain.loadings.detach()
    ours = rotate(w, "varimax", normalize=False).loadings.numpy()
    expected = _ortho_rotation(w.numpy(), method="varimax").T
    # the same columns up to order and sign (rotate orders and signs them)
    matches = np.abs(ours.T @ expected) / np.outer(
        np.linalg.norm(ours, axis=0), np.linalg.norm(expected, axis=0)
    )
    np.testing.assert_allclose(np.sort(matches.max(1)), 1.0, rtol=0, atol=1e-6)


def test_an_unknown_rotation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="oblimn"):
        FactorAnalysis((5,), latent_dim=2, rotation="oblimn")


# -- robustness and errors ----------------------------------------------------------------------


def fit_array(
    trainer: Callable[..., Trainer], x: torch.Tensor, latent_dim: int, **kwargs
) -> FactorAnalysis:
    """Fit all rows of ``x`` (N x D) in one batch."""
    model = FactorAnalysis((x.shape[1],), latent_dim=latent_dim, **kwargs)
    trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=len(x)))
    return model


def dense_log_likelihood(model: FactorAnalysis, x: torch.Tensor) -> np.ndarray:
    """log p(x) from the Cholesky factor of the dense D x D covariance in float64, independent
    of fa_math (scipy's multivariate_normal refuses covariances this ill-conditioned)."""
    chol = np.linalg.cholesky(covariance(model).detach().numpy())
    white = solve_triangular(chol, (x - model.mean).detach().numpy().T, lower=True)
    log_det = 2 * np.log(chol.diagonal()).sum()
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + log_det + (white**2).sum(0))


def collinear(n: int = 500, seed: int = 0) -> torch.Tensor:
    """Six features from two factors and noise, plus two that are exact sums of others:
    maximum likelihood drives their noise variances to zero, onto the floor."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    x = z @ torch.randn(2, 6, generator=g, dtype=F64) + 0.3 * torch.randn(
        n, 6, generator=g, dtype=F64
    )
    return torch.cat([x, x[:, :1] + x[:, 1:2], x[:, 2:3] - 2 * x[:, 3:4]], 1)


class Recording(FactorAnalysis):
    """Keeps every EM iterate's parameters, to score them independently."""

    def record(self, iterate) -> None:
        super().record(iterate)
        self.iterates = getattr(self, "iterates", [])
        self.iterates.append((iterate.loadings.clone(), iterate.noise_variance.clone()))


@pytest.mark.parametrize("accelerate", [True, False])
def test_with_the_smallest_floor_the_likelihood_stays_exact_and_em_monotone(
    trainer, accelerate
) -> None:
    """Collinear columns put a noise variance on the smallest floor, 1e-9 of its variance. Every
    iterate's logged log-likelihood is the dense float64 one to 1e-5 nats (measured 1.3e-6: the
    rounding of S divided by the floor), the per-example one to 1e-6, and the dense one never
    decreases: before, the Woodbury path was 2.6e9 nats off and SQUAREM accepted steps that
    lowered it."""
    x = collinear()
    model = Recording(
        (8,), latent_dim=2, noise_floor=MIN_NOISE_FLOOR, accelerate=accelerate, tol=1e-9
    )
    trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=200))
    var = x.var(0, correction=0)
    assert (model.noise_variance[7] / var[7]).item() == pytest.approx(
        MIN_NOISE_FLOOR
    )  # on the floor
    logged = np.array([row["train/log_likelihood"] for row in model.history])
    dense = []
    for w, psi in model.iterates:
        with torch.no_grad():
            model.loadings.copy_(w)
            model.noise_variance.copy_(psi)
        dense.append(dense_log_likelihood(model, x).mean())
    np.testing.assert_allclose(logged, dense, rtol=0, atol=1e-5)
    assert (np.diff(dense) >= -1e-6).all()
    np.testing.assert_allclose(
        model.log_likelihood(x).numpy(), dense_log_likelihood(model, x), atol=1e-6
    )


def test_a_noise_floor_too_small_for_float64_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"noise_floor must be in .1e-09, 1.*float64"):
        FactorAnalysis((5,), latent_dim=2, noise_floor=1e-12)


@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_constant_features_get_the_constant_feature_variance(trainer, method: str) -> None:
    x = collinear()[:, :6].clone()
    x[:, :2] = 0.0  # zero columns, like MNIST's border pixels
    x[:, 2] = 7.0
    model = fit_array(trainer, x, 2, method=method)
    np.testing.assert_allclose(model.noise_variance[:3].detach(), 1e-12, rtol=0)
    assert (model.loadings[:3] == 0).all()
    ll = np.array([row["train/log_likelihood"] for row in model.history])
    assert np.isfinite(ll).all() and (np.diff(ll) >= -1e-9).all()
    np.testing.assert_allclose(
        model.log_likelihood(x).numpy(), dense_log_likelihood(model, x), atol=1e-8
    )


@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_a_single_example_or_only_constant_features_is_a_data_error(trainer, method: str) -> None:
    for x in (torch.randn(1, 5), torch.ones(10, 5)):
        model = FactorAnalysis((5,), latent_dim=2, method=method)
        with pytest.raises(DataError, match=r"every feature .* is constant.*at least two"):
            trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=4))


@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_a_large_offset_fits_as_well_as_the_centred_data(trainer, method: str) -> None:
    """1e6 + noise of 1e-3: the moments are taken about a shift, so the fit is the fit of the
    centred data moved by the offset (float64 keeps 7 digits of the noise)."""
    centred = collinear()[:, :6] * 1e-3
    shifted, plain = (
        fit_array(trainer, centred + 1e6, 2, method=method),
        fit_array(trainer, centred, 2, method=method),
    )
    torch.testing.assert_close(shifted.mean - 1e6, plain.mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(covariance(shifted), covariance(plain), rtol=1e-6, atol=1e-15)
    ll = shifted.log_likelihood(centred + 1e6)
    np.testing.assert_allclose(ll.numpy(), plain.log_likelihood(centred).numpy(), rtol=1e-7)
    np.testing.assert_allclose(ll.numpy(), dense_log_likelihood(shifted, centred + 1e6), rtol=1e-7)


def test_rescaling_features_rescales_the_fit(trainer) -> None:
    """The noise floor is relative to each feature's variance, so features rescaled by factors
    from 1e-3 to 1e3 give the same fit in the new units, and the log-likelihood moves by the
    log-Jacobian. Before, one absolute floor bound some features and not others."""
    x, scale = collinear()[:, :6], torch.logspace(-3, 3, 6, dtype=F64)
    plain, scaled = fit_array(trainer, x, 2, tol=1e-12), fit_array(trainer, x * scale, 2, tol=1e-12)
    torch.testing.assert_close(scaled.mean, plain.mean * scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scaled.noise_variance, plain.noise_variance * scale**2, rtol=1e-5, atol=0
    )
    expected = covariance(plain) * scale[:, None] * scale
    # SQUAREM's step length is not scale-free: the two fits stop at slightly different points
    torch.testing.assert_close(covariance(scaled), expected, rtol=1e-4, atol=0)
    shifted = plain.log_likelihood(x) - scale.log().sum()
    torch.testing.assert_close(scaled.log_likelihood(x * scale), shifted, rtol=0, atol=1e-5)


def test_the_default_fit_does_not_stop_on_a_plateau(trainer) -> None:
    """Raw breast-cancer features (variances 4e-6 to 3e5), M = 5: EM's gains fall below 1e-6
    nats per example long before the maximum (two in a row stopped the fit 0.55 nats short,
    at 22.658). The default fit ends within 1e-3 nats per example of where a long run ends
    (scikit-learn with tol=1e-8: 23.2112)."""
    x = torch.from_numpy(load_breast_cancer().data)
    default = fit_array(trainer, x, 5).log_likelihood(x).mean().item()
    long_run = fit_array(trainer, x, 5, tol=0.0, max_iter=5000).log_likelihood(x).mean().item()
    assert long_run > 23.211
    assert default >= long_run - 1e-3


def test_at_a_tiny_tol_the_fit_ends_by_itself_at_the_converged_likelihood(trainer) -> None:
    """At tol = 1e-12, below the log-likelihood's round-off on raw breast-cancer features
    (EM's round-off decreases reach 2e-8 there), the fit ends by itself, by the round-off rule,
    where a fit run for a fixed large number of iterations ends. Before, it oscillated at
    round-off until max_iter."""
    x = torch.from_numpy(load_breast_cancer().data)
    model = fit_array(trainer, x, 5, tol=1e-12, max_iter=20_000)
    assert int(model.n_iter) < 20_000 and model.stop_reason == "round-off"
    converged = fit_array(trainer, x, 5, tol=0.0, max_iter=5000).log_likelihood(x).mean().item()
    assert model.log_likelihood(x).mean().item() >= converged - 1e-3


def test_without_input_shape_the_model_takes_the_data_module_dims(trainer, tmp_path: Path) -> None:
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2)
    model = FactorAnalysis(latent_dim=2)
    fit = trainer(default_root_dir=tmp_path)
    fit.fit(model, datamodule=data)
    assert model.loadings.shape == (8, 2) and model.hparams.input_shape == (8,)
    fit.save_checkpoint(tmp_path / "fa.ckpt")
    reloaded = FactorAnalysis.load_from_checkpoint(tmp_path / "fa.ckpt")
    x = train_data(data)
    torch.testing.assert_close(reloaded.log_likelihood(x), model.log_likelihood(x))
    with pytest.raises(ConfigError, match="give input_shape"):
        trainer().fit(FactorAnalysis(latent_dim=2), train_dataloaders=DataLoader(x, batch_size=9))


def test_bits_per_dim_rows_come_from_the_data_log_scale(trainer) -> None:
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2)
    model = fitted(trainer, data, data_log_scale=math.log(256))
    for row in model.history:
        expected = bits_per_dim(
            torch.tensor(row["train/log_likelihood"], dtype=F64), 8, math.log(256)
        )
        assert row["train/bits_per_dim"] == pytest.approx(expected.item(), rel=1e-12)
    assert FactorAnalysis.order_free_passes


@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_a_resumed_fit_continues_em_and_ends_at_the_uninterrupted_fit(
    trainer, method: str, tmp_path: Path
) -> None:
    """Interrupted by an epoch budget (streaming) or an iteration budget (moments), then resumed
    from the checkpoint: EM continues from its iteration and parameters. Before, it restarted
    at iteration 0 and ended elsewhere."""
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2)
    kwargs = dict(method=method, init="random", tol=0.0)
    whole = fitted(trainer, data, max_iter=12, **kwargs)
    half = FactorAnalysis(
        data.dims, latent_dim=2, max_iter=12 if method == "streaming" else 5, **kwargs
    )
    trainer(max_epochs=6, enable_checkpointing=True, default_root_dir=tmp_path).fit(
        half, datamodule=data
    )
    assert 0 < int(half.n_iter) < 12
    (checkpoint,) = tmp_path.rglob("epoch=*.ckpt")
    resumed = FactorAnalysis(data.dims, latent_dim=2, max_iter=12, **kwargs)
    trainer().fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert int(resumed.n_iter) == int(whole.n_iter) == 12
    assert resumed.history[0]["train/log_likelihood"] > whole.history[0]["train/log_likelihood"]
    torch.testing.assert_close(resumed.loadings, whole.loadings, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resumed.noise_variance, whole.noise_variance, rtol=1e-9, atol=1e-12)


def test_latent_dim_not_below_the_data_dimension_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="latent_dim must be between 1 and D - 1 = 4"):
        FactorAnalysis((5,), latent_dim=5)


def test_nan_in_the_data_is_a_data_error(trainer) -> None:
    x = torch.randn(100, 5)
    x[17, 2] = float("nan")
    for method in ("moments", "streaming"):
        model = FactorAnalysis((5,), latent_dim=2, method=method)
        with pytest.raises(DataError, match="NaN or infinite"):
            trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=30))


def test_an_empty_data_set_is_a_data_error(trainer) -> None:
    model = FactorAnalysis((5,), latent_dim=2)
    with pytest.raises(DataError, match="empty"):
        trainer().fit(model, train_dataloaders=DataLoader(torch.empty(0, 5), batch_size=10))
    with pytest.raises(DataError, match="at least one example"):
        SyntheticFADataModule(num_train=0).setup()


# -- a user's own array through `vaeflow fit` ----------------------------------------------------


def heteroscedastic(n: int = 3000, dim: int = 15, latent: int = 4) -> np.ndarray:
    """Data from a known factor model with noise variances from 0.01 to 4."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(dim, latent)) * 2
    noise = np.sqrt(np.geomspace(0.01, 4, dim))
    return rng.normal(size=(n, latent)) @ w.T + rng.normal(size=(n, dim)) * noise + 50


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0)


def fashion_rows(root: Path, rows: int = 2000) -> np.ndarray:
    """The first Fashion-MNIST training images, as floats in the user's 0..255 units."""
    with gzip.open(root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz") as file:
        pixels = np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 784)
    return pixels[:rows].astype(np.float64)


USER_ARRAYS = {
    "synthetic": (lambda root: heteroscedastic(), 4),
    "digits": (lambda root: load_digits().data, 10),  # three constant pixels
    "breast_cancer_raw": (lambda root: load_breast_cancer().data, 5),  # variances 4e-6..3e5
    "breast_cancer_standardised": (lambda root: standardised(load_breast_cancer().data), 5),
    "fashion_mnist_rows": (fashion_rows, 16),
}


@pytest.mark.parametrize("name", USER_ARRAYS)
def test_vaeflow_fit_on_a_users_array_is_at_least_scikit_learn(
    name: str, tmp_path: Path, monkeypatch, request, trainer
) -> None:
    """`vaeflow fit` with a YAML of only ArrayDataModule(path) and FactorAnalysis(latent_dim)
    fits every row (the fitted mean is theirs); the fit's log-likelihood is at least scikit-learn's
    FactorAnalysis fitted to the same rows (within 1e-3 nats per example) and within 1e-3 of
    where a long run from the same start ends (the default ``tol`` does not stop on a
    plateau), and the parameters are in the user's units: scikit-learn scores the user's rows
    with them as vaeflow does."""
    make, latent = USER_ARRAYS[name]
    root = request.getfixturevalue("mnist_root") if name.startswith("fashion") else None
    x = make(root)
    monkeypatch.chdir(tmp_path)
    np.save("user.npy", x)
    Path("run.yaml").write_text(
        "data:\n  class_path: vaeflow.data.ArrayDataModule\n  init_args:\n    path: user.npy\n"
        "model:\n  class_path: vaeflow.models.FactorAnalysis\n  init_args:\n"
        f"    latent_dim: {latent}\n"
    )
    main(["fit", "--config", "run.yaml", "--trainer.enable_progress_bar", "false"])
    checkpoint = next(Path("runs").rglob("epoch=*.ckpt"))
    model = FactorAnalysis.load_from_checkpoint(checkpoint)
    rows = x  # factor analysis fits every row unless the config asks for a validation split
    ours = model.log_likelihood(torch.from_numpy(rows)).mean().item()
    with threadpool_limits(limits=1):
        reference = SklearnFA(latent, random_state=0).fit(rows)
    assert ours >= reference.score(rows) - 1e-3
    long_run = fit_array(trainer, torch.from_numpy(rows), latent, tol=0.0, max_iter=5000)
    assert ours >= long_run.log_likelihood(torch.from_numpy(rows)).mean().item() - 1e-3
    # the data module keeps the user's float64 values: the mean is theirs to float64 round-off
    np.testing.assert_allclose(model.mean.detach().numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
    reference.components_ = model.loadings.detach().numpy().T
    reference.noise_variance_ = model.noise_variance.detach().numpy()
    reference.mean_ = model.mean.detach().numpy()
    # scikit-learn scores through the inverse covariance (precision): on raw breast-cancer
    # features (variances 4e-6 to 3e5) its round-off is ~1e-9 relative
    assert reference.score(rows) == pytest.approx(ours, rel=1e-8, abs=1e-9)


# -- checkpoints, DDP and the command line -------------------------------------------------------


def test_reloads_from_a_checkpoint_alone(trainer, tmp_path: Path) -> None:
    data = SyntheticFADataModule(num_train=1000, dim=8, latent_dim=2)
    model = FactorAnalysis(data.dims, latent_dim=2, noise="isotropic")
    fit = trainer(default_root_dir=tmp_path)
    fit.fit(model, datamodule=data)
    fit.save_checkpoint(tmp_path / "fa.ckpt")
    reloaded = FactorAnalysis.load_from_checkpoint(tmp_path / "fa.ckpt")
    assert reloaded.hparams.noise == "isotropic"
    x = train_data(data)
    torch.testing.assert_close(reloaded.log_likelihood(x), model.log_likelihood(x))


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["moments", "streaming"])
def test_two_processes_fit_what_one_process_fits(trainer, method: str, ddp_spawn) -> None:
    """The ``ddp_spawn`` fixture's workers skip interpreter finalisation, where gloo aborted
    about one fit in 15 (see :class:`~vaeflow.lightning_private.SpawnSkippingFinalisation`)."""
    # 1800 training examples shard evenly over 2 ranks, so no example is padded in twice
    data = SyntheticFADataModule(num_train=2000, dim=8, latent_dim=2, batch_size=300)
    kwargs = dict(method=method, max_iter=8, tol=0.0)
    single = fitted(trainer, data, **kwargs)
    double = FactorAnalysis(data.dims, latent_dim=2, **kwargs)
    trainer(strategy=ddp_spawn, devices=2).fit(double, datamodule=data)
    torch.testing.assert_close(covariance(double), covariance(single), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(double.mean, single.mean, rtol=1e-12, atol=1e-12)


def test_cli_fit_logs_every_em_iteration(tmp_path: Path, monkeypatch) -> None:
    """One metrics row per EM iteration (``vaeflow predict`` after it: tests/test_predict.py)."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "fa_synthetic.yaml")
    main(["fit", "--config", config, "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "vaeflow" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    columns = {"train/log_likelihood", "train/elbo", "train/bits_per_dim", "val/log_likelihood"}
    assert columns | {"val/bits_per_dim"} <= set(rows[0])
    assert len(rows) > 2  # one row per EM iteration
    # every row, validation included, is on the EM-iteration axis: no step means two iterations
    assert all(row["step"] == row["em_iteration"] for row in rows)
    assert rows[-1]["val/log_likelihood"] and rows[-1]["step"] == rows[-2]["step"]


@pytest.mark.ddp
def test_the_test_log_likelihood_is_the_exact_mean_on_uneven_shards(
    trainer, ddp_spawn, tmp_path: Path
) -> None:
    """The digits' 359 test rows over 2 processes (shares of 180 and 179): the logged mean is
    the mean over the 359 rows, as on one process (Lightning's synced mean of the batch counts
    divided the total by 358), and the loggers get it in float64."""
    data = DigitsDataModule(batch_size=64)
    model = FactorAnalysis(data.dims, latent_dim=5, max_iter=5)
    trainer().fit(model, datamodule=data)
    data.setup("test")
    exact = model.log_likelihood(data.splits["test"]).mean().item()
    logger = CSVLogger(tmp_path, name="one")
    (one,) = trainer(logger=logger).test(model, datamodule=data, verbose=False)
    (two,) = trainer(strategy=ddp_spawn, devices=2).test(model, datamodule=data, verbose=False)
    assert one["test/log_likelihood"] == pytest.approx(exact, rel=1e-6)
    assert two["test/log_likelihood"] == pytest.approx(exact, rel=1e-6)
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    assert float(rows[-1]["test/log_likelihood"]) == pytest.approx(exact, rel=1e-13)


def test_a_float64_array_with_a_large_offset_fits_in_float64(tmp_path: Path, monkeypatch) -> None:
    """`vaeflow fit` of a float64 .npy with an offset of 1e6 (feature standard deviation
    0.78): the data module keeps float64, so the fitted mean is the sample mean to float64
    round-off (in float32 it was 6e-4 off) and the log-likelihood that of the dense float64
    formula (it was 0.004 nats per example off)."""
    rng = np.random.default_rng(0)
    x = heteroscedastic(n=500, dim=6, latent=2) / 3 + 1e6 + rng.normal(size=(500, 6)) * 0.5
    monkeypatch.chdir(tmp_path)
    np.save("user.npy", x)
    Path("run.yaml").write_text(
        "data:\n  class_path: vaeflow.data.ArrayDataModule\n  init_args:\n    path: user.npy\n"
        "    val_fraction: 0.0\n"
        "model:\n  class_path: vaeflow.models.FactorAnalysis\n  init_args:\n    latent_dim: 2\n"
    )
    main(["fit", "--config", "run.yaml", "--trainer.enable_progress_bar", "false"])
    model = FactorAnalysis.load_from_checkpoint(next(Path("runs").rglob("epoch=*.ckpt")))
    np.testing.assert_allclose(model.mean.detach().numpy(), x.mean(0), rtol=1e-14, atol=0)
    ll = model.log_likelihood(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ll, dense_log_likelihood(model, torch.from_numpy(x)), rtol=1e-9)
