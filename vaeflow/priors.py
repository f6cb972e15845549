"""Priors p(z), and their KL divergence to an approximate posterior q(z | x).

The KL goes through ``torch.distributions.kl_divergence`` (and its ``register_kl`` dispatch)
where an analytic form exists, and falls back to a Monte-Carlo estimate from the posterior's own
samples otherwise. Register new priors with ``@register_prior("name")`` or the entry-point group
``vaeflow.priors``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence, register_kl

from vaeflow.registry import register_prior


class Prior(nn.Module):
    """Base class: a distribution over the latent vector (event shape ``(latent_dim,)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 0

    def bind(self, latent_dim: int) -> None:
        """Fix the latent dimension; called once by the model (creates learned parameters)."""
        self.latent_dim = latent_dim

    def forward(self) -> Distribution:
        """The prior distribution p(z)."""
        raise NotImplementedError

    def kl(self, posterior: Distribution, samples: Tensor) -> Tensor:
        """KL(q || p) per example: analytic where registered, else the mean over ``samples``
        (drawn from ``posterior``, shape ``(*sample_shape, *batch, latent_dim)``) of
        log q - log p."""
        prior = self()
        try:
            return kl_divergence(posterior, prior)
        except NotImplementedError:
            log_ratio = posterior.log_prob(samples) - prior.log_prob(samples)
            return mean_over_samples(log_ratio, posterior)

    def has_analytic_kl(self, posterior: Distribution) -> bool:
        """Whether ``kl_divergence`` has a closed form for this posterior and prior."""
        try:
            kl_divergence(posterior, self())
        except NotImplementedError:
            return False
        return True


def mean_over_samples(values: Tensor, posterior: Distribution) -> Tensor:
    """The mean of ``values`` (``(*sample_shape, *posterior.batch_shape)``) over the samples;
    ``values`` itself when they were drawn without a sample shape."""
    sample_dims = values.dim() - len(posterior.batch_shape)
    return values.flatten(0, sample_dims - 1).mean(0) if sample_dims else values


class StandardNormal(Normal):
    """N(0, 1) per element: a type of its own, so that the KL from a Gaussian posterior takes
    the short closed form below instead of the general Gaussian-to-Gaussian one."""


def kl_to_standard_normal(p: Normal) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma per element
    (Kingma & Welling, 2014, appendix B)."""
    return 0.5 * (p.loc.square() + p.scale.square() - 1) - p.scale.log()


@register_kl(Normal, StandardNormal)
def _kl_normal_standard_normal(p: Normal, q: StandardNormal) -> Tensor:
    return kl_to_standard_normal(p)


@register_prior("standard_normal")
class StandardNormalPrior(Prior):
    """Standard normal N(0, I): the classic VAE prior."""

    def bind(self, latent_dim: int) -> None:
        super().bind(latent_dim)
        self.register_buffer("zeros", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("ones", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:
        return Independent(StandardNormal(self.zeros, self.ones, validate_args=False), 1)

    def kl(self, posterior: Distribution, samples: Tensor) -> Tensor:
        """For the VAE's diagonal Gaussian posterior, the closed form straight from its
        parameters: the number ``kl_divergence`` gives, at half the cost (building p(z) and
        the dispatch through ``Independent`` cost as much as the formula, every step)."""
        diagonal_gaussian = (
            type(posterior) is Independent
            and type(posterior.base_dist) is Normal
            and posterior.reinterpreted_batch_ndims == 1
        )
        if diagonal_gaussian:
            return kl_to_standard_normal(posterior.base_dist).sum(-1)
        return super().kl(posterior, samples)


@register_prior("learned_gaussian")
class LearnedGaussianPrior(Prior):
    """Diagonal Gaussian with trainable mean and log standard deviation (starts at N(0, I))."""

    def bind(self, latent_dim: int) -> None:
        super().bind(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, self.log_scale.exp(), validate_args=False), 1)
