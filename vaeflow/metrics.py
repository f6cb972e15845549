"""Epoch means of per-batch metrics, accumulated on the device.

``self.log`` on every step costs more than a whole training step of a small model on the CPU
(and a ``torchmetrics.MeanMetric`` per metric still costs a few percent), so the models add
size-weighted batch means to running sums here and log once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class EpochMeans:
    """Size-weighted running means: no host synchronisation until :meth:`compute`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.total: Tensor | None = None
        self.count = 0

    def update(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Add one batch's means (``metrics``, the same names every batch) over ``batch_size``
        examples: two tensor operations whatever the number of metrics."""
        # No autograd node; float64 whatever autocast made the metrics, so that neither the sums
        # over an epoch nor the example count (exact in bfloat16 only up to 256) lose digits.
        values = torch.stack([value.detach().double() for value in metrics.values()])
        if self.total is None:
            self.names, self.total = list(metrics), values * batch_size
        else:
            self.total = self.total.add(values, alpha=batch_size)
        self.count += batch_size

    def state_dict(self) -> dict[str, Any]:
        """The running sums, for a checkpoint written mid-epoch: a resumed run's epoch means are
        then those of the whole epoch."""
        return {"names": list(self.names), "total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names, self.total, self.count = list(state["names"]), state["total"], state["count"]

    def compute(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The means over the epoch, and a reset. ``reduce_sum`` sums a tensor over processes
        (one collective for every metric and the count, so the means are exact under DDP)."""
        if self.total is None:
            return {}
        totals = reduce_sum(torch.cat([self.total, self.total.new_tensor([self.count])]))
        means = dict(zip(self.names, totals[:-1] / totals[-1], strict=True))
        self.names, self.total, self.count = [], None, 0
        return means

    def running(self) -> dict[str, float]:
        """The means so far in this process (one host synchronisation): what the progress bar
        shows while an epoch runs."""
        if self.total is None:
            return {}
        return dict(zip(self.names, (self.total / self.count).tolist(), strict=True))


def em_progress(iteration: int, history: list[dict[str, float]]) -> dict[str, float]:
    """What the progress bar shows of an EM fit: the iteration and the objective it reached
    (the exact log-likelihood, or the ELBO of a variational fit), in nats per example."""
    if not history:
        return {}
    row = history[-1]
    name = "log_likelihood" if "train/log_likelihood" in row else "elbo"
    return {"EM iteration": iteration, name: row[f"train/{name}"]}


def bits_per_dim(log_likelihood: Tensor | float, dims: int, log_scale: float = 0.0) -> Tensor:
    """Bits per dimension of the data on their original grid, from a log-likelihood in nats per
    example in the model's units.

    A data module that divides the data by a factor L per dimension (pixels in 0..255 scaled to
    [0, 1] from L = 256 levels) reports ``log_scale = log L``; a log-density in the model's units
    is then ``D log L`` nats above the one on the original integer grid, so
    ``bpd = (-log p(x) + D log L) / (D ln 2)``. Binary data and data left in their own units have
    ``log_scale = 0`` (DESIGN.md, conventions).

    Args:
        log_likelihood: log p(x) (or a bound on it) in nats per example.
        dims: D, the number of values of one example.
        log_scale: log of the factor the data module divided each value by.
    """
    value = torch.as_tensor(log_likelihood)
    return (dims * log_scale - value) / (dims * math.log(2))
