"""Count families: Poisson, negative binomial and zero-inflated negative binomial per element,
for data that are non-negative integers (gene expression, word counts, event counts).

The decoder's first parameter per element is the log of the mean (a log link, as in Poisson
regression). With ``library_size: observed`` it is instead a logit of each element's share of
the example's total, and the mean is that share times the example's observed size factor, its
total count: mu_d = l * softmax(outputs)_d with l = sum_d x_d. This is how scVI treats library
size when it is observed (Lopez et al., 2018, with ``use_observed_lib_size``), and how
Poisson/negative-binomial GLMs of sequencing counts take the size factor as an offset (DESeq2's
log mu = log s + eta): the latent code then describes composition, not sequencing depth.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    NegativeBinomial,
    Poisson,
    constraints,
)

from vaeflow.errors import ConfigError
from vaeflow.likelihoods import Likelihood, bounded_scale, check_scale_range, raw_for_scale
from vaeflow.registry import register_likelihood

#: bound of a log mean: e^25 = 7e10 counts; e^-25 = 1e-11, so that a diverging run can neither
#: overflow the mean nor take log 0 of a mean that underflowed.
LOG_MEAN_BOUND = 25.0

LibrarySize = Literal["none", "observed"]


class CountLikelihood(Likelihood):
    """Base of the count families: the mean from the decoder (log link), optionally times the
    observed library size of each example.

    Args:
        library_size: ``none``: the mean is exp of the decoder's output. ``observed``: the mean
            is the example's total count (at least 1) times the softmax of the outputs over its
            elements; :meth:`VAE.decode` and :meth:`VAE.sample` then give counts for the
            ``size_factor`` they are passed, and expression per unit of library without one
            (the proportions scVI calls normalised expression).
    """

    support = constraints.nonnegative_integer
    support_hint = (
        "Count likelihoods model non-negative integers: keep the counts as they are (data "
        "options scale: false, dequantize: none, binarize: none)."
    )

    def __init__(self, library_size: LibrarySize = "none") -> None:
        super().__init__()
        self.library_size = library_size

    @property
    def elementwise(self) -> bool:
        """Without an observed library size, the elements are independent given z."""
        return self.library_size == "none"

    def size_factor(self, x: Tensor) -> Tensor | None:
        """The total count of each example (at least 1) with ``library_size: observed``."""
        if self.library_size == "none":
            return None
        return self.flat(x).sum(-1).clamp(min=1)

    def log_mean(self, raw: Tensor, size_factor: Tensor | None) -> Tensor:
        """log E[x] per element from the decoder's first parameter ``raw`` ``(*batch,
        *event_shape)`` and the size factors ``(*batch,)`` (None: 1 per example)."""
        if self.library_size == "none":
            if size_factor is not None:
                raise ConfigError(
                    f"the {self.registered_name!r} likelihood takes a size factor only with "
                    "library_size: observed"
                )
            return raw.clamp(-LOG_MEAN_BOUND, LOG_MEAN_BOUND)
        elements = tuple(range(-len(self.event_shape), 0))
        log_mean = raw - raw.logsumexp(elements, keepdim=True)
        if size_factor is not None:
            per_example = size_factor.reshape(*size_factor.shape, *(1,) * len(elements))
            log_mean = log_mean + per_example.log()
        return log_mean.clamp(-LOG_MEAN_BOUND, LOG_MEAN_BOUND)

    def forward(self, outputs: Tensor, size_factor: Tensor | None = None) -> Distribution:
        params = self.params(outputs)
        counts = self.counts(self.log_mean(params[..., 0], size_factor), params)
        return Independent(counts, len(self.event_shape))

    def distribution(self, params: Tensor) -> Distribution:
        """The element-wise counts with a size factor of 1."""
        return self.counts(self.log_mean(params[..., 0], None), params)

    def counts(self, log_mean: Tensor, params: Tensor) -> Distribution:
        """The element-wise distribution of the counts with mean ``exp(log_mean)``; ``params``
        holds the family's other parameters (dispersion, zero inflation) after the first."""
        raise NotImplementedError


@register_likelihood("poisson")
class PoissonLikelihood(CountLikelihood):
    """Poisson per element, mean from the decoder: counts whose variance equals their mean.

    Over-dispersed counts (most biological ones) exceed it; see ``negative_binomial``.
    """

    def counts(self, log_mean: Tensor, params: Tensor) -> Distribution:
        return Poisson(log_mean.exp(), validate_args=False)


@register_likelihood("negative_binomial")
class NegativeBinomialLikelihood(CountLikelihood):
    """Negative binomial per element: over-dispersed counts, mean from the decoder.

    With inverse dispersion theta, p(x) = Gamma(x + theta) / (Gamma(theta) x!)
    (theta / (theta + mu))^theta (mu / (theta + mu))^x, variance mu + mu^2 / theta (scVI's
    parameterisation; theta -> inf is the Poisson).

    Args:
        library_size: see :class:`CountLikelihood`.
        dispersion: ``feature``: one theta per data element, learned (scVI's ``gene``);
            ``example``: theta for every element of every example from the decoder (scVI's
            ``gene-cell``).
        theta: the initial theta of ``feature`` dispersion.
        theta_range: (floor, cap) of theta: the floor keeps the density finite, the cap keeps a
            diverging run from overflowing it (1e4 is Poisson-like for any count a model sees).
    """

    #: parameters per element after the mean and the dispersion (subclasses' own)
    extra_params: int = 0

    def __init__(
        self,
        library_size: LibrarySize = "none",
        dispersion: Literal["feature", "example"] = "feature",
        theta: float = 1.0,
        theta_range: tuple[float, float] = (1e-4, 1e4),
    ) -> None:
        super().__init__(library_size)
        check_scale_range(f"{type(self).__name__} theta_range", *theta_range)
        if not theta_range[0] < theta < theta_range[1]:
            raise ConfigError(
                f"{type(self).__name__}: the initial theta ({theta}) must lie inside theta_range "
                f"{tuple(theta_range)}"
            )
        self.dispersion = dispersion
        self.theta = theta
        self.theta_range = tuple(theta_range)
        self.num_params = (2 if dispersion == "example" else 1) + self.extra_params

    def bind(self, event_shape: tuple[int, ...]) -> None:
        super().bind(event_shape)
        if self.dispersion == "feature":
            initial = raw_for_scale(self.theta, self.theta_range[0])  # the initial theta
            self.raw_theta = nn.Parameter(torch.full(self.event_shape, initial))

    def inverse_dispersion(self, params: Tensor) -> Tensor:
        """theta per element: the learned one, or the decoder's second parameter."""
        raw = self.raw_theta if self.dispersion == "feature" else params[..., 1]
        return bounded_scale(raw, *self.theta_range)

    def counts(self, log_mean: Tensor, params: Tensor) -> Distribution:
        theta = self.inverse_dispersion(params)
        # torch's (total_count, logits) form: logits = log(mu / theta)
        logits = log_mean - theta.log()
        return NegativeBinomial(theta.expand_as(logits), logits=logits, validate_args=False)


class ZeroInflatedNegativeBinomial(Distribution):
    """A negative binomial whose counts are replaced by 0 with probability pi = sigmoid(
    ``zero_logits``): p(0) = pi + (1 - pi) NB(0), p(x) = (1 - pi) NB(x) for x > 0.

    Args:
        counts: the negative binomial.
        zero_logits: logits of pi, shaped as ``counts``' batch.
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer

    def __init__(self, counts: NegativeBinomial, zero_logits: Tensor) -> None:
        self.counts = counts
        self.zero_logits = zero_logits
        super().__init__(counts.batch_shape, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        """log of the mixture's mass, by log-sum-exp at 0 (no cancellation when pi is tiny)."""
        kept = F.logsigmoid(-self.zero_logits) + self.counts.log_prob(value)
        zero = torch.logaddexp(F.logsigmoid(self.zero_logits), kept)
        return torch.where(value == 0, zero, kept)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            counts = self.counts.sample(torch.Size(sample_shape))
            zeroed = torch.rand_like(counts) < torch.sigmoid(self.zero_logits)
            return counts.masked_fill(zeroed, 0.0)

    @property
    def mean(self) -> Tensor:
        """(1 - pi) mu."""
        return torch.sigmoid(-self.zero_logits) * self.counts.mean


@register_likelihood("zero_inflated_negative_binomial")
class ZeroInflatedNegativeBinomialLikelihood(NegativeBinomialLikelihood):
    """Zero-inflated negative binomial per element (scVI's ``zinb``): counts with extra zeros.

    The negative binomial of ``negative_binomial`` and, from the decoder, the logit of each
    element's probability of an extra zero (a technical dropout, in sequencing data). Arguments
    as ``negative_binomial``.
    """

    #: the zero-inflation logit, the last parameter
    extra_params = 1

    def counts(self, log_mean: Tensor, params: Tensor) -> Distribution:
        return ZeroInflatedNegativeBinomial(super().counts(log_mean, params), params[..., -1])
