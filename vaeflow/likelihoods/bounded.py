"""Families for data strictly inside (0, 1): proportions, rates, fractions of a whole."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Beta, Distribution, constraints

from vaeflow.likelihoods import Likelihood, bounded_scale, check_scale_range
from vaeflow.registry import register_likelihood


class OpenUnitInterval(constraints.Constraint):
    """Values strictly between 0 and 1 (torch's constraints have closed and half-open
    intervals only)."""

    def check(self, value: Tensor) -> Tensor:
        return (value > 0) & (value < 1)

    def __repr__(self) -> str:
        return "OpenInterval(0, 1)"


class OpenUnitBeta(Beta):
    """torch's Beta whose samples stay inside (0, 1) in their dtype: with a small concentration
    a draw within 2^-24 of 1 rounds to exactly 1 in float32, where the density is 0 or infinite.
    Samples are clamped to [tiny, 1 - eps / 2], the extreme representable values inside."""

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        draws = super().sample(torch.Size(sample_shape))
        info = torch.finfo(draws.dtype)
        return draws.clamp(info.tiny, 1 - info.eps / 2)


@register_likelihood("beta")
class BetaLikelihood(Likelihood):
    """Beta per element, mean and precision from the decoder: data strictly inside (0, 1).

    The mean-precision form of beta regression (Ferrari & Cribari-Neto, 2004): mean mu =
    sigmoid of the decoder's first parameter, precision phi from its second, alpha = mu phi,
    beta = (1 - mu) phi, variance mu (1 - mu) / (1 + phi).

    Args:
        precision_range: (floor, cap) of phi: the floor keeps the density finite, the cap keeps
            a diverging run from overflowing it.
    """

    num_params = 2
    support = OpenUnitInterval()
    fill_value = 0.5
    support_hint = (
        "The beta likelihood needs data strictly inside (0, 1): squeeze data that touch 0 or 1, "
        "e.g. (x (n - 1) + 1/2) / n for n examples (Smithson & Verkuilen, 2006), or use "
        "likelihood: continuous_bernoulli for data in [0, 1]."
    )

    def __init__(self, precision_range: tuple[float, float] = (1e-2, 1e6)) -> None:
        super().__init__()
        check_scale_range("beta likelihood precision_range", *precision_range)
        self.precision_range = tuple(precision_range)

    def distribution(self, params: Tensor) -> Distribution:
        logit, raw_precision = params.unbind(-1)
        precision = bounded_scale(raw_precision, *self.precision_range)
        # sigmoid(-l) rather than 1 - sigmoid(l), which is 0 in float32 for l > 17
        alpha, beta = torch.sigmoid(logit) * precision, torch.sigmoid(-logit) * precision
        return OpenUnitBeta(alpha, beta, validate_args=False)
