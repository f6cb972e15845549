"""The base of vaeflow's data modules: the whole data set in memory, split by row numbers and
served in batches cut by indexing (never per-example Python or PIL)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from typing_extensions import override

from vaeflow.data.loader import Stream, TensorLoader, random_stream
from vaeflow.data.preprocess import (
    Array,
    BatchNoise,
    Noise,
    Preprocessing,
    finite_bounds,
    storage_dtype,
    take,
)
from vaeflow.data.stream import MappedRows, Prepare
from vaeflow.errors import DataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
#: Seed of the test split carved from data that come without one: the same whatever ``seed``.
TEST_SPLIT_SEED = 0
#: Size of a batch for a model whose passes do not depend on example order (see
#: :meth:`InMemoryDataModule.batch_rows`): large enough that per-batch costs vanish, small
#: enough for the caches and for a model's per-batch temporaries.
ORDER_FREE_BATCH_BYTES = 32 * 2**20


#: The largest seed: torch's and NumPy's generators take it, as Lightning's ``seed_everything``.
MAX_SEED = 2**32 - 1


def check_seed(name: str, value: int) -> None:
    """A seed the random generators take: an integer from 0 to :data:`MAX_SEED`."""
    if not 0 <= value <= MAX_SEED:
        raise DataError(f"{name} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {value}")


def check_fraction(name: str, value: float) -> None:
    """A share of the examples held out: in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {value}")


#: The validation fraction of a model that states none (a VAE): a tenth of the training rows.
DEFAULT_VAL_FRACTION = 0.1


class InMemoryDataModule(LightningDataModule):
    """Base class of vaeflow's data modules: the whole data set lives in memory as one tensor.

    Subclasses implement :meth:`load`; this class splits off a test set (when the data come
    without one) and a validation set, checks, scales and adds noise
    (:mod:`vaeflow.data.preprocess`), and serves batches by slicing (:mod:`vaeflow.data.loader`).
    Batches are plain tensors of shape ``(batch, *dims)``, sharded by rank under DDP.

    Args:
        batch_size: examples per training batch (evaluation uses the same).
        val_fraction: fraction of the training set held out for validation (0 disables it).
            None (the default) leaves it to the model (``default_val_fraction``): factor
            analysis fits every row (0), other models hold out 0.1, as does a data module set
            up before a model is attached.
        seed: seed of the validation split, of every noise draw and of the shuffling.
        shuffle: shuffle the training set every epoch. A model whose passes do not depend on
            example order (``order_free_passes``, e.g. factor analysis) always gets the data in
            their stored order, as views, in large batches (see :meth:`batch_rows`).
        scale: map the data to [0, 1] (by the known pixel range, else by the data's min and max).
        dequantize: add uniform noise of one quantisation level to integer data, so that a
            continuous density is well defined. ``static`` draws it once, ``dynamic`` anew for
            every training batch (validation and test are then drawn once, reproducibly).
        binarize: sample binary data with the pixel values as probabilities (``static`` once,
            ``dynamic`` anew for every training batch, validation and test once).
        flatten: present each example as a vector rather than an image.
        condition: what a conditional VAE is given beside each example, as a one-hot vector
            (``condition_dim`` categories), so that batches are pairs ``(examples,
            conditions)``: ``none``; ``labels``, the class label; or the name of a column of
            the data (a CSV file's header, an AnnData ``obs`` key: a batch, a donor), which is
            then not among the features.
    """

    #: (low, high) of the raw integer values when known (pixels: (0, 255)); None otherwise.
    value_range: tuple[int, int] | None = None
    #: Fraction of the examples carved off as a fixed test split when :meth:`load` gives none.
    test_fraction: float = 0.0
    #: Whether the splits stay on disk and each batch is read from the memory-mapped arrays
    #: that :meth:`load` returns (:class:`~vaeflow.data.stream.MappedRows`), for data larger
    #: than memory; otherwise each split is copied into memory once.
    stream: bool = False

    def __init__(
        self,
        batch_size: int = 100,
        val_fraction: float | None = None,
        seed: int = 0,
        shuffle: bool = True,
        scale: bool = True,
        dequantize: Noise = "none",
        binarize: Noise = "none",
        flatten: bool = True,
        condition: str = "none",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size}")
        check_seed("seed", seed)
        if val_fraction is not None:
            check_fraction("val_fraction", val_fraction)
        if binarize != "none" and not scale:
            raise DataError("binarize needs the data in [0, 1]: set scale: true")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.shuffle = shuffle
        self.scale = scale
        self.dequantize = dequantize
        self.binarize = binarize
        self.flatten = flatten
        self.condition = condition
        #: The prepared examples of each split (train, val, test), as the model sees them (rows
        #: read from disk batch by batch where the data module streams them).
        self.splits: dict[Split, Tensor | MappedRows] = {}
        #: The row numbers of each split's examples in the data they came from (the training
        #: data for train and val, and for a carved test split; else the test data).
        self.indices: dict[Split, Tensor] = {}
        self._bounds: tuple[float, float] | None = None
        self._evaluation: dict[Split, Tensor] = {}  # validation/test with their noise drawn once

    # -- what subclasses provide ---------------------------------------------------------------

    def load(self) -> tuple[Array, Array | None]:
        """Raw ``(train, test)`` examples of shape ``(N, *example_shape)``, handed over (they
        may be changed in place). ``test`` None: the test split is carved from the training
        data (``test_fraction`` of it)."""
        raise NotImplementedError

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one raw example, known without loading the data (it feeds the CLI link)."""
        raise NotImplementedError

    def source(self, split: Split) -> str:
        """What messages call the data a split comes from."""
        return f"{type(self).__name__}'s {'test' if split == 'test' else 'training'} data"

    def missing_split_advice(self, split: Split) -> str:
        """How to get examples into an empty split."""
        return f"use more data or a larger {split}_fraction"

    def load_labels(self) -> tuple[Tensor | None, Tensor | None]:
        """Class labels ``(N,)`` of the raw ``(train, test)`` examples, row for row with
        :meth:`load`; None where the data have none. Only pictures read them."""
        return None, None

    def labels(self, split: Split) -> Tensor | None:
        """Class labels of ``split``'s examples, row for row with ``splits[split]``, or None
        (the latent scatter of :class:`vaeflow.callbacks.Pictures` colours points by them)."""
        train, test = self.load_labels()
        source = test if split == "test" and test is not None else train
        if source is None:
            return None
        if not self.indices:
            self.setup()
        return torch.as_tensor(source)[self.indices[split]]

    def load_condition(self) -> tuple[Tensor, Tensor | None, int]:
        """The category codes (0 to K - 1) of the raw ``(train, test)`` examples under
        ``condition``, row for row with :meth:`load`, and the number of categories K. Here the
        class labels (``condition: labels``); data modules with named columns add those.

        Raises:
            DataError: the data have no labels, or no column of that name.
        """
        if self.condition != "labels":
            raise DataError(
                f"{type(self).__name__} has no column named {self.condition!r} to condition "
                "on: set condition to none or labels"
            )
        train, test = self.load_labels()
        if train is None:
            raise DataError(
                f"{type(self).__name__} has no class labels to condition on: set condition: none"
            )
        train = torch.as_tensor(train)
        return train, None if test is None else torch.as_tensor(test), int(train.max()) + 1

    def conditions(self, split: Split) -> Tensor | None:
        """The one-hot conditions of ``split``'s examples, row for row with
        ``splits[split]``; None with ``condition: none``."""
        if self.condition == "none":
            return None
        train, test, categories = self.load_condition()
        source = test if split == "test" and test is not None else train
        if not self.indices:
            self.setup()
        codes = source[self.indices[split]].long()
        return F.one_hot(codes, categories).to(torch.get_default_dtype())

    # -- what the model and the CLI read -------------------------------------------------------

    @property
    def condition_dim(self) -> int:
        """Length of one example's condition (the number of categories; 0 without a
        condition): a conditional VAE's ``condition_dim`` must equal it."""
        return 0 if self.condition == "none" else self.load_condition()[2]

    @property
    def dims(self) -> tuple[int, ...]:
        """Shape of one example as the model sees it."""
        shape = self.example_shape
        return (math.prod(shape),) if self.flatten else shape

    @property
    def log_scale(self) -> float:
        """log of the factor every value was divided by: ``log L`` for values on an L-level
        grid scaled to [0, 1] after dequantisation (8-bit pixels: log 256), log of the range
        for min-max scaled data, 0 for binarised data and data in their own units. Bits per
        dimension on the original grid follow from it (:func:`vaeflow.metrics.bits_per_dim`).
        Data scaled by their own range are loaded to know it."""
        if not self.preprocessing.rescales:
            return 0.0  # known without the bounds, so without loading
        return self.preprocessing.log_scale(*self.bounds)

    @property
    def preprocessing(self) -> Preprocessing:
        """The value transformations the options ask for."""
        return Preprocessing(self.scale, self.dequantize, self.binarize, self.flatten)

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of the raw values the scaling uses: the known range, else the training
        data's (which needs the data loaded)."""
        if self.value_range is not None:
            return float(self.value_range[0]), float(self.value_range[1])
        if self._bounds is None:
            self.setup()
        if self._bounds is None:  # streamed data are never read whole
            raise DataError(
                f"{type(self).__name__} streams its data from disk, so their range is unknown: "
                "scale the file's values before training, or set stream: false"
            )
        return self._bounds

    # -- setting up ----------------------------------------------------------------------------

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load, split by row numbers, copy each split out once, check, scale and add noise."""
        if self.splits:
            return
        train, test = self.load()
        for split, data in (("train", train), ("test", test)):
            if data is not None and (data.ndim < 2 or len(data) == 0):
                raise DataError(
                    f"{self.source(split)} must hold at least one example (shape (N, ...)), "
                    f"got shape {tuple(data.shape)}"
                )
        rows = self._split_rows(len(train), carve_test=test is None)
        origin = {"train": train, "val": train, "test": train if test is None else test}
        default_dtype = torch.get_default_dtype()
        if test is not None:
            rows["test"] = torch.arange(len(test))
        if self.stream:
            self._stream_splits(origin, rows)
            return
        splits = {
            split: take(
                origin[split],
                None if len(rows[split]) == len(origin[split]) else rows[split],  # all, in order
                # levels of a known grid (pixels) are exact in any float type
                storage_dtype(origin[split]) if self.value_range is None else default_dtype,
            )
            for split in SPLITS
        }
        self.indices = rows
        # NaN is a missing value to a model that says so (FactorAnalysis's `missing`)
        missing = (
            getattr(self.model, "missing_values", None),
            getattr(self.model, "missing_values_advice", ""),
        )
        self._bounds = finite_bounds(
            [(s, splits[s], rows[s]) for s in SPLITS if origin[s] is train],
            self.source("train"),
            *missing,
        )
        if test is not None:
            finite_bounds([("test", splits["test"], rows["test"])], self.source("test"), *missing)
        if self.dequantize != "none" and self.value_range is None:
            for data in splits.values():
                if not torch.equal(data, data.round()):
                    raise DataError("dequantize needs integer-valued data (counts, pixel levels)")
        low, high = self.bounds
        self.splits = {
            split: self.preprocessing.apply(
                splits[split], low, high, random_stream(self.seed, Stream.STATIC_NOISE, index)
            )
            for index, split in enumerate(SPLITS)
        }

    def _stream_splits(self, origin: dict[Split, Array], rows: dict[Split, Tensor]) -> None:
        """Splits that read their batches from the memory-mapped files, each batch checked and
        transformed as it is read. Their values are never all seen at once, so only value
        transformations that need no pass over the data are possible."""
        noise = [name for name in ("dequantize", "binarize") if getattr(self, name) != "none"]
        if noise or (self.scale and self.value_range is None):
            options = ", ".join(f"{name}: {getattr(self, name)}" for name in noise) or "scale: true"
            raise DataError(
                f"{type(self).__name__} streams its data from disk (stream), which takes the "
                f"values as stored: {options} needs them in memory. Transform the file first, "
                "or set stream: false if it fits in memory"
            )
        for split, array in origin.items():
            if not isinstance(array, np.memmap):
                raise DataError(
                    f"{self.source(split)} is not a memory-mapped .npy file, which stream needs: "
                    "save it with numpy.save, or set stream: false"
                )
        default_dtype = torch.get_default_dtype()
        self.indices = rows
        self.splits = {
            split: MappedRows(
                origin[split],
                rows[split],
                # levels of a known grid (pixels) are exact in any float type
                storage_dtype(origin[split]) if self.value_range is None else default_dtype,
                self._prepare_streamed(split),
            )
            for split in SPLITS
        }

    def _prepare_streamed(self, split: Split) -> Prepare:
        """What a streamed batch of ``split`` goes through: the finiteness check (which names
        the file's rows) and the scaling of a known range, as :meth:`setup` does for a split
        in memory."""
        missing = (
            getattr(self.model, "missing_values", None),
            getattr(self.model, "missing_values_advice", ""),
        )
        # without a known range the values are taken as stored (_stream_splits)
        low, high = self.value_range or (0, 0)
        unused = random_stream(self.seed, Stream.STATIC_NOISE, SPLITS.index(split))  # no noise

        def prepare(batch: Tensor, rows: Tensor) -> Tensor:
            finite_bounds([(split, batch, rows)], self.source(split), *missing)
            return self.preprocessing.apply(batch, low, high, unused)

        return prepare

    @property
    def model(self) -> LightningModule | None:
        """The model of the Trainer this data module is attached to, if any: some of its class
        attributes shape the data (``default_val_fraction``, ``order_free_passes``,
        ``missing_values``)."""
        return self.trainer.lightning_module if self.trainer is not None else None

    @property
    def validation_fraction(self) -> float:
        """``val_fraction``, or where it is None the attached model's ``default_val_fraction``
        (:data:`DEFAULT_VAL_FRACTION` for a model without one, or without a model)."""
        if self.val_fraction is not None:
            return self.val_fraction
        return getattr(self.model, "default_val_fraction", DEFAULT_VAL_FRACTION)

    def _split_rows(self, size: int, carve_test: bool) -> dict[Split, Tensor]:
        """Sorted row numbers of each split of the training data's ``size`` rows: a test split
        held out with a fixed seed when the data come without one, then a validation split with
        ``seed`` (the same rows as splitting the examples themselves, without their copies)."""
        rows, test = np.arange(size), np.arange(0)
        if carve_test:
            rows, test = hold_out(rows, self.test_fraction, TEST_SPLIT_SEED)
        train, val = hold_out(rows, self.validation_fraction, self.seed)
        return {
            "train": torch.from_numpy(train),
            "val": torch.from_numpy(val),
            "test": torch.from_numpy(test),
        }

    # -- serving batches -----------------------------------------------------------------------

    def batch_rows(self, data: Tensor | MappedRows) -> tuple[int, bool]:
        """Examples per batch and whether training shuffles. A model with ``order_free_passes``
        (its passes are sums over examples, e.g. EM) reads views in the stored order, in
        batches of about ``ORDER_FREE_BATCH_BYTES`` whatever ``batch_size``: per-batch costs
        (Python, kernel launches, small matrix products) then vanish."""
        if not getattr(self.model, "order_free_passes", False):
            return self.batch_size, self.shuffle
        example_bytes = math.prod(data.shape[1:]) * data.dtype.itemsize
        return max(1, ORDER_FREE_BATCH_BYTES // example_bytes), False

    def _loader(self, split: Split) -> TensorLoader:
        if not self.splits:
            self.setup()
        data = self.splits[split]
        if len(data) == 0:
            raise DataError(
                f"{type(self).__name__} has no {split} examples: {self.missing_split_advice(split)}"
            )
        batch_size, shuffle = self.batch_rows(data)
        # streamed data have no noise (_stream_splits)
        noise = None if self.stream else self.preprocessing.batch_noise(*self.bounds)
        if split != "train" and noise is not None:
            data, noise = self._noised_once(split, data, noise), None
        trainer = self.trainer
        return TensorLoader(
            data,
            batch_size,
            shuffle=shuffle and split == "train",
            transform=noise,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            condition=self.conditions(split),
        )

    def _noised_once(self, split: Split, data: Tensor, noise: BatchNoise) -> Tensor:
        """Validation and test data get the dynamic noise drawn once, with the seed, and kept."""
        if split not in self._evaluation:
            rng = random_stream(self.seed, Stream.EVAL_NOISE, SPLITS.index(split))
            self._evaluation[split] = noise(data, rng)
        return self._evaluation[split]

    @override
    def train_dataloader(self) -> TensorLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> TensorLoader | list:
        """No loader (validation off) when the validation fraction is 0."""
        return self._loader("val") if self.validation_fraction > 0 else []

    @override
    def test_dataloader(self) -> TensorLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> TensorLoader:
        """The test split, or, for data without one (a user's file without ``test_fraction``
        or ``test_path``), the training data: ``predict`` takes the data it is given."""
        if not self.splits:
            self.setup()
        return self._loader("test" if len(self.splits["test"]) else "train")


def hold_out(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of ``rows``, each in the order of ``rows``: ``fraction`` of them held
    out at random, marked on a mask (NumPy: torch's thread team costs more on these small
    index operations than they do, whenever the cores are busy)."""
    count = round(fraction * len(rows))
    if count == 0:
        return rows, rows[:0]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.zeros(len(rows), dtype=bool)
    held[order[:count]] = True
    return rows[~held], rows[held]
