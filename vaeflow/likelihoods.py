"""Likelihood families p(x | z): turn decoder outputs into a distribution over one example.

A family is a small ``nn.Module`` registered by name; the VAE asks it how many decoder outputs it
needs per data element and gets back a ``torch.distributions.Distribution`` whose event shape is
one example. Register a new family with ``@register_likelihood("name")`` (or an entry point in the
``vaeflow.likelihoods`` group) and it works in YAML as ``likelihood: name``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints

from vaeflow.errors import ConfigError, DataError
from vaeflow.registry import register_likelihood

LOG_2PI = math.log(2 * math.pi)


class Likelihood(nn.Module):
    """Base class: decoder outputs -> distribution over one example, plus a support check.

    Subclasses set ``params_per_element`` and ``support`` and implement :meth:`distribution`,
    which receives ``params_per_element`` tensors shaped like the batch of data.
    """

    #: decoder outputs needed per data element (a mean, or a mean and a scale, ...).
    params_per_element: int = 1
    #: the set every data value must lie in.
    support: constraints.Constraint = constraints.real

    def __init__(self) -> None:
        super().__init__()
        self.event_shape: tuple[int, ...] = ()

    def bind(self, event_shape: tuple[int, ...]) -> None:
        """Fix the shape of one example; called once by the model (creates per-element params)."""
        self.event_shape = tuple(event_shape)

    @property
    def num_outputs(self) -> int:
        """How many numbers the decoder must output for one example."""
        return self.params_per_element * math.prod(self.event_shape)

    def forward(self, outputs: Tensor) -> Distribution:
        """``outputs`` of shape ``(*batch, num_outputs)`` -> distribution with that batch shape."""
        if self.params_per_element == 1:  # the common case, without a split
            params = (outputs.unflatten(-1, self.event_shape),)
        else:
            shaped = outputs.unflatten(-1, (self.params_per_element, *self.event_shape))
            params = shaped.unbind(-1 - len(self.event_shape))
        return Independent(self.distribution(*params), len(self.event_shape))

    def distribution(self, *params: Tensor) -> Distribution:
        """The element-wise distribution for parameters shaped like the data."""
        raise NotImplementedError

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """log p(x | outputs) per example, shape ``outputs.shape[:-1]``; ``x`` (one example per
        row) broadcasts against the leading dimensions of ``outputs`` (samples, examples).

        The same number as ``self(outputs).log_prob(x)``, which is the default. Families with a
        closed form override it to skip building the distribution: it runs in every training
        step, where building two distribution objects costs a few percent of a small model's
        step on the CPU.
        """
        return self(outputs).log_prob(x)

    def flat(self, x: Tensor) -> Tensor:
        """``x`` with each example's elements in one last dimension, as the decoder outputs them."""
        return x.flatten(-len(self.event_shape))

    def check_support(self, data: Tensor) -> None:
        """Raise a :class:`DataError` that says what to change when ``data`` leave the support."""
        inside = self.support.check(data)
        if bool(inside.all()):
            return
        outside = data[~inside]
        raise DataError(
            f"{outside.numel()} data values lie outside the support of the "
            f"{getattr(self, 'registered_name', type(self).__name__)!r} likelihood "
            f"({self.support}); e.g. {outside[:3].tolist()} (data range "
            f"[{data.min().item():.4g}, {data.max().item():.4g}]). {self.support_hint}"
        )

    #: what the user can do about data outside the support.
    support_hint: str = "Choose a likelihood whose support contains the data."


@register_likelihood("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Bernoulli per element (logits from the decoder); data in [0, 1], grey levels allowed.

    Grey levels (non-binary data in [0, 1]) give the usual binary cross-entropy, which is not a
    normalised density for them; binarise the data (``binarize: dynamic``) for a proper one.
    """

    support = constraints.unit_interval
    support_hint = "Scale the data to [0, 1] (data option scale: true) or use likelihood: gaussian."

    def distribution(self, logits: Tensor) -> Distribution:
        return Bernoulli(logits=logits, validate_args=False)

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """Minus the binary cross-entropy, summed over the elements before it is negated."""
        target = self.flat(x).expand_as(outputs)
        return -F.binary_cross_entropy_with_logits(outputs, target, reduction="none").sum(-1)


@register_likelihood("gaussian")
class GaussianLikelihood(Likelihood):
    """Gaussian per element: mean from the decoder, variance fixed or learned.

    Args:
        variance: ``fixed`` (``std`` everywhere), ``shared`` (one learned variance) or
            ``per_dimension`` (one learned variance per data element).
        std: the fixed standard deviation, or the initial one when learned.
        min_std: floor of a learned standard deviation, so that it cannot collapse onto
            constant pixels (dequantise such data for a meaningful density).
    """

    def __init__(
        self,
        variance: Literal["fixed", "shared", "per_dimension"] = "shared",
        std: float = 1.0,
        min_std: float = 1e-3,
    ) -> None:
        super().__init__()
        if std <= min_std and variance != "fixed":
            raise ConfigError(f"gaussian likelihood: std ({std}) must exceed min_std ({min_std})")
        if std <= 0:
            raise ConfigError(f"gaussian likelihood: std must be positive, got {std}")
        self.variance = variance
        self.std = std
        self.min_std = min_std

    def bind(self, event_shape: tuple[int, ...]) -> None:
        super().bind(event_shape)
        if self.variance == "fixed":
            self.register_buffer("raw_std", torch.tensor(float(self.std)), persistent=False)
            return
        shape = self.event_shape if self.variance == "per_dimension" else ()
        # inverse softplus, so that the initial standard deviation is ``std``
        initial = math.log(math.expm1(self.std - self.min_std))
        self.raw_std = nn.Parameter(torch.full(shape, initial))

    def scale(self) -> Tensor:
        """The standard deviation (a scalar or one per element)."""
        if self.variance == "fixed":
            return self.raw_std
        return self.min_std + F.softplus(self.raw_std)

    def distribution(self, loc: Tensor) -> Distribution:
        return Normal(loc, self.scale().expand_as(loc), validate_args=False)

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """-1/2 sum ((x - mean) / std)^2 - sum log std - D/2 log(2 pi)."""
        scale = self.scale().expand(self.event_shape).flatten()
        standardised = (self.flat(x) - outputs) / scale
        dim = scale.numel()
        return -0.5 * standardised.square().sum(-1) - scale.log().sum() - 0.5 * dim * LOG_2PI
