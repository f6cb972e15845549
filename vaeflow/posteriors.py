"""Variational families q(z | x): turn the encoder's outputs into a distribution over z.

A family is a small ``nn.Module`` registered by name, as likelihoods and priors are. It is bound
to the model's latent size (:class:`PosteriorContext`), then declares how many numbers the
encoder must output per example (:attr:`Posterior.num_outputs`, so no model writes
``2 * latent_dim``), and builds a ``torch.distributions.Distribution`` with ``rsample`` and
``log_prob`` from them. Its own learned weights (an IAF's autoregressive networks) are ordinary
module parameters, which the VAE counts as the encoder's (they belong to the E-step).

Building is two steps, :meth:`Posterior.split` (encoder outputs -> named tensors, the module's
weights included) and :meth:`Posterior.distribution` (named tensors -> distribution), so that a
copy with every parameter detached (``forward(outputs, detach=True)``) is generic: the doubly
reparameterised IWAE gradient (DReG) needs log q(z | x) as a function of z alone.

Flows (``planar``, ``iaf``) are :class:`FlowDistribution`, a ``TransformedDistribution`` over a
diagonal Gaussian: log q of its own samples reuses the cached inputs of each step (exact, no
inversion); log q of other points (a VampPrior's mixture, DReG's detached copy) inverts each
step. They have no closed-form mean: ``mean`` is that of :data:`MEAN_SAMPLES` samples.

Register new families with ``@register_posterior("name")`` or the entry-point group
``vaeflow.posteriors``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    MultivariateNormal,
    Transform,
    TransformedDistribution,
    constraints,
    register_kl,
)

from vaeflow.errors import ConfigError
from vaeflow.likelihoods import bounded_scale
from vaeflow.priors import DiagonalNormal, StandardDiagonalNormal
from vaeflow.registry import register_posterior
from vaeflow.utils import at_least_float32

#: samples whose mean is a flow's ``mean`` (it has no closed form): its standard error is the
#: posterior's standard deviation / 16 (:class:`FlowDistribution`).
MEAN_SAMPLES = 256
#: halvings of the bracket when a planar step is inverted: 2^-64 of its width is below float64's
#: resolution.
BISECTION_STEPS = 64


@dataclass(frozen=True)
class PosteriorContext:
    """What a posterior may depend on in the model it belongs to.

    Args:
        latent_dim: dimension of z.
        scale_range: (floor, cap) of every standard deviation the family derives from the
            encoder (the VAE's ``posterior_scale_range``).
    """

    latent_dim: int
    scale_range: tuple[float, float] = (1e-6, 1e3)


class Posterior(nn.Module):
    """Base class: encoder outputs ``(*batch, num_outputs)`` -> q(z | x), event shape
    ``(latent_dim,)``.

    Subclasses implement :attr:`num_outputs`, :meth:`split` and :meth:`distribution`; a family
    whose q factorises over the latent dimensions sets ``factorises`` and :meth:`marginals`.

    Contract: keep each constructor argument as an attribute of the same name, as likelihoods
    and priors do (checkpoints rebuild the family from those attributes, :mod:`vaeflow.hparams`).
    """

    #: True when q(z | x) is a product over the latent dimensions: per-dimension KLs (free bits)
    #: need it.
    factorises: bool = False
    #: samples whose mean is the family's E[z | x] (its ``mean``); 0 for a closed form.
    mean_samples: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 0
        self.scale_range: tuple[float, float] = PosteriorContext(0).scale_range

    def bind(self, context: PosteriorContext) -> None:
        """Fix the model's context; called once by the model (creates learned parameters)."""
        self.latent_dim = context.latent_dim
        self.scale_range = tuple(context.scale_range)

    @property
    def num_outputs(self) -> int:
        """How many numbers the encoder outputs per example."""
        raise NotImplementedError

    def split(self, outputs: Tensor) -> dict[str, Tensor]:
        """Every tensor the distribution depends on: the encoder's outputs, cut and constrained,
        and the family's own weights."""
        raise NotImplementedError

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        """q(z | x) from the tensors of :meth:`split`."""
        raise NotImplementedError

    def forward(self, outputs: Tensor, detach: bool = False) -> Distribution:
        """q(z | x) from encoder outputs; ``detach`` cuts every tensor it depends on from the
        graph (the encoder's and the family's parameters), leaving a function of z alone."""
        params = self.split(at_least_float32(outputs))
        if detach:
            params = {name: value.detach() for name, value in params.items()}
        return self.distribution(params)

    def marginals(self, posterior: Distribution) -> Distribution | None:
        """The per-dimension distributions of ``posterior`` (batch shape ``(*batch,
        latent_dim)``) when the family factorises; None otherwise."""
        return None

    def location_and_scale(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loc, scale, the remaining outputs): the first ``2 * latent_dim`` outputs as a mean
        and a standard deviation (softplus plus the floor, capped: :func:`bounded_scale`)."""
        m = self.latent_dim
        loc, raw, rest = outputs.split([m, m, outputs.shape[-1] - 2 * m], dim=-1)
        return loc, bounded_scale(raw, *self.scale_range), rest


@register_posterior("diagonal_gaussian")
class DiagonalGaussianPosterior(Posterior):
    """Diagonal Gaussian N(mu(x), diag sigma(x)^2), the default (Kingma & Welling, 2014).

    Cost per step: O(latent_dim) per sample beyond the encoder; the KL to a standard-normal or
    learned diagonal prior is analytic.

    Args:
        scale: how the encoder's second half becomes sigma. ``softplus``: softplus plus the floor,
            capped (``posterior_scale_range``), linear for large outputs so that one step cannot
            blow sigma up; ``exp``: exp(log-variance / 2), as the IWAE paper (Burda et al., 2016)
            and most peer code, clamped to the same range (for comparison with their numbers).
    """

    factorises = True

    def __init__(self, scale: Literal["softplus", "exp"] = "softplus") -> None:
        super().__init__()
        if scale not in ("softplus", "exp"):
            raise ConfigError(f"diagonal_gaussian: scale must be softplus or exp, got {scale!r}")
        self.scale = scale

    @property
    def num_outputs(self) -> int:
        return 2 * self.latent_dim

    def split(self, outputs: Tensor) -> dict[str, Tensor]:
        # two chunks, not location_and_scale's three pieces: one view fewer in every step
        loc, raw = outputs.chunk(2, dim=-1)
        if self.scale == "softplus":
            scale = bounded_scale(raw, *self.scale_range)
        else:
            scale = (0.5 * raw).exp().clamp(*self.scale_range)
        return {"loc": loc, "scale": scale}

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        return DiagonalNormal(params["loc"], params["scale"])

    def marginals(self, posterior: Distribution) -> Distribution:
        return posterior.marginals()


@register_posterior("full_gaussian")
class FullGaussianPosterior(Posterior):
    """Full-covariance Gaussian N(mu(x), L(x) L(x)^T), its Cholesky factor from the encoder.

    The full-covariance posterior that Kingma et al. (2016) take as their linear baseline: the
    diagonal of L is a bounded softplus of the outputs, its strict lower triangle the raw
    outputs, so every output vector gives a valid covariance.

    Cost per step: latent_dim (latent_dim + 3) / 2 encoder outputs; O(latent_dim^2) per sample
    (a triangular matrix-vector product) and per log-density (a triangular solve). The KL to the
    standard-normal prior is analytic (registered below); to other priors it is Monte Carlo.
    """

    @property
    def num_outputs(self) -> int:
        return self.latent_dim * (self.latent_dim + 3) // 2

    def split(self, outputs: Tensor) -> dict[str, Tensor]:
        loc, scale, lower = self.location_and_scale(outputs)
        rows, cols = torch.tril_indices(self.latent_dim, self.latent_dim, -1, device=loc.device)
        strict = lower.new_zeros(*lower.shape[:-1], self.latent_dim, self.latent_dim)
        strict[..., rows, cols] = lower
        return {"loc": loc, "scale_tril": strict + torch.diag_embed(scale)}

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        return MultivariateNormal(
            params["loc"], scale_tril=params["scale_tril"], validate_args=False
        )


@register_kl(MultivariateNormal, StandardDiagonalNormal)
def _kl_full_gaussian_standard_normal(p: MultivariateNormal, q: StandardDiagonalNormal) -> Tensor:
    """KL(N(mu, L L^T) || N(0, I)) = (||L||_F^2 + ||mu||^2 - M) / 2 - sum_j log L_jj (the
    Gaussian KL of Kingma & Welling, 2014, appendix B, with a full covariance)."""
    tril = p.scale_tril
    trace = tril.square().sum((-2, -1))
    log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + p.loc.square().sum(-1) - p.loc.shape[-1]) - log_det


class FlowDistribution(TransformedDistribution):
    """A normalising flow over a diagonal Gaussian (``base_dist``).

    ``mean`` is the mean of :data:`MEAN_SAMPLES` samples, as a flow has no closed-form mean.
    They take common random numbers, the same base noise for every example from a generator of
    their own (seed 0): repeated calls agree, an example's code does not depend on the batch it
    comes in (``vaeflow predict`` batches), and the caller's random stream is left alone.
    """

    @property
    def mean(self) -> Tensor:
        base = self.base_dist
        loc = base.mean
        generator = torch.Generator(device=loc.device).manual_seed(0)
        shape = (MEAN_SAMPLES, *(1,) * len(self.batch_shape), *self.event_shape)
        with torch.no_grad():
            z = loc + base.stddev * torch.randn(
                shape, generator=generator, dtype=loc.dtype, device=loc.device
            )
            for transform in self.transforms:
                z = transform(z)
            return z.mean(0)


class FlowStep(Transform):
    """A bijection of the last dimension with a log-determinant per vector (base of the steps
    below): cached, so that log q of a flow's own samples needs no inversion."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self) -> None:
        super().__init__(cache_size=1)


class PlanarStep(FlowStep):
    """f(z) = z + u_hat tanh(w^T z + b), with u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 and
    m(a) = -1 + softplus(a), so that w^T u_hat > -1 and f is invertible (Rezende & Mohamed,
    2015, appendix A). Parameters have shape ``(*batch, M)`` (``b``: ``(*batch, 1)``)."""

    def __init__(self, u: Tensor, w: Tensor, b: Tensor) -> None:
        super().__init__()
        wu = (w * u).sum(-1, keepdim=True)
        #: w^T u_hat = m(w^T u) > -1
        self.wu_hat = F.softplus(wu) - 1
        self.u_hat = u + (self.wu_hat - wu) * w / w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        self.w, self.b = w, b

    def _call(self, x: Tensor) -> Tensor:
        return x + self.u_hat * torch.tanh((self.w * x).sum(-1, keepdim=True) + self.b)

    def _inverse(self, y: Tensor) -> Tensor:
        """Along w the step is scalar: a = w^T z solves a + c tanh(a + b) = w^T y, c = w^T u_hat,
        increasing in a, with its root within |c| of w^T y. Bisection finds it without a graph;
        one Newton step from it carries the gradients (the implicit function theorem)."""
        target = (self.w * y).sum(-1, keepdim=True)
        c, b = self.wu_hat, self.b
        with torch.no_grad():
            low, high = torch.broadcast_tensors(target - c.abs(), target + c.abs())
            for _ in range(BISECTION_STEPS):
                mid = (low + high) / 2
                above = mid + c * torch.tanh(mid + b) > target
                low, high = torch.where(above, low, mid), torch.where(above, mid, high)
            root = (low + high) / 2
        gate = torch.tanh(root + b)
        root = root - (root + c * gate - target) / (1 + c * (1 - gate.square()))
        return y - self.u_hat * torch.tanh(root + b)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log |1 + u_hat^T w tanh'(w^T z + b)|, positive inside since w^T u_hat > -1."""
        gate = torch.tanh((self.w * x).sum(-1, keepdim=True) + self.b)
        return torch.log1p(self.wu_hat * (1 - gate.square())).squeeze(-1)


@register_posterior("planar")
class PlanarFlowPosterior(Posterior):
    """Amortised planar flow (Rezende & Mohamed, 2015), its parameters from the encoder.

    A diagonal Gaussian pushed through ``num_flows`` planar steps z + u tanh(w^T z + b), u, w
    and b per example from the encoder (as van den Berg et al., 2018, amortise them), with the
    invertibility constraint w^T u >= -1 enforced by :class:`PlanarStep`.

    torch.distributions has no planar transform and zuko's flows take their parameters from
    their own networks, not from an encoder per example: hence this small one.

    Cost per step: 2 latent_dim + num_flows (2 latent_dim + 1) encoder outputs; O(num_flows
    latent_dim) per sample and per log-density of its own samples. The log-density of other
    points (a VampPrior, DReG) inverts each step by a bisection of :data:`BISECTION_STEPS`
    halvings, about 60x that. KLs are Monte Carlo.

    Args:
        num_flows: planar steps K.
    """

    mean_samples = MEAN_SAMPLES

    def __init__(self, num_flows: int = 4) -> None:
        super().__init__()
        if num_flows < 1:
            raise ConfigError(f"planar posterior: num_flows must be positive, got {num_flows}")
        self.num_flows = num_flows

    @property
    def num_outputs(self) -> int:
        return 2 * self.latent_dim + self.num_flows * (2 * self.latent_dim + 1)

    def split(self, outputs: Tensor) -> dict[str, Tensor]:
        loc, scale, rest = self.location_and_scale(outputs)
        m = self.latent_dim
        u, w, b = rest.unflatten(-1, (self.num_flows, 2 * m + 1)).split([m, m, 1], dim=-1)
        return {"loc": loc, "scale": scale, "u": u, "w": w, "b": b}

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        steps = [
            PlanarStep(*(params[name].select(-2, k) for name in "uwb"))
            for k in range(self.num_flows)
        ]
        base = DiagonalNormal(params["loc"], params["scale"])
        return FlowDistribution(base, steps, validate_args=False)


class IAFStep(FlowStep):
    """One inverse autoregressive step (Kingma et al., 2016, algorithm 2): [m, s] = MADE(z, h),
    sigma = sigmoid(s), f(z) = sigma * z + (1 - sigma) * m, log|det| = sum log sigma.

    Args:
        layers: the MADE's (masked weight, bias) pairs, the last one mapping to [m, s].
        context_shift: the context h's contribution to the first hidden layer, ``(*batch, H)``.
    """

    def __init__(self, layers: list[tuple[Tensor, Tensor]], context_shift: Tensor) -> None:
        super().__init__()
        self.layers = layers
        self.context_shift = context_shift
        self._last: tuple[Tensor, Tensor] | None = None  # (z, sum log sigma) of the last pass

    def gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(m, s) at ``x``; each output j depends on the inputs before j only."""
        (weight, bias), *rest = self.layers
        hidden = F.elu(F.linear(x, weight, bias) + self.context_shift)
        for weight, bias in rest[:-1]:
            hidden = F.elu(F.linear(hidden, weight, bias))
        m, s = at_least_float32(F.linear(hidden, *rest[-1])).chunk(2, dim=-1)
        return m, s

    def _call(self, x: Tensor) -> Tensor:
        m, s = self.gate(x)
        self._last = (x, F.logsigmoid(s).sum(-1))
        sigma = torch.sigmoid(s)
        return sigma * x + (1 - sigma) * m

    def _inverse(self, y: Tensor) -> Tensor:
        """M fixed-point passes x <- (y - (1 - sigma(x)) m(x)) / sigma(x): after pass j the
        first j coordinates (in the step's order) are exact, so after M all are."""
        x = y
        for _ in range(y.shape[-1]):
            m, s = self.gate(x)
            sigma = torch.sigmoid(s)
            x = (y - (1 - sigma) * m) / sigma
        self._last = (x, F.logsigmoid(s).sum(-1))
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        return F.logsigmoid(self.gate(x)[1]).sum(-1)


def made_masks(degrees: Tensor, hidden: Sequence[int]) -> list[Tensor]:
    """MADE's masks (Germain et al., 2015) for inputs of the given degrees (1..M), and two
    outputs per input (m and s): output j sees only inputs of lower degree."""
    m = len(degrees)
    levels = [degrees]
    for width in hidden:
        levels.append(torch.arange(width) % max(1, m - 1) + 1)
    masks = [(out[:, None] >= inp[None, :]).float() for inp, out in itertools.pairwise(levels)]
    outputs = degrees.repeat(2)
    masks.append((outputs[:, None] > levels[-1][None, :]).float())
    return masks


@register_posterior("iaf")
class IAFPosterior(Posterior):
    """Inverse autoregressive flow (Kingma et al., 2016), MADE steps fed by an encoder context.

    A diagonal Gaussian and a context vector h from the encoder, then ``num_flows`` steps of
    the numerically stable gated update z <- sigma * z + (1 - sigma) * m, [m, s] = MADE(z, h),
    sigma = sigmoid(s), with the order of the latent dimensions reversed between steps.

    Written here, not taken from zuko: zuko's autoregressive transforms apply the affine update
    z exp(s) + m, not the gated one, and take no per-example context added to their first
    hidden layer as the paper's MADE does; pyro is not a dependency.

    Cost per step: 2 latent_dim + context encoder outputs; per sample num_flows MADE passes,
    O(latent_dim hidden + hidden^2) each; log q of its own samples is free (the log-determinant
    is kept from sampling). The log-density of other points (a VampPrior, DReG) inverts each
    step with latent_dim sequential MADE passes. KLs are Monte Carlo.

    Args:
        num_flows: IAF steps T.
        hidden: widths of each MADE's hidden layers (ELU).
        context: size of the context vector h.
        gate_bias: initial bias of s, so that each step starts close to the identity
            (sigma = sigmoid(gate_bias)) and the first updates stay small.
    """

    mean_samples = MEAN_SAMPLES

    def __init__(
        self,
        num_flows: int = 2,
        hidden: Sequence[int] = (64,),
        context: int = 16,
        gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        if num_flows < 1 or not hidden or min(hidden) < 1 or context < 1:
            raise ConfigError(
                "iaf posterior: num_flows, context and every hidden width must be positive; got "
                f"num_flows={num_flows}, hidden={hidden}, context={context}"
            )
        self.num_flows = num_flows
        self.hidden = tuple(hidden)
        self.context = context
        self.gate_bias = gate_bias
        self.steps = nn.ModuleList()

    def bind(self, context: PosteriorContext) -> None:
        super().bind(context)
        m = self.latent_dim
        widths = [m, *self.hidden, 2 * m]
        for t in range(self.num_flows):
            degrees = torch.arange(1, m + 1)
            step = nn.Module()
            step.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
            step.context = nn.Linear(self.context, self.hidden[0], bias=False)
            masks = made_masks(degrees.flip(0) if t % 2 else degrees, self.hidden)
            for i, mask in enumerate(masks):
                step.register_buffer(f"mask{i}", mask, persistent=False)
            with torch.no_grad():
                step.layers[-1].weight.mul_(0.1)
                step.layers[-1].bias[m:].fill_(self.gate_bias)
            self.steps.append(step)

    @property
    def num_outputs(self) -> int:
        return 2 * self.latent_dim + self.context

    def split(self, outputs: Tensor) -> dict[str, Tensor]:
        loc, scale, context = self.location_and_scale(outputs)
        params = {"loc": loc, "scale": scale}
        for t, step in enumerate(self.steps):
            params[f"{t}.shift"] = step.context(context)
            for i, layer in enumerate(step.layers):
                params[f"{t}.weight{i}"] = layer.weight * getattr(step, f"mask{i}")
                params[f"{t}.bias{i}"] = layer.bias
        return params

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        steps = []
        for t in range(self.num_flows):
            layers = [
                (params[f"{t}.weight{i}"], params[f"{t}.bias{i}"])
                for i in range(len(self.hidden) + 1)
            ]
            steps.append(IAFStep(layers, params[f"{t}.shift"]))
        base = DiagonalNormal(params["loc"], params["scale"])
        return FlowDistribution(base, steps, validate_args=False)


def check_posterior_factorises(posterior: Posterior, setting: str) -> None:
    """Refuse a per-dimension setting (free bits) for a family that does not factorise."""
    if not posterior.factorises:
        raise ConfigError(
            f"{setting} needs a posterior that factorises over the latent dimensions "
            f"(diagonal_gaussian); {type(posterior).__name__} does not, so its KL does not "
            "split into per-dimension terms. Use posterior: diagonal_gaussian or free_bits: 0"
        )
