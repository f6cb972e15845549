"""MixtureOfFactorAnalyzers: exact log-likelihood and responsibilities against SciPy, one EM step
against a dense reference, monotone EM for every noise family, recovery of a known mixture
against scikit-learn's GaussianMixture, checkpoints, resume, DDP and the CLI."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture
from torch import Tensor
from torch.utils.data import DataLoader

from vaeflow.cli import main
from vaeflow.data import ArrayDataModule
from vaeflow.errors import DataError
from vaeflow.models import BayesianFactorAnalysis, MixtureOfFactorAnalyzers
from vaeflow.models.mfa import EMPass, MixtureFit

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trainer(em_trainer: Callable[..., Trainer]) -> Callable[..., Trainer]:
    return em_trainer


def mixture(n: int, seed: int = 0, dim: int = 10, latent: int = 2):
    """Training and test draws (with labels) from a mixture of 3 FA models: weights 0.5, 0.3,
    0.2, means N(0, 16 I), loadings N(0, 1), noise variances U(0.1, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, dim, latent, generator=g, dtype=F64)
    mu = 4 * torch.randn(3, dim, generator=g, dtype=F64)
    psi = 0.1 + 0.9 * torch.rand(3, dim, generator=g, dtype=F64)

    def draw(count: int) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), count, True, generator=g)
        z = torch.randn(count, latent, generator=g, dtype=F64)
        eps = torch.randn(count, dim, generator=g, dtype=F64)
        return mu[k] + torch.einsum("ndm,nm->nd", w[k], z) + eps * psi[k].sqrt(), k

    return draw(n), draw(n)


def fitted(trainer, x: Tensor, **kwargs) -> MixtureOfFactorAnalyzers:
    model = MixtureOfFactorAnalyzers(x.shape[1:], num_components=3, latent_dim=2, **kwargs)
    trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=700))
    return model


def random_model(seed: int = 0, noise: str = "diagonal") -> MixtureOfFactorAnalyzers:
    g = torch.Generator().manual_seed(seed)
    model = MixtureOfFactorAnalyzers((5,), num_components=3, latent_dim=2, noise=noise)
    with torch.no_grad():
        model.loadings.copy_(torch.randn(3, 5, 2, generator=g, dtype=F64))
        model.mean.copy_(2 * torch.randn(3, 5, generator=g, dtype=F64))
        model.noise_variance.copy_(0.2 + torch.rand(3, 5, generator=g, dtype=F64))
        model.weights.copy_(torch.tensor([0.2, 0.5, 0.3], dtype=F64))
        model.centre.copy_(torch.randn(5, generator=g, dtype=F64))
    return model


def test_log_likelihood_and_responsibilities_match_scipy() -> None:
    """Against the dense mixture density (SciPy, float64): rtol 1e-10."""
    model = random_model()
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    joint = np.stack(
        [
            np.log(model.weights[k].item())
            + multivariate_normal(
                model.mean[k].detach().numpy(),
                (model.loadings[k] @ model.loadings[k].T + torch.diag(model.noise_variance[k]))
                .detach()
                .numpy(),
            ).logpdf(x.numpy())
            for k in range(3)
        ],
        1,
    )
    expected = logsumexp(joint, 1)
    np.testing.assert_allclose(model.log_likelihood(x).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(
        model.responsibilities(x).numpy(), np.exp(joint - expected[:, None]), rtol=1e-9, atol=1e-14
    )


def dense_em_step(model: MixtureOfFactorAnalyzers, x: Tensor, floor: Tensor):
    """One EM step written from Ghahramani & Hinton (1996) with full D x D covariances:
    beta_k = W_k^T C_k^-1, E[z] = beta_k (x - mu_k), E[zz^T] = I - beta_k W_k + E[z] E[z]^T,
    [W_k, mu_k] = (sum h x E[z~]^T)(sum h E[z~ z~^T])^-1, Psi_k = diag(sum h (x - W~ E[z~]) x^T)
    / sum h, pi_k = mean of h."""
    w, mu = model.loadings.detach(), model.mean.detach()
    psi, pi = model.noise_variance.detach(), model.weights.detach()
    h = model.responsibilities(x)
    out = []
    for k in range(3):
        cov = w[k] @ w[k].T + torch.diag(psi[k])
        beta = w[k].T @ torch.linalg.inv(cov)
        ez = (x - mu[k]) @ beta.T
        ezz = torch.eye(2, dtype=F64) - beta @ w[k]
        zt = torch.cat([ez, torch.ones(len(x), 1, dtype=F64)], 1)
        second = (h[:, k, None, None] * (zt[:, :, None] * zt[:, None, :])).sum(0)
        second[:2, :2] += h[:, k].sum() * ezz
        joint = (h[:, k, None] * x).T @ zt @ torch.linalg.inv(second)
        noise = ((h[:, k, None] * (x - zt @ joint.T)) * x).sum(0) / h[:, k].sum()
        out.append((joint[:, :2], joint[:, 2], torch.maximum(noise, floor)))
    weights = h.mean(0)
    return out, weights, pi


def test_one_em_step_matches_a_dense_reference() -> None:
    """The streamed M-step (sums about the centre, two batches) equals the dense textbook step
    to round-off (rtol 1e-9)."""
    model = random_model()
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    floor = torch.full((5,), 1e-6, dtype=F64)
    expected, weights, _ = dense_em_step(model, x, floor)
    fit = MixtureFit(model, {"started": True, "floor": floor})
    step = EMPass(fit)
    step.add(x[:25])
    step.add(x[25:])
    assert isinstance(step.finish(*step.sums), EMPass)
    for k, (w, mu, psi) in enumerate(expected):
        torch.testing.assert_close(model.loadings[k].detach(), w, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(model.mean[k].detach(), mu, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(model.noise_variance[k].detach(), psi, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(model.weights.detach(), weights, rtol=1e-12, atol=0)


def test_a_known_mixture_is_recovered_and_beats_a_full_gaussian_mixture(trainer) -> None:
    """3 FA components (D = 10, M = 2), 3000 training and 3000 test examples: the clusters are
    found (adjusted Rand index >= 0.95; measured 1.0), and the held-out log-likelihood is at
    least scikit-learn's GaussianMixture(3, "full") (measured -13.962 against -13.977 nats per
    example: the mixture of FA has 41 parameters per component against 65)."""
    (x, _), (test, labels) = mixture(3000)
    model = fitted(trainer, x)
    assert model.stop_reason == "aitken"
    ari = adjusted_rand_score(labels.numpy(), model.responsibilities(test).argmax(1).numpy())
    assert ari >= 0.95
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x.numpy())
    assert model.log_likelihood(test).mean().item() >= gmm.score(test.numpy())


@pytest.mark.parametrize("noise", ["diagonal", "shared", "isotropic"])
def test_em_never_lowers_the_log_likelihood(trainer, noise: str) -> None:
    """Every iteration's exact log-likelihood is at least the previous one's, up to round-off
    (1e-12 relative; measured: no decrease), and the fit stops by itself."""
    (x, _), _ = mixture(3000)
    model = fitted(trainer, x, noise=noise)
    values = [row["train/log_likelihood"] for row in model.history]
    assert len(values) > 10 and model.stop_reason in ("aitken", "round-off")
    assert all(b >= a - 1e-12 * abs(a) for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(model.log_likelihood(x).mean().item(), abs=1e-4)
    if noise != "diagonal":  # the family's constraint holds
        psi = model.noise_variance.detach()
        tied = psi[0].expand_as(psi) if noise == "shared" else psi[:, :1].expand_as(psi)
        torch.testing.assert_close(psi, tied, rtol=0, atol=0)


def array_data(tmp_path: Path, x: Tensor) -> ArrayDataModule:
    np.save(tmp_path / "x.npy", x.numpy())
    return ArrayDataModule(str(tmp_path / "x.npy"), val_fraction=0.0, test_fraction=0.2)


def test_a_checkpoint_reloads_alone_and_a_resumed_fit_ends_at_the_whole_fit(
    trainer, tmp_path: Path
) -> None:
    (x, _), (test, _) = mixture(1000, seed=2)
    data = array_data(tmp_path, x)
    kwargs = dict(num_components=3, latent_dim=2, max_iter=20, tol=0.0, kmeans_iter=3)
    whole = MixtureOfFactorAnalyzers(**kwargs)
    fit = trainer()
    fit.fit(whole, datamodule=data)
    fit.save_checkpoint(tmp_path / "mfa.ckpt")
    reloaded = MixtureOfFactorAnalyzers.load_from_checkpoint(tmp_path / "mfa.ckpt")
    torch.testing.assert_close(reloaded.log_likelihood(test), whole.log_likelihood(test))
    torch.testing.assert_close(reloaded.responsibilities(test), whole.responsibilities(test))
    half = MixtureOfFactorAnalyzers(**kwargs)
    folder = tmp_path / "half"
    trainer(max_epochs=12, enable_checkpointing=True, default_root_dir=folder).fit(
        half, datamodule=data
    )
    # 1 moments pass and 3 Lloyd passes, then 8 EM passes (iterations 0-7), each ending with an
    # M-step: the parameters are iterate 8
    assert int(half.n_iter) == 8
    (checkpoint,) = folder.rglob("epoch=*.ckpt")
    resumed = MixtureOfFactorAnalyzers(**kwargs)
    trainer().fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert int(resumed.n_iter) == int(whole.n_iter) == 20
    for name in ("loadings", "mean", "noise_variance", "weights"):
        torch.testing.assert_close(
            getattr(resumed, name), getattr(whole, name), rtol=1e-9, atol=1e-12
        )


@pytest.mark.ddp
def test_two_processes_fit_what_one_process_fits(trainer, ddp_spawn, tmp_path: Path) -> None:
    """2000 training rows over 2 ranks (contiguous shares of 1000): k-means++ seeds from the
    first 500 rows of rank 0's first batch, the same rows as on one process, and every sum is
    reduced once per pass, so the fits agree to round-off (relative 1e-9)."""
    (x, _), _ = mixture(2500, seed=3)
    data = array_data(tmp_path, x)
    kwargs = dict(
        input_shape=(10,), num_components=3, latent_dim=2, max_iter=15, tol=0.0, init_sample=500
    )
    single = MixtureOfFactorAnalyzers(**kwargs)
    trainer().fit(single, datamodule=data)
    double = MixtureOfFactorAnalyzers(**kwargs)
    trainer(strategy=ddp_spawn, devices=2).fit(double, datamodule=data)
    for name in ("loadings", "mean", "noise_variance", "weights"):
        torch.testing.assert_close(
            getattr(double, name), getattr(single, name), rtol=1e-9, atol=1e-12
        )


def test_the_digits_config_fits_and_predicts_from_the_cli(tmp_path: Path, monkeypatch) -> None:
    """configs/mfa_digits.yaml (fewer iterations): one monotone ``train/log_likelihood`` row per
    EM iteration; ``vaeflow predict`` writes responsibilities and per-component latent means."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "mfa_digits.yaml")
    quiet = ["--trainer.enable_progress_bar", "false", "--model.init_args.max_iter", "15"]
    main(["fit", "--config", config, *quiet])
    run = tmp_path / "runs" / "mfa_digits" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    values = [float(row["train/log_likelihood"]) for row in rows if row["train/log_likelihood"]]
    assert len(values) == 16 and values == sorted(values)
    assert sorted(p.name for p in (run / "pictures").iterdir()) == ["components", "log_likelihood"]
    main(["predict", "--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    latents = torch.load(next(tmp_path.rglob("latents.pt")))
    assert latents["responsibilities"].shape == (359, 10)
    torch.testing.assert_close(latents["responsibilities"].sum(1), torch.ones(359, dtype=F64))
    assert latents["latents"].shape == (359, 10, 5) and latents["covariance"].shape == (10, 5, 5)


@pytest.mark.parametrize("model_class", [MixtureOfFactorAnalyzers, BayesianFactorAnalysis])
def test_an_empty_training_set_is_a_data_error(trainer, model_class) -> None:
    """The base's check: a fit that finished no pass says so, rather than leave the start."""
    model = model_class((5,), latent_dim=2)
    with pytest.raises(DataError, match="empty"):
        trainer().fit(model, train_dataloaders=DataLoader(torch.empty(0, 5), batch_size=4))
