"""The count and bounded families at their edges, against scipy in float64: counts of 0 and far
tails, means from 1e-8 to 1e6, inverse dispersions from 1e-3 to the cap, zero inflation near 0
and 1, beta data within 1e-12 of the bounds; gradients by gradcheck; the observed library size.
(The generated tests of tests/test_families.py check them at random parameters.)"""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from vaeflow.errors import ConfigError, DataError
from vaeflow.registry import LIKELIHOODS

FEATURES = 4


def bound(name: str, **kwargs):
    likelihood = LIKELIHOODS.build(name, **kwargs)
    likelihood.bind((FEATURES,))
    return likelihood.double()


def raw_above(floor: float, value: np.ndarray) -> np.ndarray:
    """The raw decoder output whose ``floor + softplus`` is ``value`` (inverse softplus)."""
    above = value - floor
    return above + np.log(-np.expm1(-above))  # log(e^a - 1) without overflow


def outputs_from(params: list[np.ndarray]) -> torch.Tensor:
    """Flat decoder outputs ``(N, num_params * FEATURES)`` from one array ``(N, FEATURES)`` per
    parameter, parameters outermost as the decoder lays them out."""
    return torch.from_numpy(np.concatenate(params, axis=-1))


MEANS = np.array([1e-8, 1e-2, 1.0, 1e3, 1e6])
THETAS = np.array([1e-3, 0.5, 10.0, 9e3])
COUNTS = np.array([0.0, 1.0, 7.0, 1000.0])


def grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (mean, theta, count) combination, FEATURES to a row."""
    mean, theta, count = (a.reshape(-1, FEATURES) for a in np.meshgrid(MEANS, THETAS, COUNTS))
    return mean, theta, count


def exact_negative_binomial(mpmath, count: float, mean: float, theta: float):
    """log NB(count; mean, theta) in mpmath's precision. (scipy's nbinom loses digits here: it
    takes log(1 - p) from p = theta / (theta + mean), which is 1 - 1e-12 at mean 1e-8 and
    theta 9e3, so its log mass of a count of 1 is off by 1e-4.)"""
    x, mu, th = (mpmath.mpf(float(v)) for v in (count, mean, theta))
    return (
        mpmath.loggamma(x + th)
        - mpmath.loggamma(th)
        - mpmath.loggamma(x + 1)
        + th * mpmath.log(th / (th + mu))
        + x * mpmath.log(mu / (th + mu))
    )


@pytest.mark.parametrize("pi", [None, 1e-12, 0.3, 1 - 1e-9])
def test_negative_binomial_and_zero_inflation_edges_match_50_digit_arithmetic(pi) -> None:
    """The negative binomial (``pi`` None) and its zero-inflated form, log(pi [x = 0] + (1 - pi)
    NB(x)), on the grid of edges against 50-digit arithmetic, to 1e-9."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    name = "negative_binomial" if pi is None else "zero_inflated_negative_binomial"
    likelihood = bound(name, dispersion="example")
    mean, theta, count = grid()
    params = [np.log(mean), raw_above(likelihood.theta_range[0], theta)]
    logit = special.logit(pi) if pi is not None else 0.0
    params += [np.full_like(mean, logit)] if pi is not None else []
    got = likelihood(outputs_from(params)).base_dist.log_prob(torch.from_numpy(count)).numpy()
    pi_exact = 1 / (1 + mpmath.exp(-mpmath.mpf(logit))) if pi is not None else 0
    expected = [
        float(mpmath.log(pi_exact * (c == 0) + (1 - pi_exact) * mpmath.exp(nb)))
        for c, nb in (
            (c, exact_negative_binomial(mpmath, c, m, t))
            for c, m, t in zip(count.flat, mean.flat, theta.flat, strict=True)
        )
    ]
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-9, atol=1e-9)


def test_poisson_edges_match_scipy() -> None:
    likelihood = bound("poisson")
    mean, _, count = grid()
    got = likelihood(outputs_from([np.log(mean)])).base_dist.log_prob(torch.from_numpy(count))
    np.testing.assert_allclose(got.numpy(), stats.poisson.logpmf(count, mean), rtol=1e-9)


def test_beta_edges_match_scipy() -> None:
    likelihood = bound("beta")
    x = np.array([1e-12, 1e-3, 0.5, 1 - 1e-12])
    mean = np.array([1e-6, 0.2, 0.9, 1 - 1e-6])
    precision = np.array([0.05, 1.0, 50.0, 1e5])
    mean, precision, x = (a.reshape(-1, FEATURES) for a in np.meshgrid(mean, precision, x))
    raw = raw_above(likelihood.precision_range[0], precision)
    got = likelihood(outputs_from([special.logit(mean), raw])).base_dist.log_prob(
        torch.from_numpy(x)
    )
    expected = stats.beta.logpdf(x, mean * precision, (1 - mean) * precision)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-8)


GRADIENT_CASES = [
    ("poisson", {}),
    ("poisson", {"library_size": "observed"}),
    ("negative_binomial", {}),
    ("negative_binomial", {"dispersion": "example", "library_size": "observed"}),
    ("zero_inflated_negative_binomial", {"dispersion": "example"}),
    ("zero_inflated_negative_binomial", {"library_size": "observed"}),
    ("beta", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), GRADIENT_CASES)
def test_gradients_pass_gradcheck(name: str, kwargs: dict) -> None:
    """The log-likelihood's gradient in the decoder outputs (and the learned dispersion) against
    finite differences in float64, at data with zeros and large counts."""
    torch.manual_seed(0)
    likelihood = bound(name, **kwargs)
    outputs = torch.randn(3, likelihood.num_outputs, dtype=torch.float64)
    x = likelihood(outputs).sample()
    if name != "beta":
        x[:, 0], x[:, 1] = 0.0, 250.0
    outputs.requires_grad_()
    assert torch.autograd.gradcheck(lambda o: likelihood.log_prob(o, x), (outputs,))
    for parameter in likelihood.parameters():  # a learned dispersion
        (gradient,) = torch.autograd.grad(likelihood.log_prob(outputs, x).sum(), parameter)
        assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


COUNT_FAMILIES = ["poisson", "negative_binomial", "zero_inflated_negative_binomial"]


@pytest.mark.parametrize("name", COUNT_FAMILIES)
def test_the_observed_library_size_scales_the_mean_to_the_total_count(name: str) -> None:
    """With ``library_size: observed`` the means of an example sum to its total count (the
    share of each element times the size factor); the outputs' common offset is irrelevant;
    without a size factor the means are the shares (they sum to 1)."""
    likelihood = bound(name, library_size="observed")
    torch.manual_seed(1)
    outputs = torch.randn(5, likelihood.num_outputs, dtype=torch.float64)
    x = torch.poisson(torch.full((5, FEATURES), 20.0, dtype=torch.float64))
    size = likelihood.size_factor(x)
    torch.testing.assert_close(size, x.sum(-1))
    counts = likelihood(outputs, size).base_dist
    base = counts.counts if hasattr(counts, "counts") else counts
    torch.testing.assert_close(base.mean.sum(-1), x.sum(-1))
    shifted = outputs.clone()
    shifted[:, :FEATURES] += 3.0  # the mean's logits only
    torch.testing.assert_close(likelihood.log_prob(shifted, x), likelihood.log_prob(outputs, x))
    shares = likelihood(outputs).base_dist
    shares = shares.counts if hasattr(shares, "counts") else shares
    torch.testing.assert_close(shares.mean.sum(-1), torch.ones(5, dtype=torch.float64))


def test_size_factors_are_refused_where_they_mean_nothing() -> None:
    size = torch.ones(2)
    for name, kwargs in (("gaussian", {}), ("negative_binomial", {})):
        likelihood = LIKELIHOODS.build(name, **kwargs)
        likelihood.bind((FEATURES,))
        with pytest.raises(ConfigError, match="size factor"):
            likelihood(torch.zeros(2, likelihood.num_outputs), size)


def test_extreme_outputs_stay_finite_in_float32() -> None:
    """Decoder outputs of +-1e30 (a diverged run) give finite log-likelihoods and gradients:
    the log mean and the inverse dispersion are capped."""
    x = torch.tensor([[0.0, 3.0, 100.0, 1.0]])
    for name in ("poisson", "negative_binomial", "zero_inflated_negative_binomial"):
        likelihood = LIKELIHOODS.build(name, dispersion="example") if name != "poisson" else None
        likelihood = likelihood or LIKELIHOODS.build(name)
        likelihood.bind((FEATURES,))
        for value in (1e30, -1e30):
            outputs = torch.full((1, likelihood.num_outputs), value, requires_grad=True)
            log_prob = likelihood.log_prob(outputs, x)
            (gradient,) = torch.autograd.grad(log_prob.sum(), outputs)
            assert torch.isfinite(gradient).all(), (name, value)
            assert not torch.isnan(log_prob).any(), (name, value)


@pytest.mark.parametrize(
    ("name", "data", "hint"),
    [
        ("negative_binomial", [[0.0, 1.5, 2.0, 3.0]], "scale: false"),
        ("poisson", [[0.0, -1.0, 2.0, 3.0]], "non-negative integers"),
        ("beta", [[0.0, 0.5, 0.2, 0.3]], "strictly inside"),
        ("beta", [[0.1, 0.5, 0.2, 1.0]], "strictly inside"),
    ],
)
def test_data_outside_the_support_are_refused_with_advice(name, data, hint) -> None:
    likelihood = LIKELIHOODS.build(name)
    likelihood.bind((FEATURES,))
    with pytest.raises(DataError, match=hint):
        likelihood.check_support(torch.tensor(data))


def test_the_negative_binomial_approaches_the_poisson_as_theta_grows() -> None:
    """At theta = 9e3 and mean 3 the two log masses differ by their expansion in 1 / theta,
    sum_d (x_d (x_d - 1) - 2 x_d mu + mu^2) / (2 theta), to 2% (its next term is O(theta^-2))."""
    nb = bound("negative_binomial", dispersion="example")
    poisson = bound("poisson")
    mean = torch.full((1, FEATURES), math.log(3.0), dtype=torch.float64)
    raw = torch.from_numpy(raw_above(nb.theta_range[0], np.full((1, FEATURES), 9e3)))
    x = torch.tensor([[0.0, 2.0, 5.0, 12.0]], dtype=torch.float64)
    gap = nb.log_prob(torch.cat([mean, raw], -1), x) - poisson.log_prob(mean, x)
    expansion = ((x * (x - 1) - 2 * 3.0 * x + 3.0**2) / (2 * 9e3)).sum()
    assert gap.item() == pytest.approx(expansion.item(), rel=0.02)


def test_a_vae_samples_counts_for_a_chosen_library_size() -> None:
    """``sample(n, size_factor=l)`` of an observed-library VAE: the means of each draw sum to
    l; without one they are shares summing to 1; a Gaussian VAE refuses a size factor."""
    from vaeflow.models import VAE

    torch.manual_seed(2)
    likelihood = LIKELIHOODS.build("negative_binomial", library_size="observed")
    model = VAE((FEATURES,), latent_dim=2, likelihood=likelihood)
    means = model.sample(3, mean=True, size_factor=250.0)
    torch.testing.assert_close(means.sum(-1), torch.full((3,), 250.0))
    torch.testing.assert_close(model.sample(3, mean=True).sum(-1), torch.ones(3))
    counts = model.sample(3, size_factor=torch.tensor([10.0, 100.0, 1000.0]))
    assert counts.shape == (3, FEATURES) and torch.equal(counts, counts.round())
    with pytest.raises(ConfigError, match="size factor"):
        VAE((FEATURES,), likelihood="gaussian").sample(2, size_factor=10.0)
