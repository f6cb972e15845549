"""Priors p(z), and their KL divergence to an approximate posterior q(z | x).

A prior is bound with the model's context (:class:`PriorContext`: the latent size, the shape of
one example and the model's encoder), so that priors built from the model, such as the
VampPrior, are ordinary registered priors. The KL has one path, :func:`kl_or_estimate`:
``torch.distributions.kl_divergence`` (and its ``register_kl`` dispatch) where an analytic form
exists, else :func:`monte_carlo_kl` from the posterior's own samples. Register new priors with
``@register_prior("name")`` or the entry-point group ``vaeflow.priors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    kl_divergence,
    register_kl,
)

from vaeflow.errors import ConfigError
from vaeflow.registry import register_prior


@dataclass(frozen=True)
class PriorContext:
    """What a prior may depend on in the model it belongs to.

    Args:
        latent_dim: dimension of z.
        input_shape: shape of one example x.
        encode: the model's q(z | x), a batch of examples -> a distribution over z.
    """

    latent_dim: int
    input_shape: tuple[int, ...]
    encode: Callable[[Tensor], Distribution]


class DiagonalNormal(Independent):
    """A Gaussian with diagonal covariance over the last dimension: the VAE's posterior.

    A type of its own, so that KLs from it dispatch to short closed forms (below).
    """

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__(Normal(loc, scale, validate_args=False), 1, validate_args=False)

    def marginals(self) -> Normal:
        """The per-dimension Gaussians (batch shape ``(*batch, latent_dim)``)."""
        return self.base_dist


class StandardNormal(Normal):
    """N(0, 1) per element: a type of its own, so that the KL from a Gaussian posterior takes
    the short closed form below instead of the general Gaussian-to-Gaussian one."""


class StandardDiagonalNormal(Independent):
    """N(0, I) over the last dimension (the standard-normal prior's distribution)."""


def kl_to_standard_normal(p: Normal) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma per element
    (Kingma & Welling, 2014, appendix B)."""
    return 0.5 * (p.loc.square() + p.scale.square() - 1) - p.scale.log()


@register_kl(Normal, StandardNormal)
def _kl_normal_standard_normal(p: Normal, q: StandardNormal) -> Tensor:
    return kl_to_standard_normal(p)


@register_kl(DiagonalNormal, StandardDiagonalNormal)
def _kl_diagonal_standard_normal(p: DiagonalNormal, q: StandardDiagonalNormal) -> Tensor:
    """The closed form straight from the posterior's parameters: the number torch's
    ``Independent`` dispatch gives, without its intermediate dispatch and checks."""
    return kl_to_standard_normal(p.base_dist).sum(-1)


def mean_over_samples(values: Tensor, posterior: Distribution) -> Tensor:
    """The mean of ``values`` (``(*sample_shape, *posterior.batch_shape)``) over the samples;
    ``values`` itself when they were drawn without a sample shape."""
    sample_dims = values.dim() - len(posterior.batch_shape)
    return values.flatten(0, sample_dims - 1).mean(0) if sample_dims else values


def monte_carlo_kl(posterior: Distribution, prior: Distribution, samples: Tensor) -> Tensor:
    """KL(q || p) estimated as the mean over ``samples`` (drawn from ``posterior``, shape
    ``(*sample_shape, *batch, *event)``) of log q(z) - log p(z): unbiased for any pair."""
    return mean_over_samples(posterior.log_prob(samples) - prior.log_prob(samples), posterior)


def kl_or_estimate(posterior: Distribution, prior: Distribution, samples: Tensor) -> Tensor:
    """KL(q || p): analytic where ``kl_divergence`` has a form for the pair, else
    :func:`monte_carlo_kl` over ``samples``. Works per example (``Independent`` pairs) and per
    latent dimension (their base distributions) alike."""
    try:
        return kl_divergence(posterior, prior)
    except NotImplementedError:
        return monte_carlo_kl(posterior, prior, samples)


class Prior(nn.Module):
    """Base class: a distribution over the latent vector (event shape ``(latent_dim,)``).

    Contract: keep each constructor argument as an attribute of the same name
    (``self.components = components``). A checkpoint stores the prior as its class path and the
    init args read back from those attributes, and rebuilds it from them
    (:mod:`vaeflow.hparams`); registration refuses a class that breaks this
    (:func:`vaeflow.registry.check_init_attributes`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 0

    def bind(self, context: PriorContext) -> None:
        """Fix the model's context; called once by the model (creates learned parameters)."""
        self.latent_dim = context.latent_dim

    def forward(self) -> Distribution:
        """The prior distribution p(z)."""
        raise NotImplementedError

    def marginals(self) -> Distribution | None:
        """For a prior that factorises over the latent dimensions, its per-dimension
        distribution (batch shape ``(latent_dim,)``); None otherwise. Per-dimension KLs (free
        bits, the KL of each latent dimension at test) need it."""
        return None


@register_prior("standard_normal")
class StandardNormalPrior(Prior):
    """Standard normal N(0, I): the classic VAE prior."""

    def bind(self, context: PriorContext) -> None:
        super().bind(context)
        self.register_buffer("zeros", torch.zeros(self.latent_dim), persistent=False)
        self.register_buffer("ones", torch.ones(self.latent_dim), persistent=False)
        self._distribution: StandardDiagonalNormal | None = None

    def forward(self) -> Distribution:
        """The same object at every step (building it costs a quarter of the KL's time on a
        small model), rebuilt when the buffers moved (``.to(device)`` replaces them)."""
        cached = self._distribution
        if cached is None or cached.base_dist.loc is not self.zeros:
            cached = StandardDiagonalNormal(self.marginals(), 1, validate_args=False)
            self._distribution = cached
        return cached

    def marginals(self) -> Distribution:
        return StandardNormal(self.zeros, self.ones, validate_args=False)


@register_prior("learned_gaussian")
class LearnedGaussianPrior(Prior):
    """Diagonal Gaussian with trainable mean and log standard deviation (starts at N(0, I))."""

    def bind(self, context: PriorContext) -> None:
        super().bind(context)
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.latent_dim))

    def forward(self) -> Distribution:
        return Independent(self.marginals(), 1, validate_args=False)

    def marginals(self) -> Distribution:
        return Normal(self.loc, self.log_scale.exp(), validate_args=False)


def check_components(name: str, components: int) -> None:
    """Refuse a mixture prior without components."""
    if components < 1:
        raise ConfigError(f"{name} prior: components must be positive, got {components}")


@register_prior("mixture_of_gaussians")
class MixtureOfGaussiansPrior(Prior):
    """A mixture of ``components`` diagonal Gaussians with learned weights, means and scales;
    the KL from a posterior is estimated by Monte Carlo (it has no closed form).

    Args:
        components: number of Gaussians K.
        spread: standard deviation of the initial means around 0 (the scales start at 1), so
            that the components start apart.
    """

    def __init__(self, components: int = 10, spread: float = 1.0) -> None:
        super().__init__()
        check_components("mixture_of_gaussians", components)
        self.components = components
        self.spread = spread

    def bind(self, context: PriorContext) -> None:
        super().bind(context)
        shape = (self.components, self.latent_dim)
        self.logits = nn.Parameter(torch.zeros(self.components))
        self.loc = nn.Parameter(self.spread * torch.randn(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))

    def forward(self) -> Distribution:
        gaussians = Independent(Normal(self.loc, self.log_scale.exp(), validate_args=False), 1)
        weights = Categorical(logits=self.logits, validate_args=False)
        return MixtureSameFamily(weights, gaussians, validate_args=False)


@register_prior("vamp")
class VampPrior(Prior):
    """VampPrior (Tomczak & Welling, 2018): the equal-weight mixture of the model's own
    posteriors q(z | u_k) at ``components`` learned pseudo-inputs u_k; the KL by Monte Carlo.

    Args:
        components: number of pseudo-inputs K.
        init_range: the pseudo-inputs start uniform in this (low, high) range (the data's,
            e.g. (0, 1) for pixels scaled to [0, 1]).
    """

    def __init__(self, components: int = 500, init_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        check_components("vamp", components)
        self.components = components
        self.init_range = tuple(init_range)
        self.encode: Callable[[Tensor], Distribution] | None = None

    def bind(self, context: PriorContext) -> None:
        super().bind(context)
        low, high = self.init_range
        shape = (self.components, *context.input_shape)
        self.pseudo_inputs = nn.Parameter(low + (high - low) * torch.rand(shape))
        # a plain function attribute, not a submodule: the encoder's parameters stay the model's
        self.encode = context.encode

    def forward(self) -> Distribution:
        posteriors = self.encode(self.pseudo_inputs)  # batch shape (K,)
        weights = Categorical(logits=self.pseudo_inputs.new_zeros(self.components))
        return MixtureSameFamily(weights, posteriors, validate_args=False)
