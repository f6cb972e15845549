"""Small helpers shared by modules that have nothing else in common."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from vaeflow.errors import ConfigError

T = TypeVar("T")


def as_list(value: T | list[T] | None) -> list[T]:
    """``value`` as a list: Lightning and jsonargparse give one object, a list of them, or
    ``None`` for none (optimisers, schedulers, callbacks)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    cause: BaseException | None = error
    while cause is not None:
        yield cause
        cause = cause.__cause__ or cause.__context__


def at_least_float32(outputs: Tensor) -> Tensor:
    """A network's outputs in float32 when autocast made them bfloat16 or float16: the
    likelihood, KL, log q(z|x) and the log-sum-exp of importance weights are then float32 (CPU
    autocast keeps element-wise ops and sums over 784 pixels in bfloat16, whose 8-bit mantissa
    rounds a KL of 30 nats to 0.125 nats). The networks' matrix products stay in low precision."""
    return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs


def memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse up front what needs more memory than there is: the kernel would grant it (memory
    is overcommitted) and then kill the process without a word when it is touched.

    Raises:
        ConfigError: ``what`` needs ``needed`` bytes, with the machine's memory and ``fix``.
    """
    available = memory_bytes()
    if needed > available:
        raise ConfigError(
            f"{what} needs about {needed / 2**30:,.1f} GiB of memory, more than the "
            f"{available / 2**30:,.1f} GiB this machine has: {fix}"
        )
