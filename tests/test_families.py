"""Every registered likelihood and prior, tested from the registry (a new family is tested the
day it is registered): shapes, sampling, support, and log densities against scipy in float64."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats
from torch.distributions import constraints

from vaeflow.errors import ConfigError, DataError
from vaeflow.likelihoods import (
    DiscretizedLogisticMixture,
    GaussianLikelihood,
    bernoulli_log_prob,
    fused_bernoulli_log_prob,
)
from vaeflow.priors import DiagonalNormal, PriorContext, StandardNormal, kl_or_estimate
from vaeflow.registry import LIKELIHOODS, PRIORS

EVENT_SHAPE = (2, 3)
BATCH = 5
BUILT_IN_LIKELIHOODS = [
    n for n in LIKELIHOODS.names() if LIKELIHOODS.get(n).__module__.startswith("vaeflow.")
]
BUILT_IN_PRIORS = [n for n in PRIORS.names() if PRIORS.get(n).__module__.startswith("vaeflow.")]


def scipy_bernoulli(likelihood, params, x):
    p = 1 / (1 + np.exp(-params[..., 0]))
    binary = stats.bernoulli.logpmf(x.round(), p)
    grey = x * np.log(p) + (1 - x) * np.log1p(-p)  # the cross-entropy form for grey levels
    return np.where(np.isin(x, (0.0, 1.0)), binary, grey)


def scipy_gaussian(likelihood, params, x):
    return stats.norm.logpdf(x, params[..., 0], likelihood.scale().detach().double().numpy())


def softplus(values):
    return np.logaddexp(0.0, values)


def scipy_laplace(likelihood, params, x):
    scale = likelihood.min_scale + softplus(params[..., 1])
    return stats.laplace.logpdf(x, params[..., 0], scale)


def closed_form_continuous_bernoulli(likelihood, params, x):
    """x log lambda + (1 - x) log(1 - lambda) + log(2 artanh(1 - 2 lambda) / (1 - 2 lambda))."""
    lam = 1 / (1 + np.exp(-params[..., 0]))
    norm = 2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam)
    return x * np.log(lam) + (1 - x) * np.log1p(-lam) + np.log(norm)


def scipy_categorical(likelihood, params, x):
    levels = np.round(x * 255).astype(int)
    return np.take_along_axis(special.log_softmax(params, -1), levels[..., None], -1)[..., 0]


def scipy_discretized_logistic(likelihood, params, x):
    """Each logistic's mass on the bin y +- 1/255 (y = 2 x - 1), edges open, mixed."""
    k = likelihood.components
    if k == 1:
        logits, loc, log_scale = np.zeros_like(params[..., :1]), params[..., :1], params[..., 1:]
    else:
        logits, loc, log_scale = np.split(params, 3, axis=-1)
    scale = np.exp(np.maximum(log_scale, likelihood.min_log_scale))
    y = (2 * x - 1)[..., None]
    upper = np.where(y > 1 - 1e-9, 1.0, stats.logistic.cdf(y + 1 / 255, loc, scale))
    lower = np.where(y < -1 + 1e-9, 0.0, stats.logistic.cdf(y - 1 / 255, loc, scale))
    weights = special.softmax(logits, -1)
    return np.log((weights * (upper - lower)).sum(-1))


def count_means(likelihood, params, x):
    """The mean of each element from the decoder's first parameter: exp of it, or the
    example's total count times its softmax over the elements (``library_size: observed``)."""
    raw = params[..., 0]
    if likelihood.library_size == "none":
        return np.exp(raw)
    size = np.maximum(x.sum(axis=(-2, -1), keepdims=True), 1)
    return size * special.softmax(raw.reshape(*raw.shape[:-2], -1), -1).reshape(raw.shape)


def inverse_dispersions(likelihood, params):
    learned = likelihood.dispersion == "feature"
    raw = likelihood.raw_theta.detach().numpy() if learned else params[..., 1]
    return likelihood.theta_range[0] + softplus(raw)


def scipy_poisson(likelihood, params, x):
    return stats.poisson.logpmf(x, count_means(likelihood, params, x))


def scipy_negative_binomial(likelihood, params, x):
    """scipy's nbinom(n, p) counts failures before n successes: n = theta, p = theta / (theta
    + mu) gives mean mu and variance mu + mu^2 / theta."""
    mean, theta = count_means(likelihood, params, x), inverse_dispersions(likelihood, params)
    return stats.nbinom.logpmf(x, theta, theta / (theta + mean))


def closed_form_zero_inflated_negative_binomial(likelihood, params, x):
    """log(pi [x = 0] + (1 - pi) NB(x)), pi = sigmoid of the last parameter (in logs: NB(500)
    underflows)."""
    log_pi, log_kept = special.log_expit(params[..., -1]), special.log_expit(-params[..., -1])
    kept = log_kept + scipy_negative_binomial(likelihood, params, x)
    return np.where(x == 0, np.logaddexp(log_pi, kept), kept)


def scipy_beta(likelihood, params, x):
    mean = special.expit(params[..., 0])
    precision = likelihood.precision_range[0] + softplus(params[..., 1])
    return stats.beta.logpdf(x, mean * precision, (1 - mean) * precision)


#: count families' variants: each dispersion, and the observed library size
COUNT_VARIANTS = [
    {},
    {"dispersion": "example"},
    {"library_size": "observed", "theta": 5.0},
    {"library_size": "observed", "dispersion": "example"},
]

#: name -> (constructor kwargs variants, element-wise log density from scipy or a closed form)
SCIPY_LIKELIHOODS = {
    "bernoulli": ([{}], scipy_bernoulli),
    "gaussian": (
        [
            {"variance": "fixed", "std": 0.7},
            {"variance": "shared", "std": 1.3},
            {"variance": "per_dimension"},
        ],
        scipy_gaussian,
    ),
    "laplace": ([{}, {"min_scale": 0.1}], scipy_laplace),
    "continuous_bernoulli": ([{}], closed_form_continuous_bernoulli),
    "categorical": ([{}], scipy_categorical),
    "discretized_logistic": ([{}, {"components": 3}], scipy_discretized_logistic),
    "poisson": ([{}, {"library_size": "observed"}], scipy_poisson),
    "negative_binomial": (COUNT_VARIANTS, scipy_negative_binomial),
    "zero_inflated_negative_binomial": (
        COUNT_VARIANTS,
        closed_form_zero_inflated_negative_binomial,
    ),
    "beta": ([{}, {"precision_range": (0.5, 100.0)}], scipy_beta),
}


def test_every_built_in_likelihood_has_a_scipy_reference() -> None:
    assert sorted(SCIPY_LIKELIHOODS) == sorted(BUILT_IN_LIKELIHOODS)


def bound_likelihood(name: str, **kwargs):
    likelihood = LIKELIHOODS.get(name)(**kwargs)
    likelihood.bind(EVENT_SHAPE)
    return likelihood


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_likelihood_shapes_sampling_and_support(name: str) -> None:
    torch.manual_seed(0)
    likelihood = bound_likelihood(name)
    outputs = torch.randn(4, BATCH, likelihood.num_outputs)
    dist = likelihood(outputs)
    assert dist.batch_shape == (4, BATCH)
    assert dist.event_shape == EVENT_SHAPE
    x = dist.sample()
    assert x.shape == (4, BATCH, *EVENT_SHAPE)
    likelihood.check_support(x)  # samples lie in the support
    log_prob = dist.log_prob(x)
    assert log_prob.shape == (4, BATCH)
    assert torch.isfinite(log_prob).all()

    outside = next(
        (v for v in (-0.5, 1.5, 0.5, 1e30) if not likelihood.support.check(torch.tensor(v))), None
    )
    if outside is None:  # the whole real line: only non-finite values are outside
        assert likelihood.support is constraints.real
        outside = float("nan")
    bad = x.clone()
    bad[0, 0, 0, 0] = outside
    with pytest.raises(DataError, match=f"outside the support of the '{name}' likelihood"):
        likelihood.check_support(bad)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, kwargs) for name, (variants, _) in SCIPY_LIKELIHOODS.items() for kwargs in variants],
)
def test_likelihood_log_prob_matches_scipy_in_float64(name: str, kwargs: dict) -> None:
    torch.manual_seed(1)
    likelihood = bound_likelihood(name, **kwargs).double()
    for param in likelihood.parameters():  # move learned parameters away from their start
        param.data.add_(0.3 * torch.randn_like(param))
    outputs = torch.randn(BATCH, likelihood.num_outputs, dtype=torch.float64)
    x = likelihood(outputs).sample()
    if name in ("bernoulli", "continuous_bernoulli"):  # grey levels too, and the edges
        x[:, 0, 0] = torch.rand(BATCH, dtype=torch.float64)
        x[:, 0, 1], x[:, 0, 2] = 0.0, 1.0
    if likelihood.discrete:  # the edge bins
        x[:, 0, 1], x[:, 0, 2] = 0.0, 1.0
    if likelihood.support is constraints.nonnegative_integer:  # zero and a far tail
        x[:, 0, 1], x[:, 0, 2] = 0.0, 500.0
    dist = likelihood(outputs, likelihood.size_factor(x))
    params = likelihood.params(outputs).numpy()
    expected = SCIPY_LIKELIHOODS[name][1](likelihood, params, x.numpy())
    np.testing.assert_allclose(
        dist.log_prob(x).detach().numpy(), expected.sum(axis=(1, 2)), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, kwargs) for name, (variants, _) in SCIPY_LIKELIHOODS.items() for kwargs in variants]
    + [(name, {}) for name in LIKELIHOODS.names() if name not in SCIPY_LIKELIHOODS],
)
def test_log_prob_from_outputs_equals_the_distributions(name: str, kwargs: dict) -> None:
    """The closed form a family may use in training steps is its distribution's log density,
    with the same gradient, for outputs with and without a leading sample dimension."""
    torch.manual_seed(4)
    likelihood = bound_likelihood(name, **kwargs).double()
    for param in likelihood.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    x = likelihood(torch.randn(BATCH, likelihood.num_outputs, dtype=torch.float64)).sample()
    for shape in ((BATCH,), (3, BATCH)):
        outputs = torch.randn(*shape, likelihood.num_outputs, dtype=torch.float64)
        outputs.requires_grad_()
        log_prob = likelihood.log_prob(outputs, x)
        reference = likelihood(outputs, likelihood.size_factor(x)).log_prob(x)
        assert log_prob.shape == shape
        torch.testing.assert_close(log_prob, reference, rtol=1e-12, atol=1e-10)
        weights = torch.rand(shape, dtype=torch.float64)  # any upstream gradient
        (gradient,) = torch.autograd.grad((weights * log_prob).sum(), outputs)
        (expected,) = torch.autograd.grad((weights * reference).sum(), outputs)
        torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_every_fill_value_lies_in_the_support(name: str) -> None:
    likelihood = bound_likelihood(name)
    assert bool(likelihood.support.check(torch.tensor(likelihood.fill_value)))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, kwargs) for name, (variants, _) in SCIPY_LIKELIHOODS.items() for kwargs in variants]
    + [(name, {}) for name in LIKELIHOODS.names() if name not in SCIPY_LIKELIHOODS],
)
def test_masked_log_prob_is_the_dense_sum_over_the_observed_elements(name: str, kwargs) -> None:
    """log p(x_O) of each example equals the family's element-wise log densities (scipy's where
    the family has a reference) summed over its observed elements only, in float64, for
    outputs with a leading sample dimension. The missing elements' values do not change it
    (NaN, a huge number) and their parameters get no gradient. A family whose elements share
    a quantity of x (the observed library size) refuses."""
    torch.manual_seed(5)
    likelihood = bound_likelihood(name, **kwargs).double()
    for param in likelihood.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    outputs = torch.randn(3, BATCH, likelihood.num_outputs, dtype=torch.float64)
    outputs.requires_grad_()
    x = likelihood(outputs[0].detach()).sample()
    observed = torch.rand(x.shape) < 0.6
    observed[0], observed[1] = True, False  # a complete example and an empty one
    incomplete = x.masked_fill(~observed, float("nan"))
    if not likelihood.elementwise:
        with pytest.raises(ConfigError, match="library_size: none"):
            likelihood.masked_log_prob(outputs, incomplete, observed)
        return
    masked = likelihood.masked_log_prob(outputs, incomplete, observed)
    params = likelihood.params(outputs).detach()
    if name in SCIPY_LIKELIHOODS:
        every = np.broadcast_to(x.numpy(), (3, *x.shape))  # for each sample of outputs
        dense = SCIPY_LIKELIHOODS[name][1](likelihood, params.numpy(), every)
    else:  # a plugin's family: its own element-wise distribution
        dense = likelihood.distribution(params).log_prob(x).detach().numpy()
    expected = np.where(observed.numpy(), dense, 0.0).sum(axis=(-2, -1))
    np.testing.assert_allclose(masked.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    complete = likelihood.log_prob(outputs[:, :1], x[:1])
    torch.testing.assert_close(masked[:, 0], complete[:, 0], rtol=1e-12, atol=1e-10)
    assert torch.equal(masked[:, 1], torch.zeros(3, dtype=torch.float64))
    other = x.masked_fill(~observed, 1e30 if likelihood.support is constraints.real else 0.0)
    assert torch.equal(likelihood.masked_log_prob(outputs, other, observed), masked)
    (gradient,) = torch.autograd.grad(masked.sum(), outputs)
    gradient = likelihood.params(gradient)  # (3, BATCH, *EVENT_SHAPE, num_params)
    assert torch.isfinite(gradient).all()
    assert torch.equal(gradient[:, ~observed], torch.zeros_like(gradient[:, ~observed]))
    assert gradient[:, observed].abs().sum() > 0


@pytest.mark.parametrize("log_prob", [bernoulli_log_prob, fused_bernoulli_log_prob])
def test_bernoulli_log_prob_is_the_binary_cross_entropy_in_float32(log_prob) -> None:
    """The CPU's Bernoulli log-probability (log(1 + e^-|l|) rather than log1p) and the fused
    one other devices take agree with torch's binary cross-entropy in float64 on grey levels
    and extreme logits in float32; the CPU's written-out gradient passes gradcheck in float64,
    for the logits and for the data."""
    torch.manual_seed(5)
    logits = torch.cat([torch.randn(20, 6, 784) * 4, torch.full((20, 6, 1), 40.0)], dim=-1)
    logits[0, 0, :10] = torch.tensor([-100.0, -30, -17, -16, -1e-6, 0, 1e-6, 16, 17, 30])
    x = torch.rand(6, 785)
    x[:, ::3] = x[:, ::3].round()
    expected = -F.binary_cross_entropy_with_logits(
        logits.double(), x.double().expand(20, 6, 785), reduction="none"
    ).sum(-1)
    got = log_prob(logits, x)
    assert got.shape == (20, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-3)
    small = torch.randn(3, 4, 7, dtype=torch.float64) * 5
    grey = torch.rand(4, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(log_prob, (small.requires_grad_(), grey.requires_grad_()))


def test_gaussian_learned_variance_is_trainable_and_floored() -> None:
    likelihood = bound_likelihood("gaussian", variance="per_dimension", std=0.5, min_std=0.01)
    assert likelihood.raw_std.shape == EVENT_SHAPE
    torch.testing.assert_close(likelihood.scale(), torch.full(EVENT_SHAPE, 0.5))
    likelihood.raw_std.data.fill_(-1e4)
    assert (likelihood.scale() >= 0.01).all()
    assert not list(bound_likelihood("gaussian", variance="fixed").parameters())
    assert isinstance(LIKELIHOODS.build("gaussian"), GaussianLikelihood)


INPUT_SHAPE = (3,)


def bound_prior(name: str, latent_dim: int, **kwargs):
    """A registered prior bound to a small context, in float64, its parameters moved from
    their start."""
    torch.manual_seed(2)
    prior = PRIORS.build(name, **kwargs)
    prior.bind(PriorContext(latent_dim, INPUT_SHAPE, functools.partial(encode_to, latent_dim)))
    prior.double()
    for param in prior.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    return prior


def encode_to(latent_dim: int, x: torch.Tensor) -> DiagonalNormal:
    """A fixed linear encoder to ``latent_dim`` (for the priors that use the model's)."""
    weight = torch.linspace(-1, 1, x.shape[-1] * 2 * latent_dim, dtype=x.dtype)
    loc, raw_scale = (x @ weight.reshape(x.shape[-1], 2 * latent_dim)).chunk(2, -1)
    return DiagonalNormal(loc, torch.nn.functional.softplus(raw_scale) + 0.1)


def scipy_standard_normal(prior, z):
    return stats.multivariate_normal(np.zeros(z.shape[-1]), np.eye(z.shape[-1])).logpdf(z)


def scipy_learned_gaussian(prior, z):
    scale = prior.log_scale.detach().exp().numpy()
    return stats.multivariate_normal(prior.loc.detach().numpy(), np.diag(scale**2)).logpdf(z)


def scipy_mixture(log_weights, locs, scales, z):
    components = [
        stats.multivariate_normal(loc, np.diag(scale**2)).logpdf(z)
        for loc, scale in zip(locs, scales, strict=True)
    ]
    return special.logsumexp(np.stack(components, -1) + log_weights, -1)


def scipy_mixture_of_gaussians(prior, z):
    log_weights = special.log_softmax(prior.logits.detach().numpy())
    locs, scales = prior.loc.detach().numpy(), prior.log_scale.detach().exp().numpy()
    return scipy_mixture(log_weights, locs, scales, z)


def scipy_vamp(prior, z):
    posteriors = prior.encode(prior.pseudo_inputs.detach())
    locs, scales = posteriors.base_dist.loc.numpy(), posteriors.base_dist.scale.numpy()
    return scipy_mixture(np.full(prior.components, -np.log(prior.components)), locs, scales, z)


#: name -> (constructor kwargs, log density from scipy)
SCIPY_PRIORS = {
    "standard_normal": ({}, scipy_standard_normal),
    "learned_gaussian": ({}, scipy_learned_gaussian),
    "mixture_of_gaussians": ({"components": 3}, scipy_mixture_of_gaussians),
    "vamp": ({"components": 4}, scipy_vamp),
}


def test_every_built_in_prior_has_a_scipy_reference() -> None:
    assert sorted(SCIPY_PRIORS) == BUILT_IN_PRIORS


def prior_kwargs(name: str) -> dict:
    return SCIPY_PRIORS.get(name, ({}, None))[0]


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_shapes_and_sampling(name: str) -> None:
    prior = bound_prior(name, 3, **prior_kwargs(name))
    dist = prior()
    assert dist.event_shape == (3,)
    z = dist.sample((7,))
    assert z.shape == (7, 3)
    assert torch.isfinite(dist.log_prob(z)).all()


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_kl_is_unbiased_against_quadrature(name: str) -> None:
    """KL(q || p) for a one-dimensional latent, against the trapezoid rule in float64 over
    [-15, 15]: exact (1e-6) when analytic, within 5 standard errors of 100,000 samples when
    estimated by Monte Carlo."""
    prior = bound_prior(name, 1, **prior_kwargs(name))
    posterior = DiagonalNormal(
        torch.tensor([[0.5], [-1.0]], dtype=torch.float64),
        torch.tensor([[0.7], [1.5]], dtype=torch.float64),
    )
    grid = torch.linspace(-15, 15, 30_001, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        log_q, log_p = posterior.log_prob(grid), prior().log_prob(grid)
        exact = torch.trapezoid(log_q.exp() * (log_q - log_p), grid[:, 0, 0], dim=0)
        samples = posterior.sample((100_000,))
        kl = kl_or_estimate(posterior, prior(), samples)
        log_ratio = posterior.log_prob(samples) - prior().log_prob(samples)
    assert kl.shape == (2,)
    analytic = bool((log_ratio.mean(0) != kl).any())
    tolerance = 1e-6 if analytic else 5 * log_ratio.std(0) / len(samples) ** 0.5
    assert ((kl - exact).abs() < tolerance).all(), (kl, exact)


def test_the_standard_normal_kl_shortcuts_equal_the_general_gaussian_kl() -> None:
    """The registered KL(Normal || StandardNormal) and the prior's direct path from a diagonal
    Gaussian posterior both equal torch's general Gaussian-to-Gaussian KL."""
    from torch.distributions.kl import _kl_normal_normal

    posterior = torch.distributions.Normal(
        torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64) + 0.1
    )
    prior = StandardNormal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    general = _kl_normal_normal(posterior, prior)
    exact = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.distributions.kl_divergence(posterior, prior), general, **exact
    )
    standard_normal = bound_prior("standard_normal", 3)
    for diagonal in (
        torch.distributions.Independent(posterior, 1),
        DiagonalNormal(posterior.loc, posterior.scale),
    ):
        direct = kl_or_estimate(diagonal, standard_normal(), diagonal.sample())
        torch.testing.assert_close(direct, general.sum(-1), **exact)


@pytest.mark.parametrize("name", SCIPY_PRIORS)
def test_prior_log_prob_matches_scipy_in_float64(name: str) -> None:
    kwargs, reference = SCIPY_PRIORS[name]
    prior = bound_prior(name, 4, **kwargs)
    z = prior().sample((6,))
    np.testing.assert_allclose(
        prior().log_prob(z).detach().numpy(), reference(prior, z.numpy()), rtol=1e-10
    )


@pytest.mark.parametrize("name", [n for n in LIKELIHOODS.names() if LIKELIHOODS.get(n).discrete])
def test_discrete_likelihoods_are_probability_masses_on_the_pixel_grid(name: str) -> None:
    """The masses of the 256 levels sum to one for every element (edge bins included)."""
    torch.manual_seed(5)
    likelihood = bound_likelihood(name).double()
    elements = likelihood.distribution(
        likelihood.params(torch.randn(BATCH, likelihood.num_outputs, dtype=torch.float64))
    )
    levels = torch.arange(256, dtype=torch.float64) / 255
    grid = levels.reshape(256, 1, 1, 1).expand(256, BATCH, *EVENT_SHAPE)
    total = elements.log_prob(grid).logsumexp(0)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-10)


def test_continuous_bernoulli_is_stable_near_one_half() -> None:
    """Through lambda = 1/2 (logit 0, where the closed form is 0 / 0) and at extreme logits the
    log normaliser matches 50-digit arithmetic, in float64 and float32."""
    mpmath = pytest.importorskip("mpmath")
    from vaeflow.likelihoods import continuous_bernoulli_log_norm

    mpmath.mp.dps = 50
    logits = [0.0, 1e-9, -1e-6, 1e-4, -9e-4, 1.1e-3, -0.3, 2.0, 30.0, -80.0]

    def exact(eta: float):
        lam = 1 / (1 + mpmath.exp(-mpmath.mpf(eta)))
        return float(
            mpmath.log(2) if eta == 0 else mpmath.log(2 * mpmath.atanh(1 - 2 * lam) / (1 - 2 * lam))
        )

    expected = torch.tensor([exact(eta) for eta in logits], dtype=torch.float64)
    double = continuous_bernoulli_log_norm(torch.tensor(logits, dtype=torch.float64))
    torch.testing.assert_close(double, expected, rtol=1e-14, atol=1e-14)
    single = continuous_bernoulli_log_norm(torch.tensor(logits, dtype=torch.float32))
    torch.testing.assert_close(single.double(), expected, rtol=1e-6, atol=1e-6)


def test_learned_scales_are_capped_so_they_cannot_overflow() -> None:
    """Raw scales at 1e30 (a diverged run) give the caps, and finite log-densities."""
    gaussian = bound_likelihood("gaussian", variance="per_dimension", max_std=50.0)
    gaussian.raw_std.data.fill_(1e30)
    torch.testing.assert_close(gaussian.scale(), torch.full(EVENT_SHAPE, 50.0))
    x = torch.rand(BATCH, *EVENT_SHAPE)
    for name, caps in (("laplace", {"max_scale": 50.0}), ("discretized_logistic", {})):
        likelihood = bound_likelihood(name, **caps)
        params = torch.zeros(BATCH, *EVENT_SHAPE, likelihood.num_params)
        params[..., -1] = 1e30  # the scale channel
        outputs = params.movedim(-1, 1).flatten(1)
        dist = likelihood(outputs).base_dist
        log_prob = likelihood.log_prob(outputs, x.round() if likelihood.discrete else x)
        assert torch.isfinite(log_prob).all(), name
        if name == "laplace":
            torch.testing.assert_close(dist.scale, torch.full_like(dist.scale, 50.0))
        else:
            assert (dist.log_scale == likelihood.max_log_scale).all()
    for name, bad in (
        ("gaussian", {"min_std": 1.0, "max_std": 0.5}),
        ("gaussian", {"std": 2e4}),
        ("laplace", {"min_scale": 0.0}),
        ("discretized_logistic", {"min_log_scale": 1.0, "max_log_scale": 0.0}),
    ):
        with pytest.raises(ConfigError, match=r"scale|std"):
            LIKELIHOODS.get(name)(**bad)


@pytest.mark.parametrize(
    ("name", "option", "read"),
    [
        ("gaussian", "std", lambda likelihood: likelihood.scale()),
        ("negative_binomial", "theta", lambda likelihood: likelihood.inverse_dispersion(None)),
        (
            "zero_inflated_negative_binomial",
            "theta",
            lambda likelihood: likelihood.inverse_dispersion(None),
        ),
    ],
)
@pytest.mark.parametrize("value", [0.0011, 1.0, 1000.0, 9999.0])
def test_a_learned_scale_starts_where_asked_anywhere_in_its_range(name, option, read, value):
    """``std=1000`` overflowed ``math.expm1`` in the inverse softplus of ``bind``."""
    likelihood = bound_likelihood(name, **{option: value})
    torch.testing.assert_close(read(likelihood), torch.full_like(read(likelihood), value))


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_the_mean_is_the_expectation(name: str) -> None:
    """``mean`` is E[x | z] (the pictures and ``sample(mean=True)`` show it as that; every
    family must define it): against the mean of 20,000 samples (within 5 standard errors),
    and for the discrete families against the sum over the 256 levels in float64 (1e-10)."""
    torch.manual_seed(3)
    likelihood = bound_likelihood(name).double()
    outputs = 2 * torch.randn(BATCH, likelihood.num_outputs, dtype=torch.float64)
    dist = likelihood.distribution(likelihood.params(outputs))
    draws = dist.sample((20_000,))
    error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - dist.mean).abs() <= 5 * error + 1e-12).all()
    if likelihood.discrete:
        levels = torch.arange(256, dtype=torch.float64) / 255
        grid = levels.reshape(256, 1, 1, 1).expand(256, BATCH, *EVENT_SHAPE)
        masses = dist.log_prob(grid).exp()
        exact = (masses * levels.reshape(256, 1, 1, 1)).sum(0)
        torch.testing.assert_close(dist.mean, exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("loc", "log_scale", "expected"), [(-1.5, 0.5, 0.2922), (0.99, -0.5, 0.7985)]
)
def test_the_discretized_logistic_mean_counts_the_edge_bins(loc, log_scale, expected) -> None:
    """Two locations near and beyond the edges, where the clipped mean location gave 0.0000
    and 0.9950 (100,000 samples agree with the expected values)."""
    one = torch.ones(1, 1, dtype=torch.float64)
    dist = DiscretizedLogisticMixture(0 * one, loc * one, log_scale * one)
    assert dist.mean.item() == pytest.approx(expected, abs=1e-4)
