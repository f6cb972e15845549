"""A user's own array file (``.npy``, ``.npz``, ``.pt`` or ``.csv``) as an in-memory data module."""

from __future__ import annotations

import csv
import functools
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
    mark is not part of the first name, and names may be quoted (R's ``write.csv`` quotes
    them)."""
    with path.open(encoding="utf-8-sig") as file:
        first = file.readline().rstrip("\r\n")
    fields = [field.strip() for field in next(csv.reader([first]), [])]
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


def column_number(path: Path, column: str) -> int:
    """Where a CSV file's header has ``column``.

    Raises:
        DataError: the file has no header, or no column of that name (the message lists them).
    """
    header = csv_header(path)
    if header is None:
        raise DataError(
            f"condition: {column} names a column, but the first line of {path} is a row of "
            "numbers: add a header line naming the columns"
        )
    if column not in header:
        raise DataError(
            f"{path} has no column {column!r} to condition on; its columns are: {', '.join(header)}"
        )
    return header.index(column)


def read_cells(path: Path, column: str) -> np.ndarray:
    """The cells of one column of a CSV file with a header, as text (a category each).

    Raises:
        DataError: the column is missing, or one of its cells is empty.
    """
    cells = np.char.strip(
        np.loadtxt(
            path,
            dtype=str,
            delimiter=",",
            skiprows=1,
            usecols=[column_number(path, column)],
            ndmin=1,
            encoding="utf-8-sig",
        )
    )
    empty = np.flatnonzero(cells == "")
    if len(empty):
        raise DataError(
            f"{path} has an empty cell in column {column!r} (data row {empty[0] + 1}): every "
            "example needs its condition; fill it or drop the row"
        )
    return cells


def categories_of(cells: np.ndarray) -> np.ndarray:
    """The distinct cells in order: by value where all are numbers (2 before 10), else as text."""
    distinct = np.unique(cells)
    if all(_is_number(cell) for cell in distinct):
        distinct = distinct[np.argsort(distinct.astype(float), kind="stable")]
    return distinct


def encode(cells: np.ndarray, categories: np.ndarray, source: Path) -> np.ndarray:
    """Each cell's position in ``categories``.

    Raises:
        DataError: a cell is none of the categories (a test file's batch not seen in training).
    """
    order = np.argsort(categories)
    ordered = categories[order]
    found = np.searchsorted(ordered, cells).clip(max=len(ordered) - 1)
    unknown = ordered[found] != cells
    if unknown.any():
        raise DataError(
            f"{source} has the condition {str(cells[unknown][0])!r}, which the training data "
            f"do not have (they have: {', '.join(categories[:20])}): a model cannot be "
            "conditioned on a category it was not trained with"
        )
    return order[found]


def _read_csv(path: Path, key: str | None, without: str | None = None) -> Array:
    """The numbers of a CSV file, without the column ``without`` (a condition's); empty cells
    are NaN (missing values), which only a model that takes them accepts
    (:meth:`ArrayDataModule.load`)."""
    header = csv_header(path)
    options: dict[str, Any] = {
        "delimiter": ",",
        "skiprows": int(header is not None),
        "ndmin": 2,
        "encoding": "utf-8-sig",
    }
    if without is not None:
        skipped = column_number(path, without)
        options["usecols"] = [i for i in range(len(header or ())) if i != skipped]
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


def read_array(path: Path, key: str | None = None, without: str | None = None) -> Array:
    """Read and check one array of examples, one per row: shape ``(N, ...)``, numeric (the data
    module checks that the values are finite as it copies them).

    Args:
        path: the file; its extension picks the reader.
        key: which array of a ``.npz`` file or of a ``.pt`` file's dict (ignored by the formats
            that hold one array).
        without: a column of a CSV file with a header to leave out (a condition's).

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
    if without is not None:
        if reader is not _read_csv:
            raise DataError(
                f"condition: {without} names a column, and {path} has none: a column to "
                "condition on is one of a CSV file with a header (condition takes none, "
                "labels or a column's name)"
            )
        reader = functools.partial(_read_csv, without=without)
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

    In a CSV file with a header, ``condition`` may name a column (a batch, a site: numbers or
    text): its categories, in :attr:`condition_categories` order, become one-hot conditions of
    a conditional VAE, and the column is not among the features.

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
        condition: str = "none",
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
        #: The CSV column whose categories are the condition (None: the condition is none or
        #: the class labels).
        self.condition_column = None if condition in ("none", "labels") else condition
        self._raw: dict[Path, Array] = {}
        self._cells: dict[Path, np.ndarray] = {}
        files = [self.path] if self.test_path is None else [self.path, self.test_path]
        pixels = all(str(self._array(file).dtype).endswith("uint8") for file in files)
        super().__init__(scale=pixels if scale is None else scale, condition=condition, **kwargs)
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
            self._raw[path] = read_array(path, self.key, self.condition_column)
        return self._raw[path]

    def _column(self, path: Path) -> np.ndarray:
        """The condition column's cells of a file, read once."""
        assert self.condition_column is not None
        if path not in self._cells:
            self._cells[path] = read_cells(path, self.condition_column)
        return self._cells[path]

    @property
    def condition_categories(self) -> list[str]:
        """The condition column's categories; condition k (``predict_condition: k``, row k of
        a one-hot ``condition``) is the k-th. Numbers are in numeric order, text in text order.
        """
        if self.condition_column is None:
            raise DataError(f"condition: {self.condition} is not a column of {self.path}")
        return categories_of(self._column(self.path)).tolist()

    @override
    def load_condition(self) -> tuple[Tensor, Tensor | None, int]:
        """The condition column's codes, or else the base class's."""
        if self.condition_column is None:
            return super().load_condition()
        categories = np.asarray(self.condition_categories)
        train, test = (
            None if path is None else torch.from_numpy(encode(self._column(path), categories, path))
            for path in (self.path, self.test_path)
        )
        assert train is not None
        return train, test, len(categories)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self._array(self.path).shape[1:])

    @property
    def feature_names(self) -> list[str] | None:
        """The column names of a CSV file with a header (None for other files), which factor
        analysis's tables carry; a condition's column is not one of the features."""
        if self.path.suffix.lower() != ".csv" or (header := csv_header(self.path)) is None:
            return None
        return [name for name in header if name != self.condition_column]

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
