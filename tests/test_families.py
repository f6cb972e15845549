"""Every registered likelihood and prior, tested from the registry (a new family is tested the
day it is registered): shapes, sampling, support, and log densities against scipy in float64."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import constraints

from vaeflow.errors import DataError
from vaeflow.likelihoods import GaussianLikelihood
from vaeflow.registry import LIKELIHOODS, PRIORS

EVENT_SHAPE = (2, 3)
BATCH = 5
BUILT_IN_LIKELIHOODS = [
    n for n in LIKELIHOODS.names() if LIKELIHOODS.get(n).__module__.startswith("vaeflow.")
]
BUILT_IN_PRIORS = [n for n in PRIORS.names() if PRIORS.get(n).__module__.startswith("vaeflow.")]


def scipy_bernoulli(likelihood, logits, x):
    p = 1 / (1 + np.exp(-logits))
    binary = stats.bernoulli.logpmf(x.round(), p)
    grey = x * np.log(p) + (1 - x) * np.log1p(-p)  # the cross-entropy form for grey levels
    return np.where(np.isin(x, (0.0, 1.0)), binary, grey)


def scipy_gaussian(likelihood, loc, x):
    return stats.norm.logpdf(x, loc, likelihood.scale().detach().double().numpy())


#: name -> (constructor kwargs variants, element-wise scipy log density)
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
}


def test_every_built_in_likelihood_has_a_scipy_reference() -> None:
    assert sorted(SCIPY_LIKELIHOODS) == BUILT_IN_LIKELIHOODS


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
    dist = likelihood(outputs)
    x = dist.sample()
    if name == "bernoulli":  # grey levels too
        x[:, 0, 0] = torch.rand(BATCH, dtype=torch.float64)
    params = outputs.unflatten(-1, (likelihood.params_per_element, *EVENT_SHAPE)).numpy()
    expected = SCIPY_LIKELIHOODS[name][1](likelihood, *params.swapaxes(0, 1), x.numpy())
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
    for outputs with and without a leading sample dimension."""
    torch.manual_seed(4)
    likelihood = bound_likelihood(name, **kwargs).double()
    for param in likelihood.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    x = likelihood(torch.randn(BATCH, likelihood.num_outputs, dtype=torch.float64)).sample()
    for shape in ((BATCH,), (3, BATCH)):
        outputs = torch.randn(*shape, likelihood.num_outputs, dtype=torch.float64)
        log_prob = likelihood.log_prob(outputs, x)
        assert log_prob.shape == shape
        torch.testing.assert_close(
            log_prob, likelihood(outputs).log_prob(x), rtol=1e-12, atol=1e-10
        )


def test_gaussian_learned_variance_is_trainable_and_floored() -> None:
    likelihood = bound_likelihood("gaussian", variance="per_dimension", std=0.5, min_std=0.01)
    assert likelihood.raw_std.shape == EVENT_SHAPE
    torch.testing.assert_close(likelihood.scale(), torch.full(EVENT_SHAPE, 0.5))
    likelihood.raw_std.data.fill_(-1e4)
    assert (likelihood.scale() >= 0.01).all()
    assert not list(bound_likelihood("gaussian", variance="fixed").parameters())
    assert isinstance(LIKELIHOODS.build("gaussian"), GaussianLikelihood)


def scipy_standard_normal(prior, z):
    return stats.multivariate_normal(np.zeros(z.shape[-1]), np.eye(z.shape[-1])).logpdf(z)


def scipy_learned_gaussian(prior, z):
    scale = prior.log_scale.detach().exp().double().numpy()
    return stats.multivariate_normal(prior.loc.detach().double().numpy(), np.diag(scale**2)).logpdf(
        z
    )


SCIPY_PRIORS = {
    "standard_normal": scipy_standard_normal,
    "learned_gaussian": scipy_learned_gaussian,
}


def test_every_built_in_prior_has_a_scipy_reference() -> None:
    assert sorted(SCIPY_PRIORS) == BUILT_IN_PRIORS


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_shapes_sampling_and_kl(name: str) -> None:
    torch.manual_seed(2)
    prior = PRIORS.build(name)
    prior.bind(3)
    for param in prior.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    dist = prior()
    assert dist.event_shape == (3,)
    z = dist.sample((7,))
    assert z.shape == (7, 3)
    # the KL (analytic or not) agrees with a Monte-Carlo estimate from the posterior's samples
    posterior = torch.distributions.Independent(
        torch.distributions.Normal(torch.randn(2, 3), torch.rand(2, 3) + 0.5), 1
    )
    samples = posterior.sample((100_000,))
    kl = prior.kl(posterior, samples)
    log_ratio = posterior.log_prob(samples) - dist.log_prob(samples)
    stderr = log_ratio.std(0) / len(samples) ** 0.5
    assert kl.shape == (2,)
    assert ((kl - log_ratio.mean(0)).abs() < 5 * stderr).all()


def test_the_standard_normal_kl_shortcuts_equal_the_general_gaussian_kl() -> None:
    """The registered KL(Normal || StandardNormal) and the prior's direct path from a diagonal
    Gaussian posterior both equal torch's general Gaussian-to-Gaussian KL."""
    from torch.distributions.kl import _kl_normal_normal

    from vaeflow.priors import StandardNormal

    posterior = torch.distributions.Normal(
        torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64) + 0.1
    )
    prior = StandardNormal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    general = _kl_normal_normal(posterior, prior)
    exact = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.distributions.kl_divergence(posterior, prior), general, **exact
    )
    standard_normal = PRIORS.build("standard_normal")
    standard_normal.bind(3)
    diagonal = torch.distributions.Independent(posterior, 1)
    direct = standard_normal.kl(diagonal, diagonal.sample())
    torch.testing.assert_close(direct, general.sum(-1), **exact)


@pytest.mark.parametrize("name", SCIPY_PRIORS)
def test_prior_log_prob_matches_scipy_in_float64(name: str) -> None:
    torch.manual_seed(3)
    prior = PRIORS.build(name)
    prior.bind(4)
    prior.double()
    for param in prior.parameters():
        param.data.add_(0.3 * torch.randn_like(param))
    z = prior().sample((6,))
    np.testing.assert_allclose(
        prior().log_prob(z).detach().numpy(), SCIPY_PRIORS[name](prior, z.numpy()), rtol=1e-10
    )
