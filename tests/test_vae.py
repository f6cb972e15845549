"""VAE: the ELBO estimators, the importance-weighted log-likelihood, training and reloading."""

import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from vaeflow.data import DigitsDataModule
from vaeflow.errors import ConfigError, DataError
from vaeflow.likelihoods import GaussianLikelihood
from vaeflow.models import VAE


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    data = DigitsDataModule(binarize="static")
    data.setup()
    return data.splits["test"][:64]


class LinearGaussian:
    """z ~ N(0, I), x | z ~ N(W z + b, diag(sigma^2)): exact log p(x) and exact posterior."""

    def __init__(self, data_dim: int = 5, latent_dim: int = 2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.W = torch.randn(data_dim, latent_dim, generator=generator, dtype=torch.float64)
        self.b = torch.randn(data_dim, generator=generator, dtype=torch.float64)
        self.sigma = 0.5 + torch.rand(data_dim, generator=generator, dtype=torch.float64)
        precision = torch.eye(latent_dim, dtype=torch.float64) + self.W.T @ (
            self.W / self.sigma[:, None] ** 2
        )
        self.posterior_cov = torch.linalg.inv(precision)
        self.to_posterior_mean = self.posterior_cov @ self.W.T / self.sigma**2

    def decoder(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> nn.Module:
        layer = nn.Linear(input_shape[0], output_shape[0]).double()
        layer.weight.data.copy_(self.W)
        layer.bias.data.copy_(self.b)
        return layer

    def encoder(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> nn.Module:
        """The exact posterior mean, and its marginal standard deviations widened by 20%
        (a diagonal proposal must cover a correlated posterior)."""
        model = self

        class Posterior(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                loc = (x - model.b) @ model.to_posterior_mean.T
                std = 1.2 * model.posterior_cov.diagonal().sqrt().expand_as(loc)
                return torch.cat(
                    [loc, std + torch.log(-torch.expm1(-std))], dim=-1
                )  # inverse softplus

        return Posterior()

    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + torch.diag(self.sigma**2)
        return torch.from_numpy(
            stats.multivariate_normal(self.b.numpy(), cov.numpy()).logpdf(x.numpy())
        )

    def vae(self) -> VAE:
        likelihood = GaussianLikelihood(variance="fixed")
        model = VAE(
            (len(self.b),),
            latent_dim=self.W.shape[1],
            likelihood=likelihood,
            encoder=self.encoder,
            decoder=self.decoder,
        ).double()
        likelihood.raw_std = self.sigma  # fixed per-dimension noise of the true model
        return model


def test_importance_weighted_estimate_matches_exact_linear_gaussian_marginal() -> None:
    torch.manual_seed(0)
    truth = LinearGaussian()
    x = torch.distributions.MultivariateNormal(
        truth.b, truth.W @ truth.W.T + torch.diag(truth.sigma**2)
    ).sample((200,))
    estimate = truth.vae().log_likelihood(x, num_samples=1000)
    exact = truth.exact_log_likelihood(x)
    assert (estimate - exact).abs().mean() < 0.1  # nats per example, K = 1000
    assert (estimate - exact).abs().max() < 0.1


def test_importance_weighted_estimate_grows_with_k_and_bounds_the_elbo(digits) -> None:
    torch.manual_seed(0)
    model = VAE((64,), latent_dim=4)
    estimates = [
        model.log_likelihood(digits, num_samples=k).mean().item() for k in (1, 10, 100, 1000)
    ]
    assert estimates == sorted(estimates)
    with torch.no_grad():
        elbo = model.elbo(digits, num_samples=1000).mean().item()
    assert estimates[-1] >= elbo
    assert estimates[0] == pytest.approx(elbo, abs=0.5)  # K = 1 is the ELBO, in expectation


def test_both_elbo_estimators_agree_in_expectation(digits) -> None:
    torch.manual_seed(0)
    model = VAE((64,), latent_dim=4)
    x = digits[:8]
    with torch.no_grad():
        analytic, _, analytic_kl = model.elbo_terms(x, 20_000, "analytic_kl")
        monte_carlo, _, monte_carlo_kl = model.elbo_terms(x, 20_000, "monte_carlo")
        posterior = model.encode(x)
        z = posterior.sample((20_000,))
        spread = (posterior.log_prob(z) - model.prior().log_prob(z)).std(0) / math.sqrt(20_000)
    assert ((analytic_kl - monte_carlo_kl).abs() < 5 * spread).all()
    # the reconstruction terms are independent Monte-Carlo estimates of the same expectation
    assert ((analytic - monte_carlo).abs() < 0.05 * analytic.abs()).all()


def per_example_variances(model: VAE, x: torch.Tensor, draws: int = 2000) -> dict[str, float]:
    """Variance over ``draws`` one-sample estimates of each example's ELBO, averaged over
    the examples, for both estimators."""
    with torch.no_grad():
        repeated = x.repeat(draws, *[1] * (x.dim() - 1))
        variances = {}
        for estimator in ("analytic_kl", "monte_carlo"):
            torch.manual_seed(0)
            elbo = model.elbo(repeated, 1, estimator).reshape(draws, len(x))
            variances[estimator] = elbo.var(0).mean().item()
    return variances


def test_which_elbo_estimator_has_the_lower_variance(digits) -> None:
    """Neither in general, as VAE.elbo states: on the linear-Gaussian model with its exact
    posterior widened by 20% the Monte-Carlo estimator's variance is 0.27 against the analytic
    KL's 2.14 (log p(x, z) - log q(z|x) nearly cancels); on an untrained digits VAE it is
    0.70 against 0.23 (seed 0, 20 examples, 2,000 draws each)."""
    torch.manual_seed(0)
    truth = LinearGaussian()
    x = torch.distributions.MultivariateNormal(
        truth.b, truth.W @ truth.W.T + torch.diag(truth.sigma**2)
    ).sample((20,))
    linear = per_example_variances(truth.vae(), x)
    assert linear["monte_carlo"] < 0.2 * linear["analytic_kl"]
    torch.manual_seed(0)
    untrained = per_example_variances(VAE((64,), latent_dim=4), digits[:20])
    assert untrained["analytic_kl"] < 0.5 * untrained["monte_carlo"]


@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo", "importance_weighted"])
def test_training_improves_the_bound(silent_trainer, estimator: str) -> None:
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64, binarize="dynamic")
    model = VAE((64,), latent_dim=4, estimator=estimator, num_samples=2)
    data.setup()
    x = data.splits["val"]
    before = model.log_likelihood(x, 50).mean()
    silent_trainer(max_epochs=3).fit(model, data)
    after = model.log_likelihood(x, 50).mean()
    assert after > before + 5.0


def test_alternating_training_moves_encoder_and_decoder_in_turn(silent_trainer) -> None:
    pl.seed_everything(0)
    model = VAE(
        (64,), latent_dim=4, likelihood="gaussian", prior="learned_gaussian", training="alternating"
    )
    e_step, m_step = model.configure_optimizers()[0]
    e_params = {id(p) for group in e_step.param_groups for p in group["params"]}
    m_params = {id(p) for group in m_step.param_groups for p in group["params"]}
    assert e_params == {id(p) for p in model.encoder.parameters()}
    assert m_params | e_params == {id(p) for p in model.parameters()} and not m_params & e_params
    data = DigitsDataModule(batch_size=64)
    data.setup()
    before = model.log_likelihood(data.splits["val"], 50).mean()
    trainer = silent_trainer(max_epochs=3)
    trainer.fit(model, data)
    assert trainer.global_step == 2 * 3 * len(
        data.train_dataloader()
    )  # an E- and an M-step per batch
    assert model.log_likelihood(data.splits["val"], 50).mean() > before + 5.0


def test_schedulers_step_once_per_epoch(silent_trainer) -> None:
    model = VAE(
        (64,),
        latent_dim=2,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    silent_trainer(max_epochs=2, limit_val_batches=0).fit(model, DigitsDataModule())
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(0.0025)
    plateau = VAE(
        (64,),
        latent_dim=2,
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, threshold=0.5
        ),
    )
    silent_trainer(max_epochs=2, limit_val_batches=0).fit(plateau, DigitsDataModule())
    # the second epoch's objective is not half the first's, so Adam's rate drops tenfold
    assert plateau.optimizers().param_groups[0]["lr"] == pytest.approx(1e-4)


def test_gradient_norm_is_clipped(silent_trainer) -> None:
    pl.seed_everything(0)
    model = VAE(
        (64,),
        latent_dim=2,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        gradient_clip_val=1e-3,
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    silent_trainer(max_steps=1, limit_val_batches=0).fit(model, DigitsDataModule())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 * (1 + 1e-5)


def test_validation_and_test_log_nats_bits_and_importance_weighted_likelihood(
    silent_trainer,
) -> None:
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=128, binarize="static")
    model = VAE((64,), latent_dim=4, eval_samples=20)
    trainer = silent_trainer(max_epochs=1)
    trainer.fit(model, data)
    assert math.isfinite(trainer.callback_metrics["val/log_likelihood"])
    metrics = trainer.test(model, data, verbose=False)[0]
    for name in ("elbo", "reconstruction", "kl", "log_likelihood", "elbo_bits_per_dim"):
        assert math.isfinite(metrics[f"test/{name}"])
    assert metrics["test/elbo_bits_per_dim"] == pytest.approx(
        -metrics["test/elbo"] / (64 * math.log(2)), rel=1e-5
    )
    assert metrics["test/log_likelihood"] >= metrics["test/elbo"]


def test_reloads_from_a_checkpoint_alone(silent_trainer, tmp_path) -> None:
    pl.seed_everything(0)
    model = VAE((64,), latent_dim=3, likelihood="gaussian", prior="learned_gaussian", beta=0.5)
    trainer = silent_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=256))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = VAE.load_from_checkpoint(path)
    assert isinstance(reloaded.likelihood, GaussianLikelihood)
    assert reloaded.beta == 0.5
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    x = torch.rand(4, 64)
    torch.manual_seed(1)
    expected = model.elbo(x)
    torch.manual_seed(1)
    torch.testing.assert_close(reloaded.elbo(x), expected)


def test_a_checkpoint_that_stores_no_net_names_reloads_with_mlps(silent_trainer, tmp_path) -> None:
    """Checkpoints written before nets had names store ``encoder: None``: still the MLPs."""
    model = VAE((64,), latent_dim=3)
    trainer = silent_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=256))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"].update(encoder=None, decoder=None)
    torch.save(checkpoint, path)
    reloaded = VAE.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_validation_can_be_turned_off(silent_trainer) -> None:
    trainer = silent_trainer(max_epochs=1)
    trainer.fit(VAE((64,), latent_dim=2), DigitsDataModule(val_fraction=0.0, batch_size=256))
    assert "train/elbo" in trainer.callback_metrics
    assert "val/elbo" not in trainer.callback_metrics


def test_data_outside_the_likelihood_support_is_refused_before_training(silent_trainer) -> None:
    model = VAE((64,), latent_dim=2, likelihood="bernoulli")
    with pytest.raises(DataError, match=r"outside the support of the 'bernoulli'.*scale: true"):
        silent_trainer().fit(model, DigitsDataModule(scale=False))


def test_sample_and_predict_shapes(silent_trainer) -> None:
    model = VAE((1, 8, 8), latent_dim=3)
    assert model.sample(5).shape == (5, 1, 8, 8)
    assert set(model.sample(5).unique().tolist()) <= {0.0, 1.0}
    assert ((model.sample(5, mean=True) > 0) & (model.sample(5, mean=True) < 1)).all()
    codes = silent_trainer().predict(model, DigitsDataModule(flatten=False, batch_size=100))
    assert torch.cat(codes).shape == (359, 3)


@pytest.mark.ddp
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_two_processes_train_with_unevenly_divisible_data(
    silent_trainer, ddp_spawn, steps_per_call: int
) -> None:
    """1293 training and 145 validation examples over 2 processes: equal batch counts, no hang
    (with 2 steps per call, the 5 batches per process end inside a call)."""
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=128, val_fraction=0.1005)
    data.setup()
    assert len(data.splits["train"]) % 2 == 1 and len(data.splits["val"]) % 2 == 1
    model = VAE((64,), latent_dim=2, steps_per_call=steps_per_call)
    trainer = silent_trainer(max_epochs=1, strategy=ddp_spawn, devices=2)
    trainer.fit(model, data)
    assert math.isfinite(trainer.callback_metrics["val/elbo"])


@pytest.mark.ddp
def test_two_processes_write_the_latent_codes_of_one(silent_trainer, ddp_spawn, tmp_path) -> None:
    model = VAE((64,), latent_dim=3)
    data = DigitsDataModule(batch_size=50)  # 359 test examples: shares of 179 and 180
    silent_trainer(default_root_dir=tmp_path / "one").predict(model, data, return_predictions=False)
    silent_trainer(default_root_dir=tmp_path / "two", strategy=ddp_spawn, devices=2).predict(
        model, data, return_predictions=False
    )
    one = torch.load(tmp_path / "one" / "latents.pt")["latents"]
    two = torch.load(tmp_path / "two" / "latents.pt")["latents"]
    assert one.shape == (359, 3)
    torch.testing.assert_close(two, one)
    assert not list((tmp_path / "two").glob("latents_rank*.pt"))


@pytest.mark.parametrize(
    "arguments",
    [{"latent_dim": 0}, {"num_samples": 0}, {"eval_samples": -1}, {"steps_per_call": 0}],
)
def test_sizes_out_of_range_are_refused(arguments: dict) -> None:
    ((name, value),) = arguments.items()
    with pytest.raises(ConfigError, match=f"{name}={value}"):
        VAE((64,), **arguments)


def test_the_latent_code_writer_is_attached_for_predict_only(silent_trainer) -> None:
    from vaeflow.callbacks import LatentCodeWriter

    trainer = silent_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(VAE((64,), latent_dim=2), DigitsDataModule())
    assert not any(isinstance(c, LatentCodeWriter) for c in trainer.callbacks)


def test_the_standard_normal_prior_follows_the_model_to_another_dtype() -> None:
    """Its distribution is kept between steps and rebuilt when ``.to()`` replaces the buffers."""
    model = VAE(input_shape=(4,), latent_dim=3)
    assert model.prior() is model.prior()  # one object per step, not one per call
    assert model.prior().sample((2,)).dtype == torch.float32
    model.double()
    assert model.prior().sample((2,)).dtype == torch.float64
    x = torch.rand(5, 4, dtype=torch.float64).round()
    assert model.elbo(x).dtype == torch.float64


def test_encoder_scales_are_capped_and_the_range_is_checked() -> None:
    model = VAE(input_shape=(4,), latent_dim=3, posterior_scale_range=(1e-4, 10.0))
    with torch.no_grad():
        last = model.encoder.layers[-1]
        last.weight.zero_()
        last.bias.fill_(1e30)  # a diverged encoder: loc and raw scale at 1e30
    posterior = model.encode(torch.rand(5, 4))
    torch.testing.assert_close(posterior.stddev, torch.full((5, 3), 10.0))
    last.bias.data[3:] = -1e30
    assert (model.encode(torch.rand(5, 4)).stddev == 1e-4).all()
    with pytest.raises(ConfigError, match=r"floor 1\.0, cap 0\.5"):
        VAE(input_shape=(4,), posterior_scale_range=(1.0, 0.5))


@pytest.mark.ddp
def test_the_test_means_are_exact_on_uneven_shards(silent_trainer, ddp_spawn) -> None:
    """The digits' 359 test rows over 2 processes (180 and 179): the test KL (analytic, so
    the same numbers on one process and on two) is the mean over the 359 rows either way."""
    model = VAE((64,), latent_dim=3, eval_samples=0)
    data = DigitsDataModule(batch_size=64)
    (one,) = silent_trainer().test(model, data, verbose=False)
    (two,) = silent_trainer(strategy=ddp_spawn, devices=2).test(model, data, verbose=False)
    data.setup("test")
    x = data.splits["test"]
    with torch.no_grad():
        posterior = model.encode(x)
        exact = model.kl(posterior, posterior.rsample()).mean().item()
    assert one["test/kl"] == pytest.approx(exact, rel=1e-5)
    assert two["test/kl"] == pytest.approx(exact, rel=1e-5)


def test_a_vae_trains_on_float64_data_in_its_own_dtype(silent_trainer, tmp_path) -> None:
    """A float64 array stays float64 in the data module (for factor analysis); the VAE gets
    each batch in its network's dtype."""
    from vaeflow.data import ArrayDataModule

    x = np.random.default_rng(0).normal(size=(64, 5))
    np.save(tmp_path / "x.npy", x)
    data = ArrayDataModule(str(tmp_path / "x.npy"), batch_size=16)
    model = VAE((5,), latent_dim=2, likelihood=GaussianLikelihood())
    silent_trainer().fit(model, data)
    assert data.splits["train"].dtype == torch.float64
    assert model.dtype == torch.float32
    assert math.isfinite(silent_trainer().validate(model, data, verbose=False)[0]["val/elbo"])
