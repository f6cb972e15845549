"""AnnData's ``.h5ad`` files (cells x genes, single-cell counts) read with h5py alone.

An ``.h5ad`` file is HDF5 in a documented layout (anndata's "On-disk format", encoding
version 0.1.0, written by anndata since 0.8, 2022): ``X`` and each of ``layers/<name>`` is a
dense dataset or a sparse group (``encoding-type`` ``csr_matrix`` or ``csc_matrix``: ``data``,
``indices``, ``indptr``, attribute ``shape``); ``obs`` and ``var`` are data frames (a group
whose attribute ``_index`` names the dataset of row names), and a categorical column is a group
of ``codes`` and ``categories``. Reading those needs h5py only (what anndata itself reads HDF5
with), not anndata and its dependencies (pandas, zarr, ...): ``pip install vaeflow[anndata]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from vaeflow.data.array import categories_of, encode, why_not_a_file
from vaeflow.data.base import InMemoryDataModule, Split, check_fraction
from vaeflow.errors import DataError

#: What a column of ``obs`` may be stored as to give categories (a condition, labels).
CATEGORY_ENCODINGS = (
    "categorical",
    "string-array",
    "array",
    "nullable-integer",
    "nullable-boolean",
)


def open_h5ad(path: Path) -> Any:
    """The file, open for reading (an ``h5py.File``), checked to be an AnnData file.

    Raises:
        DataError: h5py is missing, the file is missing or not HDF5, or it is no AnnData file
            of the current layout.
    """
    try:
        import h5py
    except ImportError as error:
        raise DataError("reading .h5ad files needs h5py: pip install 'vaeflow[anndata]'") from error
    if not path.is_file():
        raise DataError(why_not_a_file(path))
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path} could not be read as an HDF5 (.h5ad) file: {error}") from error
    if encoding(file) != "anndata":
        file.close()
        raise DataError(
            f"{path} is not an AnnData file of the layout anndata writes since version 0.8 "
            "(its root has no encoding-type 'anndata'): read it with anndata and save it again "
            "(anndata.read_h5ad(path).write_h5ad(path))"
        )
    return file


def encoding(node: Any) -> str:
    """A node's ``encoding-type`` attribute ('' where it has none)."""
    value = node.attrs.get("encoding-type", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def matrix_shape(node: Any) -> tuple[int, int]:
    """(rows, columns) of a dense dataset or a sparse group, without reading it."""
    return tuple(
        int(n) for n in (node.attrs["shape"] if encoding(node).endswith("matrix") else node.shape)
    )


def read_matrix(node: Any, where: str) -> np.ndarray:
    """A dense array of a dense dataset or a CSR/CSC group (the stored dtype kept).

    Raises:
        DataError: another encoding (a data frame, an awkward array, ...).
    """
    kind = encoding(node)
    if kind in ("csr_matrix", "csc_matrix"):
        rows, columns = matrix_shape(node)
        data, indices, indptr = (node[name][()] for name in ("data", "indices", "indptr"))
        dense = np.zeros((rows, columns), dtype=data.dtype)
        outer = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if kind == "csr_matrix":
            dense[outer, indices] = data
        else:
            dense[indices, outer] = data
        return dense
    if hasattr(node, "shape") and kind in ("", "array") and len(node.shape) == 2:
        return node[()]
    raise DataError(
        f"{where} is stored as {kind or type(node).__name__!r}; vaeflow reads a dense matrix or "
        "a csr_matrix or csc_matrix"
    )


def index_names(frame: Any) -> list[str]:
    """The row names of a data frame group (``obs`` or ``var``)."""
    return [str(name) for name in frame[frame.attrs["_index"]].asstr()[()]]


def column_names(frame: Any) -> list[str]:
    """The columns of a data frame group, in their order."""
    return [str(name) for name in frame.attrs.get("column-order", [])]


def read_categories(frame: Any, key: str, where: str) -> tuple[np.ndarray, list[str]]:
    """(code of every row, the categories) of a column of ``obs``: a categorical's own order;
    text or numbers in the order of :func:`~vaeflow.data.array.categories_of`.

    Raises:
        DataError: no such column (the message lists them), a missing value, or a column that
            holds no categories (floats, a data frame).
    """
    columns = column_names(frame)
    if key not in columns:
        raise DataError(
            f"{where} has no obs column {key!r}; its obs columns are: "
            f"{', '.join(columns) or 'none'}"
        )
    node = frame[key]
    kind = encoding(node)
    if kind == "categorical":
        codes = node["codes"][()].astype(np.int64)
        categories = [str(c) for c in node["categories"].asstr()[()]]
        missing = codes < 0
    elif kind in CATEGORY_ENCODINGS and (kind != "array" or node.dtype.kind in "biuSO"):
        values = node["values"][()] if kind.startswith("nullable") else node[()]
        if kind == "string-array":
            values = node.asstr()[()]
        missing = node["mask"][()] if kind.startswith("nullable") else np.zeros(len(values), bool)
        cells = np.asarray(values).astype(str)
        found = categories_of(cells[~missing])
        codes = np.full(len(cells), -1)
        codes[~missing] = encode(cells[~missing], found, Path(where))
        categories = found.tolist()
    else:
        raise DataError(
            f"obs column {key!r} of {where} holds {getattr(node, 'dtype', kind)} values, not "
            "categories: condition on a categorical, text or integer column"
        )
    if missing.any():
        raise DataError(
            f"obs column {key!r} of {where} has no value for {int(missing.sum())} cells (the "
            f"first: row {int(np.flatnonzero(missing)[0])}): every cell needs one"
        )
    return codes, categories


class AnnDataModule(InMemoryDataModule):
    """Cells of an AnnData ``.h5ad`` file, for count likelihoods and conditional VAEs.

    The matrix (``X`` or a layer; dense or sparse) is read as stored and made dense: raw counts
    stay integers, which the count likelihoods (``poisson``, ``negative_binomial``, ...) need;
    with ``library_size: observed`` they take each cell's total from its row. Nothing is scaled.
    ``condition`` names an ``obs`` column (a batch, a donor): its categories become one-hot
    conditions (:attr:`condition_categories`). The genes' names (``var``) become
    :attr:`feature_names`.

    Args:
        path: the ``.h5ad`` file.
        layer: the layer to use instead of ``X`` (e.g. ``counts`` where ``X`` holds
            normalised values).
        labels: an ``obs`` column of class labels (a cell type), which pictures colour the
            latent codes by, and which ``condition: labels`` conditions on.
        test_fraction: fraction of the cells held out as the test split (with a fixed seed).
        condition: ``none``, ``labels`` or the name of an ``obs`` column.
        **kwargs: the options of :class:`~vaeflow.data.base.InMemoryDataModule` (``scale`` is
            off here: counts stay counts).
    """

    def __init__(
        self,
        path: str,
        layer: str | None = None,
        labels: str | None = None,
        test_fraction: float = 0.0,
        condition: str = "none",
        scale: bool = False,
        **kwargs: Any,
    ) -> None:
        check_fraction("test_fraction", test_fraction)
        super().__init__(scale=scale, condition=condition, **kwargs)
        self.path = Path(path).expanduser()
        self.layer = layer
        self.labels_key = labels
        self.test_fraction = test_fraction
        with open_h5ad(self.path) as file:
            self._shape = matrix_shape(self._matrix_node(file))
            self.var_names = index_names(file["var"]) if "var" in file else None

    def _matrix_node(self, file: Any) -> Any:
        """``X`` or the chosen layer.

        Raises:
            DataError: the file has no such layer (the message lists them) or no ``X``.
        """
        if self.layer is None:
            if "X" not in file:
                layers = ", ".join(file.get("layers", {})) or "none"
                raise DataError(f"{self.path} has no X; choose a layer (its layers: {layers})")
            return file["X"]
        layers = file.get("layers", {})
        if self.layer not in layers:
            raise DataError(
                f"{self.path} has no layer {self.layer!r}; its layers are: "
                f"{', '.join(layers) or 'none'} (or leave layer unset for X)"
            )
        return layers[self.layer]

    @property
    def matrix_name(self) -> str:
        """What messages call the matrix: ``X`` or ``layers/<name>``."""
        return "X" if self.layer is None else f"layers/{self.layer}"

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self._shape[1],)

    @property
    def feature_names(self) -> list[str] | None:
        """The genes' names (``var``'s index)."""
        return self.var_names

    @override
    def source(self, split: Split) -> str:
        return f"{self.path} ({self.matrix_name})"

    @override
    def load(self) -> tuple[np.ndarray, None]:
        with open_h5ad(self.path) as file:
            return read_matrix(self._matrix_node(file), self.source("train")), None

    def _categories(self, key: str) -> tuple[np.ndarray, list[str]]:
        with open_h5ad(self.path) as file:
            if "obs" not in file:
                raise DataError(f"{self.path} has no obs data frame to read {key!r} from")
            return read_categories(file["obs"], key, str(self.path))

    @override
    def load_labels(self) -> tuple[Tensor | None, None]:
        if self.labels_key is None:
            return None, None
        return torch.from_numpy(self._categories(self.labels_key)[0]), None

    def _condition_key(self) -> str:
        """The ``obs`` column of the condition: ``condition``, or ``labels``'s for ``labels``."""
        if self.condition == "none":
            raise DataError(f"{type(self).__name__} has no condition: set condition")
        if self.condition != "labels":
            return self.condition
        if self.labels_key is None:
            raise DataError(
                f"{type(self).__name__} has no class labels to condition on: set labels to "
                "an obs column, or condition to the obs column itself"
            )
        return self.labels_key

    @property
    def condition_categories(self) -> list[str]:
        """The condition column's categories; condition k is the k-th."""
        return self._categories(self._condition_key())[1]

    @override
    def load_condition(self) -> tuple[Tensor, None, int]:
        """The codes of the ``obs`` column ``condition`` (of ``labels`` for ``labels``)."""
        codes, categories = self._categories(self._condition_key())
        return torch.from_numpy(codes), None, len(categories)
