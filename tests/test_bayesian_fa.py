"""BayesianFactorAnalysis: the closed-form updates and the ELBO against dense and Monte-Carlo
references, the number of factors ARD finds, the ELBO's monotonicity, checkpoints, resume, DDP
and the CLI."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import Tensor
from torch.distributions import Gamma, MultivariateNormal, Normal

from vaeflow.cli import main
from vaeflow.data import SyntheticFADataModule
from vaeflow.models import BayesianFactorAnalysis, FactorAnalysis
from vaeflow.models.vbfa_math import (
    Posterior,
    Priors,
    _rotation_objective,
    augment,
    best_rotation,
    elbo,
    latent_means,
    latent_posterior,
    rotate,
    update,
)

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64
PRIORS = Priors(ard_shape=0.5, ard_rate=0.3, noise_shape=2.0, noise_rate=0.7, mean_precision=0.4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trainer(em_trainer: Callable[..., Trainer]) -> Callable[..., Trainer]:
    return em_trainer


def random_posterior(dim: int, latent: int, seed: int) -> Posterior:
    """A posterior with full row covariances and Gamma factors away from the priors."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, latent + 1, latent + 1, generator=g, dtype=F64) * 0.3
    eye = torch.eye(latent + 1, dtype=F64)
    return Posterior(
        row_mean=torch.randn(dim, latent + 1, generator=g, dtype=F64),
        row_cov=factor @ factor.transpose(1, 2) + 0.1 * eye,
        noise_shape=torch.tensor(3.5, dtype=F64),
        noise_rate=1 + torch.rand(dim, generator=g, dtype=F64),
        ard_shape=torch.tensor(2.5, dtype=F64),
        ard_rate=0.5 + torch.rand(latent, generator=g, dtype=F64),
    )


def pass_sums(x: Tensor, q: Posterior):
    """The sums one pass takes, from the whole (centred) data at once."""
    latent = latent_posterior(q)
    z = latent_means(x, latent)
    n = torch.tensor(float(len(x)), dtype=F64)
    sums = augment(n, (x**2).sum(0), x.T @ z, x.sum(0), z.sum(0), z.T @ z, latent.covariance)
    return sums, latent


def dense_q_z(x: Tensor, q: Posterior) -> tuple[Tensor, Tensor]:
    """q(z_n) from the definition: the exponent of E_{q(W,m,tau)} log p(x_n, z_n), gathered as
    a quadratic in z_n term by term, for each example on its own."""
    dim, width = q.row_mean.shape
    latent = width - 1
    tau = q.noise_shape / q.noise_rate
    precision, linear = torch.eye(latent, dtype=F64), []
    for d in range(dim):
        ww = q.row_cov[d] + torch.outer(q.row_mean[d], q.row_mean[d])
        precision = precision + tau[d] * ww[:latent, :latent]
    cov = torch.linalg.inv(precision)
    for n in range(len(x)):
        h = torch.zeros(latent, dtype=F64)
        for d in range(dim):
            ww = q.row_cov[d] + torch.outer(q.row_mean[d], q.row_mean[d])
            h = h + tau[d] * (q.row_mean[d, :latent] * x[n, d] - ww[:latent, latent])
        linear.append(cov @ h)
    return torch.stack(linear), cov


def test_updates_match_a_dense_reference() -> None:
    """q(Z), q(W, m), q(tau), q(alpha) against the textbook updates written example by example
    and row by row (Bishop, 1999; Ghahramani & Beal, 2000); float64 throughout, so the match is
    to round-off (rtol 1e-10)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, dtype=F64)
    q = random_posterior(5, 2, seed=2)
    means, cov = dense_q_z(x, q)
    sums, latent = pass_sums(x, q)
    torch.testing.assert_close(latent_means(x, latent), means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(latent.covariance, cov, rtol=1e-10, atol=1e-12)
    new = update(sums, q, PRIORS)
    zt = torch.cat([means, torch.ones(9, 1, dtype=F64)], 1)  # z~ = [z; 1]
    ezz = zt.T @ zt
    ezz[:2, :2] += 9 * cov
    tau = q.noise_shape / q.noise_rate
    alpha = q.ard_shape / q.ard_rate
    prior = torch.diag(torch.cat([alpha, torch.tensor([PRIORS.mean_precision], dtype=F64)]))
    for d in range(5):
        v = torch.linalg.inv(prior + tau[d] * ezz)
        r = v @ (tau[d] * (zt * x[:, d : d + 1]).sum(0))
        torch.testing.assert_close(new.row_cov[d], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new.row_mean[d], r, rtol=1e-10, atol=1e-12)
        ww = v + torch.outer(r, r)
        residual = sum((x[n, d] ** 2 - 2 * x[n, d] * r @ zt[n]) for n in range(9))
        residual = (residual + (ww * ezz).sum()).item()
        assert new.noise_shape.item() == pytest.approx(PRIORS.noise_shape + 4.5, rel=1e-14)
        assert new.noise_rate[d].item() == pytest.approx(PRIORS.noise_rate + residual / 2, 1e-10)
    for j in range(2):
        w2 = (new.row_cov[:, j, j] + new.row_mean[:, j] ** 2).sum()
        assert new.ard_rate[j].item() == pytest.approx(PRIORS.ard_rate + w2.item() / 2, 1e-10)
    assert new.ard_shape.item() == pytest.approx(PRIORS.ard_shape + 2.5, rel=1e-14)


def test_the_elbo_is_the_monte_carlo_mean_of_log_joint_minus_log_q() -> None:
    """The closed-form ELBO against E_q[log p(X, Z, W, m, tau, alpha) - log q] estimated from
    400,000 joint draws of q, every density from torch.distributions. The tolerance is 5 of
    the estimate's standard errors (measured: the difference is about one)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g, dtype=F64)
    q = random_posterior(2, 1, seed=4)
    sums, latent = pass_sums(x, q)
    exact = elbo(sums, q, latent.covariance, PRIORS)
    torch.manual_seed(5)
    s = 400_000
    z_mean = latent_means(x, latent)
    qz = MultivariateNormal(z_mean, latent.covariance)
    qw = MultivariateNormal(q.row_mean, q.row_cov)
    qtau, qalpha = Gamma(q.noise_shape, q.noise_rate), Gamma(q.ard_shape, q.ard_rate)
    z, w, tau, alpha = qz.sample((s,)), qw.sample((s,)), qtau.sample((s,)), qalpha.sample((s,))
    log_q = (
        qz.log_prob(z).sum(1) + qw.log_prob(w).sum(1) + qtau.log_prob(tau).sum(1)
    ) + qalpha.log_prob(alpha).sum(1)
    fitted = torch.einsum("snm,sdm->snd", z, w[..., :1]) + w[:, None, :, 1]
    log_lik = Normal(fitted, tau[:, None, :].rsqrt()).log_prob(x).sum((1, 2))
    log_prior = (
        Normal(0.0, 1.0).log_prob(z).sum((1, 2))
        + Normal(0.0, alpha[:, None, :].rsqrt()).log_prob(w[..., :1]).sum((1, 2))
        + Normal(0.0, PRIORS.mean_precision**-0.5).log_prob(w[..., 1]).sum(1)
        + Gamma(PRIORS.noise_shape, PRIORS.noise_rate).log_prob(tau).sum(1)
        + Gamma(PRIORS.ard_shape, PRIORS.ard_rate).log_prob(alpha).sum(1)
    )
    values = log_lik + log_prior - log_q
    error = values.std() / s**0.5
    assert abs(values.mean() - exact) < 5 * error, (values.mean(), exact, error)


def test_the_rotation_objective_is_the_elbo_change_and_its_maximum_raises_the_elbo() -> None:
    """For a random transformation R, the exact ELBO after z -> R z, W -> W R^-1 (q(alpha)
    re-optimised) minus the ELBO before is the rotation objective's change from the identity
    (rtol 1e-9: both are float64 sums of O(100) terms); the L-BFGS maximiser raises it."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 6, generator=g, dtype=F64) @ torch.randn(6, 6, generator=g, dtype=F64)
    q = random_posterior(6, 3, seed=7)
    sums, latent = pass_sums(x, q)
    q = update(sums, q, PRIORS)  # q(alpha) optimal, as the objective assumes
    before = elbo(sums, q, latent.covariance, PRIORS)
    r = torch.eye(3, dtype=F64) + 0.3 * torch.randn(3, 3, generator=g, dtype=F64)
    after = elbo(*rotate(sums, q, latent.covariance, r, PRIORS), PRIORS)
    zz, ww = sums.zz[:3, :3], q.second_moments[:, :3, :3].sum(0)
    change = _rotation_objective(r, zz, ww, sums.n, q, PRIORS) - _rotation_objective(
        torch.eye(3, dtype=F64), zz, ww, sums.n, q, PRIORS
    )
    assert (after - before).item() == pytest.approx(change.item(), rel=1e-9)
    best = best_rotation(sums, q, PRIORS)
    assert elbo(*rotate(sums, q, latent.covariance, best, PRIORS), PRIORS) > before


@pytest.mark.parametrize("factors", [3, 6, pytest.param(10, marks=pytest.mark.slow)])
def test_ard_finds_the_true_number_of_factors(trainer, factors: int) -> None:
    """D = 50, N = 2000, heteroscedastic noise (Psi_dd ~ U(0.1, 1)), started at 20 columns:
    ARD keeps exactly the true M, and the held-out log-likelihood of the posterior means is
    within 0.05 nats per example of maximum-likelihood FA fitted with the true M (measured:
    BFA is 0.0024, 0.0025 and 0.0034 above it). The ELBO never decreases by more than
    round-off (1e-12 of its terms' size, measured: no decrease at all)."""
    data = SyntheticFADataModule(
        num_train=2000,
        num_test=2000,
        dim=50,
        latent_dim=factors,
        data_seed=factors,
        val_fraction=0.0,
    )
    model = BayesianFactorAnalysis(data.dims, latent_dim=20, max_iter=1000)
    trainer().fit(model, datamodule=data)
    assert model.effective_factors == factors
    assert model.stop_reason == "aitken"  # measured: after 339, 511 and 465 sweeps
    ml = FactorAnalysis(data.dims, latent_dim=factors)
    trainer().fit(ml, datamodule=data)
    data.setup("test")
    test = data.splits["test"]
    gap = ml.log_likelihood(test).mean() - model.log_likelihood(test).mean()
    assert gap < 0.05
    values = [row["train/elbo"] for row in model.history]
    assert len(values) == int(model.n_iter) > 50
    assert all(b >= a - 1e-12 * abs(a) for a, b in itertools.pairwise(values))
    shares = model.factor_shares.sort(descending=True).values
    # measured: the weakest real factor's share is 0.022 at M = 10, the largest switched-off
    # column's 3e-5 at M = 3: a decade of margin on either side of the threshold, 1e-3
    assert shares[factors - 1] > 10 * model.hparams.prune_threshold > 100 * shares[factors]


def digits_like(num_train: int = 600) -> SyntheticFADataModule:
    return SyntheticFADataModule(num_train=num_train, dim=12, latent_dim=2, batch_size=100)


def test_a_constant_feature_fits_with_a_finite_monotone_elbo(trainer) -> None:
    """An image's border pixel is the same in every example: its starting noise precision
    must stay finite (it was infinite, and the first update's Cholesky failed)."""
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 2] = 0.0
    model = BayesianFactorAnalysis(input_shape=(6,), latent_dim=3, max_iter=20)
    trainer().fit(model, torch.utils.data.DataLoader(x, batch_size=100))
    elbo = torch.tensor([row["train/elbo"] for row in model.history])
    assert torch.isfinite(elbo).all() and len(elbo) > 1
    assert (elbo.diff() >= -1e-9 * elbo.abs()[1:]).all()


def test_a_checkpoint_reloads_alone(trainer, tmp_path: Path) -> None:
    data = digits_like()
    model = BayesianFactorAnalysis(latent_dim=5, max_iter=40)
    fit = trainer()
    fit.fit(model, datamodule=data)
    fit.save_checkpoint(tmp_path / "bfa.ckpt")
    reloaded = BayesianFactorAnalysis.load_from_checkpoint(tmp_path / "bfa.ckpt")
    data.setup("test")
    x = data.splits["test"]
    torch.testing.assert_close(reloaded.log_likelihood(x), model.log_likelihood(x))
    torch.testing.assert_close(reloaded.posterior(x), model.posterior(x))
    assert reloaded.effective_factors == model.effective_factors
    torch.testing.assert_close(reloaded.factor_shares, model.factor_shares)


def test_a_resumed_fit_ends_where_the_uninterrupted_fit_ends(trainer, tmp_path: Path) -> None:
    """Stopped by an epoch budget after a few sweeps, resumed from the checkpoint: it continues
    from its iteration and posterior, and ends at the uninterrupted fit (to round-off)."""
    data = digits_like()
    whole = BayesianFactorAnalysis(data.dims, latent_dim=5, max_iter=25, tol=0.0)
    trainer().fit(whole, datamodule=data)
    half = BayesianFactorAnalysis(data.dims, latent_dim=5, max_iter=25, tol=0.0)
    trainer(max_epochs=8, enable_checkpointing=True, default_root_dir=tmp_path).fit(
        half, datamodule=data
    )
    assert int(half.n_iter) == 7  # the first epoch is the moments pass
    (checkpoint,) = tmp_path.rglob("epoch=*.ckpt")
    resumed = BayesianFactorAnalysis(data.dims, latent_dim=5, max_iter=25, tol=0.0)
    trainer().fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert int(resumed.n_iter) == int(whole.n_iter) == 25
    assert len(resumed.history) == 18
    assert resumed.history[-1]["train/elbo"] == pytest.approx(
        whole.history[-1]["train/elbo"], rel=1e-12
    )
    torch.testing.assert_close(resumed.row_mean, whole.row_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resumed.noise_rate, whole.noise_rate, rtol=1e-9, atol=1e-12)


@pytest.mark.ddp
def test_two_processes_fit_what_one_process_fits(trainer, ddp_spawn) -> None:
    """2000 examples shard evenly over 2 ranks; the float64 sums are reduced once per pass, so
    the sums agree to round-off. The rotation step's L-BFGS amplifies that round-off along the
    directions the ELBO barely sees (the switched-off columns): measured 1.1e-8 relative after
    15 sweeps (5e-11 absolute), so the tolerance is 1e-6 relative, 1e-9 absolute."""
    data = SyntheticFADataModule(num_train=2000, dim=8, latent_dim=2, batch_size=300)
    kwargs = dict(latent_dim=4, max_iter=15, tol=0.0)
    single = BayesianFactorAnalysis(data.dims, **kwargs)
    trainer().fit(single, datamodule=data)
    double = BayesianFactorAnalysis(data.dims, **kwargs)
    trainer(strategy=ddp_spawn, devices=2).fit(double, datamodule=data)
    for name in ("row_mean", "row_cov", "noise_rate", "ard_rate", "centre"):
        torch.testing.assert_close(
            getattr(double, name), getattr(single, name), rtol=1e-6, atol=1e-9
        )


def test_the_config_fits_and_predicts_from_the_cli(tmp_path: Path, monkeypatch) -> None:
    """configs/bayesian_fa_synthetic.yaml: one ``train/elbo`` row per sweep, the number of
    factors found, and ``vaeflow predict`` writes the factor scores."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "bayesian_fa_synthetic.yaml")
    quiet = ["--trainer.enable_progress_bar", "false", "--model.init_args.max_iter", "60"]
    main(["fit", "--config", config, *quiet])
    run = tmp_path / "runs" / "bayesian_fa_synthetic" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    elbos = [float(row["train/elbo"]) for row in rows if row["train/elbo"]]
    assert len(elbos) == 60 and elbos == sorted(elbos)
    assert float(rows[-2]["effective_factors"]) == 6
    pictures = {"factor_shares", "latent_scatter", "loadings", "log_likelihood"}
    assert {p.name for p in (run / "pictures").iterdir()} == pictures
    checkpoint = run / "checkpoints" / "last.ckpt"
    main(["predict", "--config", config, "--ckpt_path", str(checkpoint), *quiet])
    latents = torch.load(next(tmp_path.rglob("latents.pt")))
    assert latents["latents"].shape == (1000, 20) and latents["covariance"].shape == (20, 20)
