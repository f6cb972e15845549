"""Rows of a ``.npy`` file read from disk batch by batch: data larger than memory.

A split of a streamed file is a :class:`MappedRows`: the row numbers of its examples and the
file's layout, nothing else. Each batch maps only the span of the file its rows lie in, copies
them out and unmaps the span again. The pages read stay in the kernel's page cache, which the
kernel reclaims, but not in the process's resident memory: a map held open for a whole pass
would count every page read so far as resident (RssFile) until memory runs short.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vaeflow.data.preprocess import check_mapped_file

#: What a streamed batch goes through after it is read: ``(batch, its row numbers in the
#: file) -> batch`` (the checks and value transformations the in-memory splits get once).
Prepare = Callable[[Tensor, Tensor], Tensor]


def physical_memory() -> int:
    """Bytes of memory of this machine (Linux and macOS; 0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def too_large_for_memory(array: np.memmap) -> bool:
    """Whether a memory-mapped array is better streamed: it takes more than a quarter of
    the machine's memory (a split's copy, its preprocessing and the model's temporaries would
    otherwise need several times the file)."""
    return array.nbytes > physical_memory() / 4


class MappedRows:
    """One split of a memory-mapped ``.npy`` file, read batch by batch.

    It answers what the loaders and models ask of a split tensor: ``len``, ``shape``,
    ``dtype`` and ``split[rows]`` for a slice or an index tensor of positions in the split.

    Args:
        array: the file's array, memory-mapped (only its layout is kept).
        rows: the file's row numbers of this split's examples, sorted.
        dtype: the dtype batches are returned in.
        prepare: what each batch goes through after it is read.
    """

    def __init__(
        self, array: np.memmap, rows: Tensor, dtype: torch.dtype, prepare: Prepare
    ) -> None:
        self.filename = str(array.filename)
        self.offset = array.offset
        self.file_dtype = array.dtype
        self.row_shape = tuple(array.shape[1:])
        self.file_rows = len(array)
        self.rows = rows.numpy()
        self.dtype = dtype
        self.prepare = prepare
        self._check = array  # for check_mapped_file: its filename, offset and size

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        """``(examples, *shape of one example as stored)``."""
        return torch.Size((len(self), *self.row_shape))

    def __getitem__(self, key: slice | Tensor | int) -> Tensor:
        """The examples at positions ``key`` of the split, read from the file."""
        rows = self.rows[key.numpy() if isinstance(key, Tensor) else key]
        if np.ndim(rows) == 0:  # one example
            return self[slice(int(key), int(key) + 1)][0]
        return self.prepare(self.read(rows), torch.from_numpy(rows))

    def read(self, rows: np.ndarray) -> Tensor:
        """The file's ``rows`` (in that order), mapping only the span they lie in."""
        target = torch.empty(0, dtype=self.dtype).numpy().dtype
        if len(rows) == 0:
            return torch.from_numpy(np.empty((0, *self.row_shape), dtype=target))
        check_mapped_file(self._check)
        low, high = int(rows.min()), int(rows.max()) + 1
        span = np.memmap(
            self.filename,
            dtype=self.file_dtype,
            mode="r",
            offset=self.offset + low * math.prod(self.row_shape) * self.file_dtype.itemsize,
            shape=(high - low, *self.row_shape),
        )
        contiguous = high - low == len(rows) and bool(np.all(np.diff(rows) == 1))
        values = (
            np.array(span, dtype=target) if contiguous else np.asarray(span[rows - low], target)
        )
        del span  # unmapped: its pages leave the process's resident memory
        return torch.from_numpy(values)
