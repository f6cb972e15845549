"""Every registered variational family q(z|x), generated from the registry: it trains a step with
every prior and several likelihoods, checkpoints and reloads alone; its log-density of its own
samples (and of other points) is the change of variables of its sampling map; and everything
that takes q works with it (both ELBO estimators, the IWAE bound, alternating training, the test
evaluator, predict, pictures). Checkpoints written before families were registered reload as
``diagonal_gaussian``."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from test_scale import BF16_MARGIN, fit_digits
from test_vae_registry import SMALL, assert_trains_checkpoints_and_reloads
from torch.distributions import MultivariateNormal, kl_divergence
from torch.utils.data import DataLoader

from vaeflow.callbacks.pictures import Examples
from vaeflow.cli import main
from vaeflow.errors import ConfigError
from vaeflow.models import VAE
from vaeflow.nets import MLP
from vaeflow.posteriors import (
    MEAN_SAMPLES,
    DiagonalGaussianPosterior,
    FlowDistribution,
    PosteriorContext,
)
from vaeflow.priors import StandardDiagonalNormal, StandardNormal, monte_carlo_kl
from vaeflow.registry import POSTERIORS, PRIORS

DATA = Path(__file__).resolve().parent / "data"
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
#: constructor arguments that keep a registered family small in a test
SMALL_POSTERIORS = {"iaf": {"hidden": (8,), "context": 4}, "planar": {"num_flows": 2}}
#: likelihoods beside bernoulli (which meets every prior): continuous, heavy-tailed, discrete
LIKELIHOODS = ["gaussian", "laplace", "categorical"]


def posterior(name: str):
    return POSTERIORS.build(name, **SMALL_POSTERIORS.get(name, {}))


def small_vae(name: str, **kwargs) -> VAE:
    torch.manual_seed(0)
    net = functools.partial(MLP, hidden=(16,))
    kwargs = {"latent_dim": 3, "encoder": net, "decoder": net} | kwargs
    return VAE((6,), posterior=posterior(name), **kwargs)


def binary_data(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 2, (n, 6), generator=torch.Generator().manual_seed(1)).float()


@pytest.mark.parametrize(
    ("prior", "likelihood"),
    [(prior, "bernoulli") for prior in PRIORS.names()]
    + [("standard_normal", likelihood) for likelihood in LIKELIHOODS],
)
@pytest.mark.parametrize("name", POSTERIORS.names())
def test_every_posterior_trains_checkpoints_and_reloads(
    silent_trainer, tmp_path, name: str, prior: str, likelihood: str
) -> None:
    pl.seed_everything(0)
    model = VAE(
        (12,),
        latent_dim=2,
        likelihood=likelihood,
        prior=PRIORS.build(prior, **SMALL.get(prior, {})),
        posterior=posterior(name),
    )
    assert_trains_checkpoints_and_reloads(model, silent_trainer, tmp_path)
    reloaded = VAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert type(reloaded.posterior) is type(model.posterior)
    assert vars(reloaded.posterior).keys() == vars(model.posterior).keys()


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_the_encoder_outputs_what_the_posterior_asks(name: str) -> None:
    model = small_vae(name, latent_dim=4)
    assert model.encoder.layers[-1].out_features == model.posterior.num_outputs
    q = model.encode(binary_data(5))
    assert q.batch_shape == (5,) and q.event_shape == (4,) and q.has_rsample


def sampling_map(q, monkeypatch):
    """z as a function of the standard-normal noise its ``rsample`` draws (torch's Normal and
    MultivariateNormal both take it from ``_standard_normal``)."""
    noise: list[torch.Tensor] = []
    for module in ("normal", "multivariate_normal"):
        monkeypatch.setattr(
            f"torch.distributions.{module}._standard_normal", lambda *args, **kwargs: noise[-1]
        )

    def z_of(eps: torch.Tensor) -> torch.Tensor:
        noise.append(eps)
        return q.rsample()

    return z_of


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_log_prob_is_the_change_of_variables_of_the_sampling_map(name: str, monkeypatch) -> None:
    """In float64 at latent size 3, for 4 examples: log q(z) of its own samples equals
    log N(eps; 0, I) - log|det dz/deps| with the Jacobian by autograd (to 1e-9), and so does
    log q of a copy of z, which a flow must invert to evaluate (to 1e-7: a planar step is
    inverted by bisection)."""
    torch.manual_seed(0)
    family = posterior(name)
    family.bind(PosteriorContext(3))
    family.double()
    with torch.no_grad():  # away from the identity that a flow starts close to
        for parameter in family.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    q = family(torch.randn(4, family.num_outputs, dtype=torch.float64))
    z_of = sampling_map(q, monkeypatch)
    eps = torch.randn(4, 3, dtype=torch.float64)
    z = z_of(eps)
    jacobian = torch.autograd.functional.jacobian(z_of, eps)  # (4, 3, 4, 3)
    blocks = torch.stack([jacobian[n, :, n, :] for n in range(4)])
    expected = StandardNormal(torch.zeros(3), torch.ones(3)).log_prob(eps).sum(-1)
    expected = expected - torch.linalg.slogdet(blocks).logabsdet
    z = z_of(eps)  # drawn last: the flow's cache holds its inputs
    torch.testing.assert_close(q.log_prob(z), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(q.log_prob(z.detach().clone()), expected, rtol=0, atol=1e-7)


def test_full_gaussian_kl_to_the_standard_normal_is_the_general_gaussian_one() -> None:
    torch.manual_seed(0)
    q = posterior("full_gaussian")
    q.bind(PosteriorContext(4))
    q = q(torch.randn(5, q.num_outputs))
    prior = StandardDiagonalNormal(StandardNormal(torch.zeros(4), torch.ones(4)), 1)
    reference = MultivariateNormal(torch.zeros(4), torch.eye(4))
    torch.testing.assert_close(kl_divergence(q, prior), kl_divergence(q, reference))


@pytest.mark.parametrize("prior", ["standard_normal", "learned_gaussian", "mixture_of_gaussians"])
@pytest.mark.parametrize("name", POSTERIORS.names())
def test_the_analytic_kl_estimator_is_never_silently_wrong(name: str, prior: str) -> None:
    """``analytic_kl`` takes the closed form where one is registered and Monte Carlo otherwise:
    either way it agrees with the Monte-Carlo mean over 20,000 samples within 5 standard
    errors (the learned prior moved off N(0, I), so that no form for the standard normal
    could pass for it)."""
    model = small_vae(name, prior=PRIORS.build(prior, **SMALL.get(prior, {})))
    with torch.no_grad():
        for parameter in model.prior.parameters():
            parameter.add_(0.3)
        q = model.encode(binary_data(4))
        z = q.sample((20_000,))
        kl = model.kl(q, z, "analytic_kl")
        terms = q.log_prob(z) - model.prior().log_prob(z)
    stderr = terms.std(0) / math.sqrt(len(z))
    assert ((kl - terms.mean(0)).abs() <= 5 * stderr + 1e-6).all()
    torch.testing.assert_close(model.kl(q, z, "monte_carlo"), monte_carlo_kl(q, model.prior(), z))


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_every_objective_trains_with_every_posterior(silent_trainer, name: str) -> None:
    """Both ELBO estimators, the IWAE bound, DReG and alternating training: each takes steps
    and leaves finite parameters that moved."""
    for kwargs in (
        {"estimator": "monte_carlo", "num_samples": 2},
        {"estimator": "importance_weighted", "num_samples": 3},
        {"estimator": "importance_weighted", "num_samples": 3, "dreg": True},
        {"training": "alternating"},
    ):
        model = small_vae(name, **kwargs)
        before = [p.clone() for p in model.parameters()]
        trainer = silent_trainer(max_steps=2, max_epochs=-1)
        trainer.fit(model, DataLoader(binary_data(), batch_size=8))
        after = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in after), kwargs
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), kwargs


@pytest.mark.parametrize(
    "name",
    [n for n in POSTERIORS.names() if any(True for _ in small_vae(n).posterior.parameters())],
)
def test_alternating_training_gives_the_flow_to_the_e_step(name: str) -> None:
    """A family's own weights (an IAF's MADEs) are the E-step's, with the encoder's."""
    model = small_vae(name, training="alternating")
    e_step, m_step = (
        {id(p) for group in optimizer.param_groups for p in group["params"]}
        for optimizer in model.configure_optimizers()[0]
    )
    flow = {id(p) for p in model.posterior.parameters()}
    assert flow and flow <= e_step and not flow & m_step
    assert {id(p) for p in model.encoder.parameters()} <= e_step


@pytest.mark.parametrize(
    "name", [n for n in POSTERIORS.names() if not POSTERIORS.get(n).factorises]
)
def test_free_bits_are_refused_without_per_dimension_marginals(name: str) -> None:
    with pytest.raises(ConfigError, match="factorises over the latent dimensions"):
        small_vae(name, free_bits=0.1)


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_the_test_evaluator_and_predict_work_with_every_posterior(silent_trainer, name) -> None:
    """``vaeflow test``'s metrics (per-dimension KLs only for a factorising posterior) and
    ``vaeflow predict``'s codes and spreads."""
    model = small_vae(name, eval_samples=10, predict_samples=4)
    trainer = silent_trainer()
    (metrics,) = trainer.test(model, DataLoader(binary_data(), batch_size=16), verbose=False)
    for key in ("test/elbo", "test/log_likelihood", "test/active_units"):
        assert math.isfinite(metrics[key]), key
    assert ("test/kl_dim_0" in metrics) == model.posterior.factorises
    batches = trainer.predict(model, DataLoader(binary_data(), batch_size=16))
    with torch.no_grad():
        torch.testing.assert_close(batches[0]["latents"], model.encode(binary_data()[:16]).mean)
    assert batches[0]["latent_spread"].shape == (16, 3)
    extras = model.prediction_extras()  # latents.pt states S where the code is a sample mean
    if model.posterior.mean_samples:
        assert extras == {"latent_mean_samples": MEAN_SAMPLES}
    else:
        assert extras == {}


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_the_chunked_evaluator_is_the_log_mean_of_its_weights(name: str) -> None:
    """``vaeflow test``'s K = 5000 estimate goes through the decoder in chunks of samples: with
    every family, 12 samples in chunks of 5, 5 and 2 give log mean exp of the weights of the same
    draws, each log q evaluated anew on a copy of its chunk (a flow inverts itself, not its
    cache), in float64 to 1e-6."""
    model = small_vae(name).double()
    x = binary_data(4).double()
    torch.manual_seed(3)
    estimate = model.log_likelihood(x, num_samples=12, chunk_size=5)
    torch.manual_seed(3)
    with torch.no_grad():
        q = model.encode(x)
        z = torch.cat([q.sample((k,)) for k in (5, 5, 2)])
        z = z.detach().clone()
        weights = model.log_weights(x, z, model.encode(x))
    expected = weights.logsumexp(0) - math.log(12)
    torch.testing.assert_close(estimate, expected, rtol=0, atol=1e-6)


def test_a_flow_mean_is_the_mean_of_samples_the_same_in_any_batch() -> None:
    """The mean of MEAN_SAMPLES samples: within 5 standard errors of a 40,000-sample mean, the
    same for an example alone or in a batch, and the caller's random stream untouched."""
    model = small_vae("iaf")
    x = binary_data(8)
    with torch.no_grad():
        q = model.encode(x)
        torch.manual_seed(5)
        mean = q.mean
        after = torch.rand(1)
        torch.manual_seed(5)
        assert torch.equal(torch.rand(1), after)
        torch.testing.assert_close(model.encode(x[3:4]).mean[0], mean[3])
        z = q.sample((40_000,))
    assert isinstance(q, FlowDistribution)
    assert ((mean - z.mean(0)).abs() <= 5 * z.std(0) / math.sqrt(MEAN_SAMPLES)).all()


@pytest.mark.parametrize("name", POSTERIORS.names())
def test_every_picture_draws_with_every_posterior(name: str) -> None:
    from test_pictures import VAE_KINDS

    model = small_vae(name).eval()
    shown = Examples(torch.rand(64, 6), torch.arange(64) % 10, (1, 2, 3), (0.0, 1.0))
    for kind in VAE_KINDS:
        with torch.no_grad():
            assert torch.isfinite(kind().draw(model, shown)).all(), kind.name


def test_diagonal_gaussian_takes_either_scale_parametrisation() -> None:
    """``exp``: sigma = exp(log-variance / 2), the IWAE paper's; ``softplus`` (the default) is
    today's bounded softplus; both within posterior_scale_range."""
    outputs = torch.tensor([[0.3, -2.0, 4.0, 1.0]])
    for scale, expected in (
        ("exp", torch.tensor([[2.0, 0.5]]).exp()),
        ("softplus", torch.nn.functional.softplus(torch.tensor([[4.0, 1.0]])) + 1e-6),
    ):
        family = DiagonalGaussianPosterior(scale=scale)
        family.bind(PosteriorContext(2))
        torch.testing.assert_close(family(outputs).stddev, expected)
    with pytest.raises(ConfigError, match="softplus or exp"):
        DiagonalGaussianPosterior(scale="log")


def test_a_checkpoint_written_before_posteriors_loads_as_diagonal_gaussian() -> None:
    """``tests/data/vae_before_posteriors.ckpt`` was written by the code before this change
    (commit 218b2e5: no ``posterior`` hyperparameter); it reloads with the diagonal family and
    gives the ELBO that code gave under the same seed."""
    model = VAE.load_from_checkpoint(DATA / "vae_before_posteriors.ckpt")
    assert type(model.posterior) is DiagonalGaussianPosterior
    x = torch.randint(0, 2, (16, 4), generator=torch.Generator().manual_seed(0)).float()
    torch.manual_seed(1)
    expected = torch.tensor(
        [-3.744658946990967, -3.569162368774414, -3.826770305633545, -4.026998996734619]
    )
    torch.testing.assert_close(model.elbo(x[:4]).detach(), expected, rtol=0, atol=1e-4)


def test_a_config_names_the_posterior_and_the_run_reloads(tmp_path, monkeypatch) -> None:
    """``posterior: iaf`` from the command line (as in YAML), and a class_path block with
    init_args; each run's checkpoint reloads alone with its family."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    quick += ["--trainer.limit_val_batches=1", "--model.init_args.eval_samples=5"]
    block = (
        '{"class_path": "vaeflow.posteriors.PlanarFlowPosterior", "init_args": {"num_flows": 3}}'
    )
    for value, cls, version in (("iaf", "IAFPosterior", 0), (block, "PlanarFlowPosterior", 1)):
        main(["fit", "--config", QUICKSTART, *quick, f"--model.init_args.posterior={value}"])
        run = tmp_path / "runs" / "quickstart" / f"version_{version}"
        model = VAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
        assert type(model.posterior).__name__ == cls
    assert model.posterior.num_flows == 3


def test_list_shows_every_posterior(capsys) -> None:
    main(["list"])
    posteriors = capsys.readouterr().out.partition("posteriors (vaeflow.posteriors)")[2]
    for name in POSTERIORS.names():
        assert name in posteriors


class SaveWeights(Callback):
    """Each process's weights at the end of a fit, to ``rank<r>.pt`` in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {key: value.detach().cpu() for key, value in pl_module.state_dict().items()}
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_two_processes_train_a_flow_as_one_model(silent_trainer, ddp_spawn, tmp_path) -> None:
    """DDP (two processes, each on its own half of the data, the same noise): the IAF's own
    weights get the all-reduced gradients as the encoder's do, so both processes end with the
    same weights, which moved. A flow weight left out of DDP's reduction would differ."""
    model = small_vae("iaf")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = silent_trainer(strategy=ddp_spawn, devices=2, callbacks=[SaveWeights(tmp_path)])
    trainer.fit(model, DataLoader(binary_data(64), batch_size=8))
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    flow = [key for key in first if key.startswith("posterior.")]
    assert flow and all(not torch.equal(first[key], before[key]) for key in flow)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


FAMILIES_BEYOND_DIAGONAL = [n for n in POSTERIORS.names() if n != "diagonal_gaussian"]


@pytest.mark.parametrize("name", FAMILIES_BEYOND_DIAGONAL)
def test_bf16_autocast_keeps_every_posterior_in_float32(silent_trainer, name: str) -> None:
    """Under bf16 autocast log q(z|x), the KL and the importance weights stay float32 with every
    family, and bf16-mixed training steps leave finite weights that moved."""
    model = small_vae(name)
    x = binary_data(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.encode(x)
        values = (q.log_prob(q.rsample()), *model.elbo_terms(x), model.log_importance_weights(x, 4))
    assert all(value.dtype == torch.float32 for value in values)
    before = [p.clone() for p in model.parameters()]
    silent_trainer(precision="bf16-mixed", max_steps=3, max_epochs=-1).fit(
        model, DataLoader(binary_data(), batch_size=8)
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES_BEYOND_DIAGONAL)
def test_bf16_mixed_trains_every_posterior_as_float32_does(name: str) -> None:
    """bf16-mixed training ends within ``BF16_MARGIN`` nats of float32's validation ELBO after
    the same steps (the margin measured for the diagonal family, tests/test_scale.py); passed
    for every family on 2026-12-06 (60 to 90 s each under a load average of ~15)."""
    full = fit_digits("32-true", posterior=posterior(name))
    mixed = fit_digits("bf16-mixed", posterior=posterior(name))
    assert math.isfinite(mixed)
    assert mixed == pytest.approx(full, abs=BF16_MARGIN)
