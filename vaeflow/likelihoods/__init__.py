"""Likelihood families p(x | z): turn decoder outputs into a distribution over one example.

A family is a small ``nn.Module`` registered by name. It declares ``num_params``, how many
parameters each data element has (1 for a Bernoulli's logit, 256 for a 256-way categorical), and
receives them as one tensor with a trailing parameter axis. The decoder produces
``output_shape`` numbers per example: the event shape with the parameter axis folded into its
first (channel) axis, parameters first, so an MLP and a convolutional decoder both fit. Register
a new family with ``@register_likelihood("name")`` (or an entry point in the
``vaeflow.likelihoods`` group) and it works in YAML as ``likelihood: name``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    Normal,
    constraints,
)

from vaeflow.errors import ConfigError, DataError
from vaeflow.registry import register_likelihood

LOG_2PI = math.log(2 * math.pi)
#: levels of 8-bit pixels; data on this grid are ``k / 255`` in [0, 1] (``scale: true``).
PIXEL_LEVELS = 256


class Likelihood(nn.Module):
    """Base class: decoder outputs -> distribution over one example, plus a support check.

    Subclasses set ``num_params`` and ``support`` and implement :meth:`distribution`, which
    receives the parameters as one tensor shaped ``(*batch, *event_shape, num_params)``.

    Contract: keep each constructor argument as an attribute of the same name
    (``self.df = df``). A checkpoint stores the likelihood as its class path and the init args
    read back from those attributes, and rebuilds it from them (:mod:`vaeflow.hparams`);
    registration refuses a class that breaks this (:func:`vaeflow.registry.check_init_attributes`).
    """

    #: parameters per data element (a mean; a mean and a scale; 256 logits, ...).
    num_params: int = 1
    #: the set every data value must lie in.
    support: constraints.Constraint = constraints.real
    #: True when log p(x | z) is a probability mass on the data's own grid (8-bit pixel levels),
    #: not a density: bits per dimension then take no offset for the data's scaling.
    discrete: bool = False
    #: A value inside the support that stands in for a missing one while the per-element
    #: log-probabilities of an incomplete example are computed (:meth:`masked_log_prob` then
    #: leaves it out): it only keeps their values and gradients finite.
    fill_value: float = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.event_shape: tuple[int, ...] = ()

    def bind(self, event_shape: tuple[int, ...]) -> None:
        """Fix the shape of one example; called once by the model (creates per-element params)."""
        self.event_shape = tuple(event_shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the decoder's output for one example: ``(num_params * C, *rest)`` for an
        event shape ``(C, *rest)``, the parameter axis outermost."""
        first, *rest = self.event_shape
        return (self.num_params * first, *rest)

    @property
    def num_outputs(self) -> int:
        """How many numbers the decoder outputs for one example."""
        return math.prod(self.output_shape)

    def params(self, outputs: Tensor) -> Tensor:
        """Flat decoder ``outputs`` ``(*batch, num_outputs)`` -> ``(*batch, *event_shape,
        num_params)``, the parameter axis last."""
        shaped = outputs.unflatten(-1, (self.num_params, *self.event_shape))
        return shaped.movedim(-1 - len(self.event_shape), -1)

    def forward(self, outputs: Tensor, size_factor: Tensor | None = None) -> Distribution:
        """``outputs`` of shape ``(*batch, num_outputs)`` -> distribution with that batch shape.

        ``size_factor`` ``(*batch,)`` scales the mean of families that take one (count families
        with ``library_size: observed``); the others refuse it.
        """
        if size_factor is not None:
            raise ConfigError(
                f"the {getattr(self, 'registered_name', type(self).__name__)!r} likelihood takes "
                "no size factor: only count families with library_size: observed do"
            )
        return Independent(self.distribution(self.params(outputs)), len(self.event_shape))

    def decoded(self, outputs: Tensor, size_factor: Tensor | None = None) -> Distribution:
        """``self(outputs, size_factor)``, the size factor passed only when there is one: a
        plugin family written before size factors existed defines ``forward(outputs)``."""
        return self(outputs) if size_factor is None else self(outputs, size_factor)

    def size_factor(self, x: Tensor) -> Tensor | None:
        """The observed size factor of each example of ``x`` that scales the decoded mean
        (a count's library size), or None for a family that takes none (the default)."""
        return None

    def distribution(self, params: Tensor) -> Distribution:
        """The element-wise distribution for ``params`` of shape ``(*data_shape, num_params)``."""
        raise NotImplementedError

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """log p(x | outputs) per example, shape ``outputs.shape[:-1]``; ``x`` (one example per
        row) broadcasts against the leading dimensions of ``outputs`` (samples, examples).

        The same number as ``self.decoded(outputs, self.size_factor(x)).log_prob(x)``, the
        default. Families with a closed form override it to skip building the distribution: it
        runs in every training step, where building two distribution objects costs a few
        percent of a small model's step on the CPU.
        """
        return self.decoded(outputs, self.size_factor(x)).log_prob(x)

    @property
    def elementwise(self) -> bool:
        """Whether log p(x | z) is a sum of one term per data element, so that a missing element
        is left out of it exactly (:meth:`masked_log_prob`). True unless the elements share a
        quantity computed from x (a count family's observed library size, their total)."""
        return True

    def check_elementwise(self) -> None:
        """Refuse missing values in a family whose elements do not factorise given z."""
        if not self.elementwise:
            raise ConfigError(
                f"the {getattr(self, 'registered_name', type(self).__name__)!r} likelihood is "
                "not a product over the data elements here (library_size: observed takes the "
                "total of every element), so missing values cannot be left out of it: use "
                "library_size: none"
            )

    def element_log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """log p(x_d | outputs) of each data element, flat: ``(*batch, D)`` for ``outputs``
        ``(*batch, num_outputs)``; ``x`` broadcasts as in :meth:`log_prob`."""
        return self.flat(self.distribution(self.params(outputs)).log_prob(x))

    def masked_log_prob(self, outputs: Tensor, x: Tensor, observed: Tensor) -> Tensor:
        """log p(x_O | outputs) per example, shape ``outputs.shape[:-1]``: the sum of the
        per-element log-probabilities of the observed elements (``observed`` True, shaped as
        ``x``). The others are marginalised out, which for a family that factorises over the
        elements (:attr:`elementwise`) is leaving them out; their values (NaN) are never read.

        Raises:
            ConfigError: the family's elements do not factorise.
        """
        self.check_elementwise()
        filled = torch.where(observed, x, self.fill_value)
        log_prob = self.element_log_prob(outputs, filled)
        return torch.where(self.flat(observed), log_prob, 0.0).sum(-1)

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


def bounded_scale(raw: Tensor, low: float, high: float) -> Tensor:
    """A positive scale from an unconstrained ``raw``: ``low + softplus(raw)``, capped at
    ``high``. The floor keeps densities finite on constant data, the cap keeps a scale from
    overflowing when training diverges (healthy training never reaches it, so below it the
    numbers are those of the plain softplus)."""
    return (F.softplus(raw) + low).clamp(max=high)


def raw_for_scale(scale: float, low: float) -> float:
    """The ``raw`` whose :func:`bounded_scale` is ``scale`` (below the cap): the inverse
    softplus of ``scale - low``, as y + log(1 - e^-y), which unlike log(e^y - 1) does not
    overflow for a scale anywhere in a range capped at 1e4."""
    excess = scale - low
    return excess + math.log(-math.expm1(-excess))


def check_scale_range(name: str, low: float, high: float) -> None:
    """Refuse a scale range that is empty or not positive."""
    if not 0 < low < high < math.inf:
        raise ConfigError(
            f"{name}: the scale range needs 0 < floor < cap < inf; got floor {low}, cap {high}"
        )


class BernoulliLogProb(torch.autograd.Function):
    """sum_d [x_d l_d - softplus(l_d)], minus the binary cross-entropy of logits ``l`` summed
    over the last axis, with its gradient (x - sigmoid(l)) written out.

    torch's CPU kernels for ``log1p``, ``log_sigmoid`` and ``binary_cross_entropy_with_logits``
    are about 3x slower per element than ``exp`` and ``log``, and this sum is most of the work
    of an importance-weighted evaluation (K decoder outputs per example). So softplus is taken
    as max(l, 0) + log(1 + exp(-|l|)) in place on one buffer: log(1 + u) differs from
    log1p(u) by less than 1.2e-7 per element (only where u < 2^-23), below the round-off of
    the float32 sum. ``benchmarks/vae_eval.py`` measures the effect.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        softplus = logits.abs().neg_().exp_().add_(1).log_().add_(logits.clamp(min=0))
        return (logits * x).sum(-1) - softplus.sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, ...]:
        logits, x = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = ((x - torch.sigmoid(logits)) * grad).sum_to_size(logits.shape)
        grad_x = (logits * grad).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """Minus the binary cross-entropy of ``logits`` against ``x`` (broadcast), summed over the
    last axis: log p(x) of a Bernoulli for binary x. On the CPU :class:`BernoulliLogProb`;
    elsewhere torch's fused kernel (one pass each way, where a GPU would be bound by the
    launches and memory traffic of the CPU version's element-wise steps)."""
    if logits.device.type == "cpu":
        return BernoulliLogProb.apply(logits, x)
    return fused_bernoulli_log_prob(logits, x)


def fused_bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """:func:`bernoulli_log_prob` by torch's ``binary_cross_entropy_with_logits``."""
    target = x.expand_as(logits)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)


@register_likelihood("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Bernoulli per element (logits from the decoder); data in [0, 1], grey levels allowed.

    Grey levels (non-binary data in [0, 1]) give the usual binary cross-entropy, which is not a
    normalised density for them; binarise the data (``binarize: dynamic``) for a proper one.
    """

    support = constraints.unit_interval
    support_hint = "Scale the data to [0, 1] (data option scale: true) or use likelihood: gaussian."

    def distribution(self, params: Tensor) -> Distribution:
        return Bernoulli(logits=params[..., 0], validate_args=False)

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """Minus the binary cross-entropy, summed over the elements."""
        return bernoulli_log_prob(outputs, self.flat(x))


@register_likelihood("gaussian")
class GaussianLikelihood(Likelihood):
    """Gaussian per element: mean from the decoder, variance fixed or learned.

    Args:
        variance: ``fixed`` (``std`` everywhere), ``shared`` (one learned variance) or
            ``per_dimension`` (one learned variance per data element).
        std: the fixed standard deviation, or the initial one when learned.
        min_std: floor of a learned standard deviation, so that it cannot collapse onto
            constant pixels (dequantise such data for a meaningful density).
        max_std: cap of a learned standard deviation, so that a diverging run cannot overflow
            it; raise it for data whose noise is larger in their own units.
    """

    def __init__(
        self,
        variance: Literal["fixed", "shared", "per_dimension"] = "shared",
        std: float = 1.0,
        min_std: float = 1e-3,
        max_std: float = 1e4,
    ) -> None:
        super().__init__()
        check_scale_range("gaussian likelihood", min_std, max_std)
        if not min_std < std < max_std and variance != "fixed":
            raise ConfigError(
                f"gaussian likelihood: the initial std ({std}) must lie between min_std "
                f"({min_std}) and max_std ({max_std})"
            )
        if std <= 0:
            raise ConfigError(f"gaussian likelihood: std must be positive, got {std}")
        self.variance = variance
        self.std = std
        self.min_std = min_std
        self.max_std = max_std

    def bind(self, event_shape: tuple[int, ...]) -> None:
        super().bind(event_shape)
        if self.variance == "fixed":
            self.register_buffer("raw_std", torch.tensor(float(self.std)), persistent=False)
            return
        shape = self.event_shape if self.variance == "per_dimension" else ()
        initial = raw_for_scale(self.std, self.min_std)  # the initial std is ``std``
        self.raw_std = nn.Parameter(torch.full(shape, initial))

    def scale(self) -> Tensor:
        """The standard deviation (a scalar or one per element)."""
        if self.variance == "fixed":
            return self.raw_std
        return bounded_scale(self.raw_std, self.min_std, self.max_std)

    def distribution(self, params: Tensor) -> Distribution:
        loc = params[..., 0]
        return Normal(loc, self.scale().expand_as(loc), validate_args=False)

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """-1/2 sum ((x - mean) / std)^2 - sum log std - D/2 log(2 pi)."""
        scale = self.scale().expand(self.event_shape).flatten()
        standardised = (self.flat(x) - outputs) / scale
        dim = scale.numel()
        return -0.5 * standardised.square().sum(-1) - scale.log().sum() - 0.5 * dim * LOG_2PI


@register_likelihood("laplace")
class LaplaceLikelihood(Likelihood):
    """Laplace per element, location and scale from the decoder: an L1 reconstruction loss
    with a learned, per-pixel uncertainty (heavier tails than a Gaussian).

    Args:
        min_scale: floor of the scale, so that it cannot collapse onto constant pixels.
        max_scale: cap of the scale, so that a diverging run cannot overflow it.
    """

    num_params = 2

    def __init__(self, min_scale: float = 1e-3, max_scale: float = 1e4) -> None:
        super().__init__()
        check_scale_range("laplace likelihood", min_scale, max_scale)
        self.min_scale = min_scale
        self.max_scale = max_scale

    def distribution(self, params: Tensor) -> Distribution:
        loc, raw_scale = params.unbind(-1)
        scale = bounded_scale(raw_scale, self.min_scale, self.max_scale)
        return Laplace(loc, scale, validate_args=False)


def continuous_bernoulli_log_norm(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019), from the
    logit eta of lambda: C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = eta / tanh(eta / 2).

    Written as log|eta| - log tanh(|eta| / 2) with a stable log tanh, and by its series
    log 2 + eta^2 / 12 - 7 eta^4 / 1440 (error below 1e-18) where |eta| < 1e-3, so that it stays
    accurate through lambda = 1/2, where the closed form is 0 / 0.
    """
    magnitude = logits.abs()
    near_half = magnitude < 1e-3
    safe = torch.where(near_half, torch.ones_like(magnitude), magnitude)
    log_tanh = torch.log(-torch.expm1(-safe)) - torch.log1p(torch.exp(-safe))
    square = logits.square()
    series = math.log(2.0) + square / 12 - 7 * square.square() / 1440
    return torch.where(near_half, series, safe.log() - log_tanh)


class StableContinuousBernoulli(ContinuousBernoulli):
    """torch's continuous Bernoulli with the log density from the logits directly:
    x eta - softplus(eta) + log C(eta), stable near lambda = 1/2 and at extreme logits."""

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.logits
        return value * logits - F.softplus(logits) + continuous_bernoulli_log_norm(logits)


@register_likelihood("continuous_bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli per element (logits from the decoder): the normalised density on
    [0, 1] that binary cross-entropy on grey levels is missing (Loaiza-Ganem & Cunningham, 2019).
    """

    support = constraints.unit_interval
    support_hint = "Scale the data to [0, 1] (data option scale: true)."

    def distribution(self, params: Tensor) -> Distribution:
        return StableContinuousBernoulli(logits=params[..., 0], validate_args=False)

    def log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """Minus the binary cross-entropy plus the log normalising constant, summed."""
        log_norm = continuous_bernoulli_log_norm(outputs).sum(-1)
        return bernoulli_log_prob(outputs, self.flat(x)) + log_norm


class PixelGrid(constraints.Constraint):
    """Values ``k / (levels - 1)`` for integers ``0 <= k < levels``: 8-bit pixels scaled to
    [0, 1] without dequantisation noise."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels

    def check(self, value: Tensor) -> Tensor:
        scaled = value * (self.levels - 1)
        return (scaled - scaled.round()).abs().lt(1e-3) & (value >= 0) & (value <= 1)

    def __repr__(self) -> str:
        return f"PixelGrid(k / {self.levels - 1} for k in 0..{self.levels - 1})"


PIXEL_HINT = (
    "These likelihoods model 8-bit pixels: scale them to [0, 1] (the image data modules do) "
    "without dequantisation or binarisation (dequantize: none, binarize: none)."
)


def pixel_levels(x: Tensor) -> Tensor:
    """The integer level 0..255 of each pixel value ``k / 255``."""
    return x.mul(PIXEL_LEVELS - 1).round().long()


class PixelCategorical(Categorical):
    """A categorical over the pixel values ``k / 255`` (not over the indices k)."""

    def log_prob(self, value: Tensor) -> Tensor:
        return super().log_prob(pixel_levels(value))

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        return super().sample(torch.Size(sample_shape)).to(self.logits.dtype) / (PIXEL_LEVELS - 1)

    @property
    def mean(self) -> Tensor:
        values = torch.linspace(
            0, 1, PIXEL_LEVELS, dtype=self.probs.dtype, device=self.probs.device
        )
        return self.probs @ values


@register_likelihood("categorical")
class CategoricalLikelihood(Likelihood):
    """256-way categorical per pixel (256 logits from the decoder): any distribution over the
    8-bit levels, a probability mass on the data's own grid (van den Oord et al., 2016)."""

    num_params = PIXEL_LEVELS
    support = PixelGrid(PIXEL_LEVELS)
    support_hint = PIXEL_HINT
    discrete = True

    def distribution(self, params: Tensor) -> Distribution:
        return PixelCategorical(logits=params, validate_args=False)


def log_sigmoid_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for ``upper > lower``, without cancellation: on
    the side of 0 where both sigmoids are small (sigmoid(a) - sigmoid(b) = sigmoid(-b) -
    sigmoid(-a)), as log sigmoid(a) + log(1 - exp(log sigmoid(b) - log sigmoid(a)))."""
    flip = upper + lower > 0
    upper, lower = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_upper = F.logsigmoid(upper)
    gap = F.logsigmoid(lower) - log_upper  # < 0
    log1mexp = torch.where(
        gap > -math.log(2), torch.log(-torch.expm1(gap)), torch.log1p(-torch.exp(gap))
    )
    return log_upper + log1mexp


class DiscretizedLogisticMixture(Distribution):
    """A mixture of logistics discretised to the 256 pixel levels (Salimans et al., 2017,
    PixelCNN++): level k (value k / 255, at y = 2 k / 255 - 1 in [-1, 1]) has the mass of the
    bin y +- 1/255 under each logistic, the edge bins extended to -inf (k = 0) and +inf
    (k = 255), so the masses sum to one.

    Args:
        logits: mixture logits, ``(*shape, K)``.
        loc: component locations in [-1, 1] units, ``(*shape, K)``.
        log_scale: component log scales, ``(*shape, K)``.
    """

    arg_constraints = {}
    support = PixelGrid(PIXEL_LEVELS)
    has_rsample = False

    def __init__(self, logits: Tensor, loc: Tensor, log_scale: Tensor) -> None:
        self.logits = logits.log_softmax(-1)
        self.loc = loc
        self.log_scale = log_scale
        super().__init__(loc.shape[:-1], validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        half_bin = 1.0 / (PIXEL_LEVELS - 1)
        y = (2 * value - 1).unsqueeze(-1)
        inverse_scale = torch.exp(-self.log_scale)
        upper = (y + half_bin - self.loc) * inverse_scale
        lower = (y - half_bin - self.loc) * inverse_scale
        middle = log_sigmoid_difference(upper, lower)
        bottom, top = F.logsigmoid(upper), F.logsigmoid(-lower)
        edge = y.expand_as(upper)
        log_mass = torch.where(
            edge < -1 + half_bin, bottom, torch.where(edge > 1 - half_bin, top, middle)
        )
        return (self.logits + log_mass).logsumexp(-1)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.loc.shape
            component = Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
            uniform = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            uniform = uniform.clamp(1e-6, 1 - 1e-6)
            logistic = self.loc + self.log_scale.exp() * (uniform.log() - (-uniform).log1p())
            y = logistic.gather(-1, component).squeeze(-1).clamp(-1, 1)
            return ((y + 1) / 2 * (PIXEL_LEVELS - 1)).round() / (PIXEL_LEVELS - 1)

    @property
    def mean(self) -> Tensor:
        """E[x], exactly over the 256 levels: for values k / 255, E[x] = (1/255) sum_{k=1}^{255}
        P(x >= k / 255), and P(x >= k / 255) is the mixture's mass above the bin edge between
        levels k - 1 and k. (The clipped mean location is not E[x]: at location -1.5 and log
        scale 0.5 it is 0 where E[x] = 0.29, as the edge bins hold the mass beyond [-1, 1].)"""
        edges = torch.arange(1, PIXEL_LEVELS, dtype=self.loc.dtype, device=self.loc.device)
        edges = 2 * (edges - 0.5) / (PIXEL_LEVELS - 1) - 1  # between levels k - 1 and k
        inverse_scale = torch.exp(-self.log_scale).unsqueeze(-1)
        above = torch.sigmoid((self.loc.unsqueeze(-1) - edges) * inverse_scale).sum(-1)
        return (self.logits.exp() * above).sum(-1) / (PIXEL_LEVELS - 1)


@register_likelihood("discretized_logistic")
class DiscretizedLogisticLikelihood(Likelihood):
    """Discretised logistic mixture per pixel (PixelCNN++): a mass on the 256 levels with
    ``components`` logistics, each a location and log scale from the decoder (and a mixture
    logit when there are several).

    Args:
        components: logistics per pixel (1: the discretised logistic of Kingma et al., 2016).
        min_log_scale: floor of the log scales (PixelCNN++ uses -7).
        max_log_scale: cap of the log scales (the data span [-1, 1]; e^5 is far wider), so
            that a diverging run cannot overflow them.
    """

    support = PixelGrid(PIXEL_LEVELS)
    support_hint = PIXEL_HINT
    discrete = True

    def __init__(
        self, components: int = 1, min_log_scale: float = -7.0, max_log_scale: float = 5.0
    ) -> None:
        super().__init__()
        if not min_log_scale < max_log_scale:
            raise ConfigError(
                "discretized_logistic likelihood: min_log_scale must be below max_log_scale; "
                f"got {min_log_scale} and {max_log_scale}"
            )
        if components < 1:
            raise ConfigError(
                f"discretized_logistic likelihood: components must be positive, got {components}"
            )
        self.components = components
        self.min_log_scale = min_log_scale
        self.max_log_scale = max_log_scale
        self.num_params = 3 * components if components > 1 else 2

    def distribution(self, params: Tensor) -> Distribution:
        k = self.components
        if k == 1:
            loc, log_scale = params.unsqueeze(-1).unbind(-2)
            logits = torch.zeros_like(loc)
        else:
            logits, loc, log_scale = params.unflatten(-1, (3, k)).unbind(-2)
        return DiscretizedLogisticMixture(
            logits, loc, log_scale.clamp(self.min_log_scale, self.max_log_scale)
        )


# The families of other kinds of data, in modules of their own (imported last: they build on the
# base above), registered on import and exported here beside the pixel and continuous ones.
from vaeflow.likelihoods.bounded import BetaLikelihood  # noqa: E402, F401
from vaeflow.likelihoods.counts import (  # noqa: E402, F401
    NegativeBinomialLikelihood,
    PoissonLikelihood,
    ZeroInflatedNegativeBinomial,
    ZeroInflatedNegativeBinomialLikelihood,
)
