"""Small helpers shared by modules that have nothing else in common."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def as_list(value: T | list[T] | None) -> list[T]:
    """``value`` as a list: Lightning and jsonargparse give one object, a list of them, or
    ``None`` for none (optimisers, schedulers, callbacks)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def at_least_float32(outputs: Tensor) -> Tensor:
    """A network's outputs in float32 when autocast made them bfloat16 or float16: the
    likelihood, KL, log q(z|x) and the log-sum-exp of importance weights are then float32 (CPU
    autocast keeps element-wise ops and sums over 784 pixels in bfloat16, whose 8-bit mantissa
    rounds a KL of 30 nats to 0.125 nats). The networks' matrix products stay in low precision."""
    return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
