"""A user's own array file (``.npy``, ``.npz``, ``.pt`` or ``.csv``) as an in-memory data module."""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from vaeflow.data.base import InMemoryDataModule, Split, check_fraction
from vaeflow.data.preprocess import Array
from vaeflow.data.stream import too_large_for_memory
from vaeflow.errors import DataError


def _pick(arrays: Mapping[str, Any], key: str | None, path: Path) -> Any:
    """The array named ``key`` in a file that holds several; the only one needs no key."""
    if key is None and len(arrays) == 1:
        return next(iter(arrays.values()))
    names = ", ".join(sorted(arrays)) or "none"
    if key is None:
        raise DataError(f"{path} holds several arrays ({names}): choose one with `key`")
    if key not in arrays:
        raise DataError(f"{path} has no array {key!r}; its keys are: {names}")
    return arrays[key]


def _read_npy(path: Path, key: str | None) -> Array:
    # Memory-mapped: the shape costs a header read; the values are read when the data load.
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_npz(path: Path, key: str | None) -> Array:
    with np.load(path, allow_pickle=False) as arrays:
        return _pick(arrays, key, path)


def _read_pt(path: Path, key: str | None) -> Array:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DataError(
            f"{path} holds objects other than tensors, which are not loaded for safety: save a "
            f"tensor or a dict of tensors ({error})"
        ) from error
    if isinstance(content, Mapping):
        odd = [name for name in content if not isinstance(name, str)]
        if odd:
            raise DataError(
                f"{path} holds a dict whose keys are not all names (e.g. {odd[0]!r}, a "
                f"{type(odd[0]).__name__}): save it with string keys, {{'x': tensor}}, and "
                "choose one with `key`"
            )
        content = _pick(content, key, path)
    if not isinstance(content, Tensor):
        raise DataError(f"{path} holds a {type(content).__name__}; expected a tensor")
    if content.is_quantized:
        raise DataError(
            f"{path} holds a quantised tensor ({content.dtype}): save tensor.dequantize() "
            "instead, which vaeflow reads as float32"
        )
    if content.layout != torch.strided:  # sparse: the data modules slice dense rows
        raise DataError(
            f"{path} holds a {content.layout} tensor; vaeflow needs a dense one: save "
            "tensor.to_dense() instead (or a .npy file)"
        )
    return content


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def csv_header(path: Path) -> list[str] | None:
    """The column names of a CSV file whose first line names them, or None when the first line
    is a row of numbers (empty cells, missing values, allowed). A header is a line of names
    only: a line mixing names and numbers, or names with an empty field, is refused rather than
    guessed at (a data row taken for a header would be lost without a word). A UTF-8 byte-order
    mark is not part of the first name."""
    with path.open(encoding="utf-8-sig") as file:
        first = file.readline().rstrip("\r\n")
    fields = [field.strip() for field in first.split(",")]
    numbers = [_is_number(field) for field in fields if field]
    if not first.strip() or (numbers and all(numbers)):  # an empty file: the reader says so
        return None
    if not any(numbers) and all(fields):
        return fields
    raise DataError(
        f"the first line of {path} is neither a row of numbers nor a header of column names: "
        f"{first[:200]!r}; fill empty cells (or drop the row) and name every column"
    )


def first_empty_cell(path: Path) -> tuple[int, str] | None:
    """(line number from 1, the line) of the first line of a CSV file with an empty cell
    (``1,,3``), header excepted; None when every cell holds something."""
    skip = int(csv_header(path) is not None)
    with path.open(encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            text = line.rstrip("\r\n")
            if number > skip and text.strip() and not all(f.strip() for f in text.split(",")):
                return number, text
    return None


def _number_or_nan(field: str) -> float:
    """A CSV cell's number; an empty cell is NaN, a missing value."""
    return float(field) if field.strip() else math.nan


def _read_csv(path: Path, key: str | None) -> Array:
    """The numbers of a CSV file; empty cells are NaN (missing values), which only a model
    that takes them accepts (:meth:`ArrayDataModule.load`)."""
    header = csv_header(path)
    options: dict[str, Any] = {
        "delimiter": ",",
        "skiprows": int(header is not None),
        "ndmin": 2,
        "encoding": "utf-8-sig",
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")  # "is empty" below
        try:
            return np.loadtxt(path, **options)
        except ValueError:
            if first_empty_cell(path) is None:
                raise
            # per-cell Python only for files with empty cells
            return np.loadtxt(path, converters=_number_or_nan, **options)


def why_not_a_file(path: Path) -> str:
    """The message for a data ``path`` that is no readable file: what it is instead."""
    where = path.absolute()
    if path.is_dir():
        return f"data path {where} is a folder: give the path of a .npy, .npz, .pt or .csv file"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python's word for a loop of links
            return f"data path {where} is a link that leads back to itself (a loop of links)"
        except OSError:
            return f"data path {where} is a link to {os.readlink(path)}, which does not exist"
    return f"data file not found: {where}"


#: File extension -> reader of the file's array.
READERS: dict[str, Callable[[Path, str | None], Array]] = {
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".pt": _read_pt,
    ".csv": _read_csv,
}


def read_array(path: Path, key: str | None = None) -> Array:
    """Read and check one array of examples, one per row: shape ``(N, ...)``, numeric (the data
    module checks that the values are finite as it copies them).

    Args:
        path: the file; its extension picks the reader.
        key: which array of a ``.npz`` file or of a ``.pt`` file's dict (ignored by the formats
            that hold one array).

    Raises:
        DataError: the file is missing, unreadable, or not a non-empty numeric (N, ...) array.
    """
    if not path.is_file():
        raise DataError(why_not_a_file(path))
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(READERS)}"
        )
    try:
        array = reader(path, key)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
        raise DataError(
            f"{path} could not be read as {path.suffix} numeric data: {error}"
        ) from error
    dtype = str(array.dtype)
    if isinstance(array, np.ndarray) and array.dtype.kind not in "biuf":
        raise DataError(f"{path} must hold numbers, got dtype {dtype}")
    if isinstance(array, Tensor) and array.is_complex():
        raise DataError(f"{path} must hold real numbers, got dtype {dtype}")
    if array.ndim < 2:
        raise DataError(
            f"{path} holds an array of shape {tuple(array.shape)}; expected (N, ...) with one "
            "example per row, e.g. (N, D) for vectors: reshape it to (N, 1) if each example is "
            "one number"
        )
    if 0 in array.shape:
        raise DataError(f"{path} is empty: its array has shape {tuple(array.shape)}")
    return array


class ArrayDataModule(InMemoryDataModule):
    """Data from a file of the user's: ``.npy``, ``.npz``, ``.pt`` (a tensor or a dict of
    tensors) or ``.csv`` (numbers, comma-separated, an optional header row).

    Rows are examples. ``uint8`` data are taken as pixels in 0..255 and scaled to [0, 1]; other
    data stay in their own units unless ``scale`` is set. Every row is used for training unless
    ``val_fraction`` or ``test_fraction`` hold some out; ``indices`` says which rows went where.

    Args:
        path: the training data.
        key: the array to use when the file holds several (``.npz``, or a ``.pt`` dict).
        test_path: optional file of test data, with the same shape per example (nothing is then
            carved from ``path``).
        test_fraction: fraction of ``path``'s rows held out as the test split (with a fixed
            seed), for ``vaeflow test``; 0 keeps them all for training and validation.
        scale: map the data to [0, 1] (uint8 by the pixel range, other data by their minimum and
            maximum); by default only uint8 data are scaled.
        stream: read every batch from the memory-mapped ``.npy`` file instead of copying the
            data into memory, for files larger than memory: resident memory stays at a few
            batches. Values are then taken as stored (uint8 pixels scaled by their range), and
            NaN or infinities are found batch by batch. None (the default) streams ``.npy``
            files larger than a quarter of the machine's memory.
        **kwargs: the options of :class:`~vaeflow.data.base.InMemoryDataModule`.
    """

    def __init__(
        self,
        path: str,
        key: str | None = None,
        test_path: str | None = None,
        test_fraction: float = 0.0,
        scale: bool | None = None,
        stream: bool | None = None,
        **kwargs: Any,
    ) -> None:
        check_fraction("test_fraction", test_fraction)
        if test_path is not None and test_fraction > 0:
            raise DataError(
                f"test_fraction={test_fraction} and test_path={test_path} both ask for a test "
                "split: keep test_path (the test data) or test_fraction (carved from path)"
            )
        self.path = Path(path).expanduser()
        self.key = key
        self.test_path = None if test_path is None else Path(test_path).expanduser()
        self._raw: dict[Path, Array] = {}
        files = [self.path] if self.test_path is None else [self.path, self.test_path]
        pixels = all(str(self._array(file).dtype).endswith("uint8") for file in files)
        super().__init__(scale=pixels if scale is None else scale, **kwargs)
        self.test_fraction = test_fraction
        self.value_range = (0, 255) if pixels else None
        mapped = [isinstance(self._array(file), np.memmap) for file in files]
        if stream and not all(mapped):
            other = files[mapped.index(False)]
            raise DataError(
                f"stream reads batches from a memory-mapped .npy file, and {other} is not one"
                ": save the data with numpy.save (a .npy file), or set stream: false"
            )
        self.stream = all(mapped) and (
            stream if stream is not None else too_large_for_memory(self._array(self.path))
        )

    def _array(self, path: Path) -> Array:
        """The file's array, read once (memory-mapped for ``.npy``: only its header so far)."""
        if path not in self._raw:
            self._raw[path] = read_array(path, self.key)
        return self._raw[path]

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self._array(self.path).shape[1:])

    @property
    def feature_names(self) -> list[str] | None:
        """The column names of a CSV file with a header (None for other files), which factor
        analysis's tables carry."""
        return csv_header(self.path) if self.path.suffix.lower() == ".csv" else None

    @override
    def source(self, split: Split) -> str:
        return str(self.test_path if split == "test" and self.test_path else self.path)

    @override
    def missing_split_advice(self, split: Split) -> str:
        if split != "test":
            return super().missing_split_advice(split)
        return "set test_fraction (e.g. 0.2) to hold out rows of path, or give a test_path"

    @override
    def load(self) -> tuple[Array, Array | None]:
        """The arrays as read (the data module copies the rows it keeps); the cache lets go."""
        train = self._array(self.path)
        test = None if self.test_path is None else self._array(self.test_path)
        self._raw.clear()
        for path, array in ((self.path, train), (self.test_path, test)):
            self._refuse_empty_cells(path, array)
        if test is not None and test.shape[1:] != train.shape[1:]:
            raise DataError(
                f"test_path {self.test_path} holds examples of shape {tuple(test.shape[1:])}, "
                f"but path {self.path} holds examples of shape {tuple(train.shape[1:])}"
            )
        return train, test

    def _refuse_empty_cells(self, path: Path | None, array: Array | None) -> None:
        """An empty CSV cell is a missing value (NaN) only to a model that takes them
        (FactorAnalysis's ``missing``); otherwise the file is refused where the first one is."""
        model = self.model
        if path is None or path.suffix.lower() != ".csv" or not np.isnan(array).any():
            return
        if getattr(model, "missing_values", None) is not None:
            return
        found = first_empty_cell(path)
        if found is None:  # NaN written as such: the data module's message about NaN
            return
        number, line = found
        where = (
            f"the first line of {path} is neither a row of numbers nor a header of column names"
            if number == 1
            else f"line {number} of {path} has an empty cell"
        )
        raise DataError(
            f"{where}: {line[:200]!r}; an empty cell is a missing value only to a model that "
            f"takes them: fill it (or drop the row){getattr(model, 'missing_values_advice', '')}"
        )
