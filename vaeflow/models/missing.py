"""Missing values (NaN) in a VAE's data, as MIWAE treats them (Mattei & Frellsen, 2019).

NaN marks a missing value. Given z, every built-in family is a product over the data elements,
so the likelihood of an example's observed values, the missing ones marginalised out, is the sum
of the observed elements' log-probabilities
(:meth:`~vaeflow.likelihoods.Likelihood.masked_log_prob`). Every bound the VAE trains on or
reports (the ELBO, the importance-weighted bound, the log-likelihood estimate) is then one of
log p(x_obs); with the importance-weighted bound as the objective this is MIWAE. The encoder
needs a value everywhere: it sees 0 in place of each missing value, as in the paper, and with
``zeros_and_mask`` also the mask (1 where observed), as many more input features (or channels)
as the data have.

Imputations are the paper's self-normalised importance-sampling estimate of E[x_miss | x_obs]:
sum_k w_k E[x_miss | z_k], z_k ~ q(z | x_obs), w_k proportional to p(x_obs | z_k) p(z_k) /
q(z_k | x_obs), normalised over the K samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vaeflow.nets import conditioned_shape

#: What NaN in a VAE's data means: ``refuse`` (an error); else a missing value, and what the
#: encoder sees in its place: 0, or 0 and the mask.
Missing = Literal["refuse", "zeros", "zeros_and_mask"]


def encoder_input_shape(input_shape: tuple[int, ...], missing: Missing) -> tuple[int, ...]:
    """The shape of one example as the encoder takes it: twice the features (or channels) of
    the data with the mask beside them."""
    if missing == "zeros_and_mask":
        return conditioned_shape(input_shape, input_shape[0])
    return input_shape


def encoder_input(x: Tensor, missing: Missing, event_dims: int) -> Tensor:
    """``x`` (examples of ``event_dims`` dimensions) as the encoder takes it: NaN replaced by 0,
    and with ``zeros_and_mask`` the mask (1 observed, 0 missing) appended along the first event
    axis, as :func:`~vaeflow.nets.append_condition` appends a condition."""
    if missing == "refuse":
        return x
    observed = ~torch.isnan(x)
    filled = torch.where(observed, x, 0.0)
    if missing == "zeros":
        return filled
    return torch.cat([filled, observed.to(x.dtype)], dim=x.dim() - event_dims)


def observed_mask(x: Tensor) -> Tensor | None:
    """True where ``x`` holds a value; None when every value is there (the batch then takes
    the complete-data path, number for number)."""
    observed = ~torch.isnan(x)
    return None if bool(observed.all()) else observed


class SelfNormalisedMean:
    """sum_k w_k v_k with w = softmax of the log-weights over every sample k, accumulated chunk
    by chunk of samples (memory bounded for any K), rescaled by the running log-sum-exp so that
    nothing overflows."""

    def __init__(self) -> None:
        self.log_total: Tensor | None = None
        self.mean: Tensor | None = None

    def add(self, log_weights: Tensor, values: Tensor) -> None:
        """One chunk: ``log_weights`` ``(k, N)`` and ``values`` ``(k, N, ...)``."""
        chunk = log_weights.logsumexp(0)
        total = chunk if self.log_total is None else torch.logaddexp(self.log_total, chunk)
        shape = (*log_weights.shape, *(1,) * (values.dim() - log_weights.dim()))
        weights = (log_weights - total).exp().reshape(shape)
        contribution = (weights * values).sum(0)
        if self.mean is not None:
            rescale = (self.log_total - total).exp().reshape(shape[1:])
            contribution = contribution + rescale * self.mean
        self.log_total, self.mean = total, contribution
