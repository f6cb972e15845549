"""Missing values in the VAE (MIWAE, Mattei & Frellsen, 2019): the bound of an incomplete batch
against a hand computation, a complete batch against today's objective number for number, the
imputations against the self-normalised importance weights computed by hand, the encoder's
input, and NaN refused without the option (in Python and from a data module)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from vaeflow.data import ArrayDataModule
from vaeflow.data.preprocess import draw_bernoulli
from vaeflow.errors import ConfigError, DataError
from vaeflow.likelihoods import NegativeBinomialLikelihood
from vaeflow.models import VAE
from vaeflow.models.missing import SelfNormalisedMean

D, LATENT, N = 6, 2, 5


def tiny(missing: str = "zeros", **kwargs) -> VAE:
    """A Bernoulli VAE small enough to compute by hand, in float64 (seed 0)."""
    torch.manual_seed(0)
    return VAE((D,), latent_dim=LATENT, likelihood="bernoulli", missing=missing, **kwargs).double()


def incomplete(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """N grey-level examples with about 40% of their values NaN, and the mask of the others;
    the first example complete."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(N, D, generator=generator, dtype=torch.float64)
    observed = torch.rand(N, D, generator=generator) > 0.4
    observed[0] = True
    return x.masked_fill(~observed, float("nan")), observed


def by_hand(model: VAE, x: torch.Tensor, observed: torch.Tensor, z: torch.Tensor, posterior):
    """log p(x_obs | z) + log N(z; 0, I) - log q(z | x) with the Bernoulli's closed form summed
    over the observed values, and the decoder's means E[x | z]."""
    logits = model.decoder(z)
    filled = x.nan_to_num(0.0)
    per_value = filled * logits - F.softplus(logits)
    log_px = (per_value * observed).sum(-1)
    log_prior = -0.5 * (z.square().sum(-1) + LATENT * math.log(2 * math.pi))
    return log_px + log_prior - posterior.log_prob(z), torch.sigmoid(logits)


def test_the_miwae_bound_of_an_incomplete_batch_is_its_hand_computation() -> None:
    """The training objective with missing: zeros is the importance-weighted bound of the
    observed values: the encoder gets 0 for each NaN, the likelihood sums over observed values."""
    model = tiny(estimator="importance_weighted", num_samples=4)
    x, observed = incomplete()
    torch.manual_seed(7)
    loss, metrics = model.objective(x)
    torch.manual_seed(7)
    posterior = model.posterior(model.encoder(x.nan_to_num(0.0)))
    z = posterior.rsample((4,))
    log_weights, _ = by_hand(model, x, observed, z, posterior)
    bound = (log_weights.logsumexp(0) - math.log(4)).mean()
    torch.testing.assert_close(loss, -bound, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["iw_bound"], bound, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        {"estimator": "importance_weighted", "num_samples": 3},
        {"estimator": "importance_weighted", "num_samples": 3, "dreg": True},
        {"estimator": "analytic_kl", "num_samples": 2},
        {"estimator": "monte_carlo"},
    ],
    ids=["iwae", "dreg", "analytic_kl", "monte_carlo"],
)
def test_a_complete_batch_gives_exactly_the_complete_data_objective(settings: dict) -> None:
    """The same weights with missing: zeros and with missing: refuse: the same loss and the
    same gradients, bit for bit, on a batch without NaN."""
    with_missing, without = tiny("zeros", **settings), tiny("refuse", **settings)
    without.load_state_dict(with_missing.state_dict())
    x = incomplete()[0].nan_to_num(0.5)
    results = []
    for model in (with_missing, without):
        torch.manual_seed(3)
        loss, _ = model.objective(x)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for mine, theirs in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(mine, theirs)


def test_missing_values_leave_every_gradient_finite_and_the_elbo_a_bound_of_the_observed() -> None:
    """NaN never reaches a gradient; the ELBO, the log-likelihood estimate and the bound are
    finite and ordered as bounds of log p(x_obs) are (ELBO <= IW bound in expectation)."""
    model = tiny(estimator="importance_weighted", num_samples=8)
    x, _ = incomplete()
    loss, _ = model.objective(x)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.manual_seed(0)
    elbo = model.elbo(x, num_samples=2000).mean()
    log_px = model.log_likelihood(x, 2000).mean()
    assert torch.isfinite(elbo) and elbo < log_px


def test_imputations_are_the_self_normalised_importance_weighted_means() -> None:
    """impute(x) keeps the observed values and gives each missing one sum_k w_k E[x | z_k],
    w = softmax over all K samples of log p(x_obs | z_k) + log p(z_k) - log q(z_k | x), drawn
    two at a time (chunks of 2, 2 and 1)."""
    model = tiny().eval()
    x, observed = incomplete()
    torch.manual_seed(11)
    imputed = model.impute(x, num_samples=5, chunk_size=2)
    torch.manual_seed(11)
    posterior = model.posterior(model.encoder(x.nan_to_num(0.0)))
    z = torch.cat([posterior.sample((k,)) for k in (2, 2, 1)])
    with torch.no_grad():
        log_weights, means = by_hand(model, x, observed, z, posterior)
    weights = log_weights.softmax(0)
    expected = (weights.unsqueeze(-1) * means).sum(0)
    torch.testing.assert_close(imputed[~observed], expected[~observed], rtol=1e-12, atol=1e-12)
    assert torch.equal(imputed[observed], x[observed])
    assert torch.equal(model.impute(x[:1], 5), x[:1])  # a complete example is returned as it is


def test_the_running_self_normalised_mean_equals_the_one_pass_mean() -> None:
    """Chunks whose log-weights differ by 1000 nats: the running rescaling neither overflows
    nor loses the later, heavier chunk."""
    generator = torch.Generator().manual_seed(0)
    log_weights = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    log_weights[4:] += 1000.0
    values = torch.randn(7, 3, 2, generator=generator, dtype=torch.float64)
    running = SelfNormalisedMean()
    for rows in (slice(0, 3), slice(3, 5), slice(5, 7)):
        running.add(log_weights[rows], values[rows])
    expected = (log_weights.softmax(0).unsqueeze(-1) * values).sum(0)
    torch.testing.assert_close(running.mean, expected, rtol=1e-12, atol=1e-12)


def test_zeros_and_mask_gives_the_encoder_the_data_and_the_mask() -> None:
    model = tiny("zeros_and_mask")
    assert model.encoder.input_shape == (2 * D,)
    x, observed = incomplete()
    seen = []
    model.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model.encode(x)
    expected = torch.cat([x.nan_to_num(0.0), observed.double()], dim=1)
    assert torch.equal(seen[0], expected)


def test_nan_is_refused_without_the_option_and_by_families_that_do_not_factorise() -> None:
    x, _ = incomplete()
    refused = r"NaN values, which this VAE refuses \(missing: refuse\).*missing: zeros"
    with pytest.raises(DataError, match=refused):
        tiny("refuse").elbo(x)
    with pytest.raises(ConfigError, match="trained on complete data"):
        tiny("refuse").impute(x)
    with pytest.raises(ConfigError, match="library_size: none"):
        VAE((D,), likelihood=NegativeBinomialLikelihood(library_size="observed"), missing="zeros")


def test_binarisation_keeps_missing_values_missing() -> None:
    probabilities = torch.tensor([[0.2, float("nan"), 1.0, 0.0]])
    draws = draw_bernoulli(probabilities, np.random.default_rng(0))
    assert torch.isnan(draws[0, 1]) and draws[0, 2] == 1 and draws[0, 3] == 0


def test_a_data_module_with_nan_trains_a_miwae_and_predicts_imputations(
    tmp_path: Path, silent_trainer: Callable[..., Trainer]
) -> None:
    """ArrayDataModule's NaN reach a VAE with missing: zeros (and are refused, naming the option,
    without it); predict returns the codes and the imputations, every NaN filled."""
    x, _ = incomplete()
    rows = np.tile(x.numpy(), (8, 1)).astype(np.float32)  # 40 examples
    np.save(tmp_path / "rows.npy", rows)
    data = ArrayDataModule(str(tmp_path / "rows.npy"), scale=False, batch_size=10)
    with pytest.raises(DataError, match="missing: zeros"):
        silent_trainer().fit(tiny("refuse").float(), data)
    data = ArrayDataModule(str(tmp_path / "rows.npy"), scale=False, batch_size=10)
    model = tiny(estimator="importance_weighted", num_samples=2, eval_samples=3).float()
    trainer = silent_trainer(limit_val_batches=0)
    trainer.fit(model, data)
    (prediction, *_) = trainer.predict(model, data.train_dataloader())
    assert set(prediction) == {"latents", "imputations"}
    assert not torch.isnan(prediction["imputations"]).any()
    assert torch.isfinite(prediction["latents"]).all()
