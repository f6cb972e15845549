"""What happens to the values of a data set: copying rows out, checks, scaling and noise."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vaeflow.errors import DataError

Noise = Literal["none", "static", "dynamic"]
#: Raw examples as a data module's ``load`` returns them (a NumPy array may be memory-mapped).
Array = np.ndarray | Tensor


def uniform(like: Tensor, rng: np.random.Generator) -> Tensor:
    """U[0, 1) noise shaped and typed like ``like``, drawn with NumPy's PCG64 (see
    :func:`~vaeflow.data.loader.random_stream`)."""
    dtype = np.float64 if like.dtype == torch.float64 else np.float32
    return torch.from_numpy(rng.random(like.shape, dtype=dtype)).to(like.dtype)


def draw_bernoulli(probabilities: Tensor, rng: np.random.Generator) -> Tensor:
    """Binary draws, 1 where uniform noise falls below the probability. The distribution of
    ``torch.bernoulli``, in a third of its time (a vectorised uniform draw and an in-place
    comparison). NaN (a missing value) stays NaN: a comparison with it is false, which would
    make it a 0 that the model takes for an observed value."""
    draws = uniform(probabilities, rng).lt_(probabilities)
    return torch.where(torch.isnan(probabilities), probabilities, draws)


class BatchNoise:
    """Per-batch noise: dequantisation then binarisation, each only where asked for.

    Args:
        dequantize_width: width of one quantisation level in the stored units (None: none).
        bernoulli: replace each value by a binary draw with it as the probability.
    """

    def __init__(self, dequantize_width: float | None, bernoulli: bool) -> None:
        self.dequantize_width = dequantize_width
        self.bernoulli = bernoulli

    def __call__(self, batch: Tensor, rng: np.random.Generator) -> Tensor:
        if self.dequantize_width is not None:
            batch = uniform(batch, rng).mul_(self.dequantize_width).add_(batch)
        if self.bernoulli:
            batch = draw_bernoulli(batch, rng)
        return batch


def storage_dtype(array: Array) -> torch.dtype:
    """The dtype a data module keeps an array in: float64 stays float64, so that the models
    that compute in float64 (factor analysis) see the user's values (an offset of 1e6 in
    float32 moved the fitted mean by 6e-4); anything else becomes the default dtype, and so do
    the levels of a known grid (pixels: a data module's ``value_range``), exact in it. A VAE
    casts what it is given to its network's dtype (:meth:`VAE.as_input`)."""
    double = torch.float64 if isinstance(array, Tensor) else np.float64
    return torch.float64 if array.dtype == double else torch.get_default_dtype()


def take(array: Array, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``array[rows]`` (every row in its order when ``rows`` is None) as a ``dtype`` tensor that
    owns its memory, with one copy at most (none when the array is in memory, of that type).

    NumPy makes the copy: its allocator asks the kernel for huge pages, which makes copying
    188 MB about five times faster than into memory that torch allocates.
    """
    target = torch.empty(0, dtype=dtype).numpy().dtype
    if isinstance(array, np.memmap):
        check_mapped_file(array)
    if isinstance(array, Tensor):
        try:
            array = array.numpy()
        except TypeError:  # a type NumPy lacks (bfloat16)
            array = array.to(dtype).numpy()
    if rows is not None:
        array = np.take(array, rows.numpy(), axis=0)
    elif isinstance(array, np.memmap):  # a view of the file: read it into memory
        array = np.array(array, dtype=target)
    return torch.from_numpy(np.asarray(array, dtype=target))


def check_mapped_file(array: np.memmap) -> None:
    """Refuse to read a memory-mapped file that has shrunk since it was opened: reading past its
    end kills the process with SIGBUS, without a message.

    Raises:
        DataError: the file is shorter than its header says.
    """
    needed = array.offset + array.nbytes
    try:
        size = os.path.getsize(array.filename)
    except OSError as error:
        raise DataError(
            f"{array.filename} was removed or moved while the run was reading it "
            f"({error.strerror}): keep the data file in place until the run has loaded it"
        ) from error
    if size < needed:
        raise DataError(
            f"{array.filename} was truncated or rewritten while the run was reading it (it has "
            f"{size} bytes, its header promises {needed}): keep the data file unchanged until "
            "the run has loaded it, then start the run again"
        )


def finite_bounds(
    parts: Sequence[tuple[str, Tensor, Tensor]],
    source: str,
    missing_values: str | None = None,
    advice: str = "",
) -> tuple[float, float]:
    """The smallest and largest value of one source's examples, and the one check that every
    split's are finite (NaN and infinities propagate through ``aminmax``: one pass, no mask;
    each split is checked on its own, as Python's ``min`` of floats drops a NaN that is not
    first).

    Args:
        parts: ``(split name, examples, their row numbers in the source)`` for each split taken
            from the source.
        source: what the message calls the source (a file name, a data set).
        missing_values: None where NaN is an error; else the model takes NaN as a missing
            value (:attr:`~vaeflow.models.FactorAnalysis.missing`), the bounds are of the other
            values, and only infinities are refused.
        advice: what the message about NaN adds (the model's options for missing values).

    Raises:
        DataError: the split and the source's first row that holds NaN or infinite values.
    """
    bounds = [
        (split, *(value.item() for value in torch.aminmax(data)))
        for split, data, _ in parts
        if data.numel()
    ]
    if all(math.isfinite(low) and math.isfinite(high) for _, low, high in bounds):
        return min(low for _, low, _ in bounds), max(high for _, _, high in bounds)
    bad_value = torch.isinf if missing_values is not None else lambda data: ~torch.isfinite(data)
    for split, data, rows in parts:
        bad = rows[bad_value(data.flatten(1)).any(1)]
        if len(bad) == 0:
            continue
        where = (
            f"{len(bad)} examples of the {split} split (the first is row {bad.min().item()} "
            "of the file)"
        )
        if missing_values is not None:
            raise DataError(
                f"{source} has infinite values in {where}; NaN marks a missing value "
                f"({missing_values}), an infinity none: replace them"
            )
        raise DataError(
            f"{source} has NaN or infinite values in {where}; drop or impute them before "
            f"training{advice}"
        )
    # NaN only, which the model takes as missing values
    values = torch.cat([data[~torch.isnan(data)] for _, data, _ in parts])
    if len(values) == 0:
        raise DataError(f"{source} has no value that is not NaN")
    return values.min().item(), values.max().item()


@dataclass(frozen=True)
class Preprocessing:
    """The value transformations that a data module's options ask for, alike for every split.

    ``low`` and ``high`` are the raw values' bounds: the known range (pixels: 0 and 255), else
    the training data's.
    """

    scale: bool
    dequantize: Noise
    binarize: Noise
    flatten: bool

    def divisor(self, low: float, high: float) -> float:
        """The factor every value is divided by: the number of levels of the integer grid when
        dequantised (each level one interval of [0, 1]), else the range; 1 when not scaled."""
        width = high - low + (1.0 if self.dequantize != "none" else 0.0)
        return width if self.scale and width > 0 else 1.0

    @property
    def rescales(self) -> bool:
        """Whether the model sees the raw values divided by a factor (binarised data are not:
        they are on their own grid, {0, 1})."""
        return self.scale and self.binarize == "none"

    def log_scale(self, low: float, high: float) -> float:
        """log of the factor the model's values are the raw ones divided by."""
        return math.log(self.divisor(low, high)) if self.rescales else 0.0

    def apply(self, data: Tensor, low: float, high: float, rng: np.random.Generator) -> Tensor:
        """Shift, scale, add the static noise and flatten one split, in place where possible."""
        divisor = self.divisor(low, high)
        if self.scale or self.dequantize != "none":
            data.sub_(low)
        if self.dequantize == "static":
            data.add_(uniform(data, rng))
        if self.scale:
            data.div_(divisor)
        if self.binarize == "static":
            data = draw_bernoulli(data, rng)
        return data.flatten(1) if self.flatten else data

    def batch_noise(self, low: float, high: float) -> BatchNoise | None:
        """The per-batch noise of the dynamic options, None when there is none."""
        width = 1.0 / self.divisor(low, high) if self.dequantize == "dynamic" else None
        if width is None and self.binarize != "dynamic":
            return None
        return BatchNoise(width, self.binarize == "dynamic")
