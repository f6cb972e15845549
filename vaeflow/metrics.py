"""Epoch means of per-batch metrics, accumulated on the device.

``self.log`` on every step costs more than a whole training step of a small model on the CPU
(and a ``torchmetrics.MeanMetric`` per metric still costs a few percent), so the models add
size-weighted batch means to running sums here and log once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class EpochMeans:
    """Size-weighted running means: no host synchronisation until :meth:`compute`."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Add one batch's means (``metrics``) over ``batch_size`` examples."""
        for name, value in metrics.items():
            value = value.detach() * batch_size
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += batch_size

    def compute(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The means over the epoch, and a reset. ``reduce_sum`` sums a tensor over processes
        (one collective for every metric and the count, so the means are exact under DDP)."""
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = torch.stack([*self.sums.values(), self.sums[names[0]].new_tensor(self.count)])
        totals = reduce_sum(totals)
        self.sums, self.count = {}, 0
        return dict(zip(names, totals[:-1] / totals[-1], strict=True))
