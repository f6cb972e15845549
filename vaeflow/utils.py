"""Small helpers shared by modules that have nothing else in common."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def as_list(value: T | list[T] | None) -> list[T]:
    """``value`` as a list: Lightning and jsonargparse give one object, a list of them, or
    ``None`` for none (optimisers, schedulers, callbacks)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
