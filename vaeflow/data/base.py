"""The base of vaeflow's data modules: the whole data set in memory, split by row numbers and
served in batches cut by indexing (never per-example Python or PIL)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
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
from vaeflow.errors import DataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
#: Seed of the test split carved from data that come without one: the same whatever ``seed``.
TEST_SPLIT_SEED = 0
#: Size of a batch for a model whose passes do not depend on example order (see
#: :meth:`InMemoryDataModule.batch_rows`): large enough that per-batch costs vanish, small
#: enough for the caches and for a model's per-batch temporaries.
ORDER_FREE_BATCH_BYTES = 32 * 2**20


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
    """

    #: (low, high) of the raw integer values when known (pixels: (0, 255)); None otherwise.
    value_range: tuple[int, int] | None = None
    #: Fraction of the examples carved off as a fixed test split when :meth:`load` gives none.
    test_fraction: float = 0.0

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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
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
        #: The prepared examples of each split (train, val, test), as the model sees them.
        self.splits: dict[Split, Tensor] = {}
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

    # -- what the model and the CLI read -------------------------------------------------------

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
        assert self._bounds is not None
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
            [(splits[s], rows[s]) for s in SPLITS if origin[s] is train],
            self.source("train"),
            *missing,
        )
        if test is not None:
            finite_bounds([(splits["test"], rows["test"])], self.source("test"), *missing)
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

    def batch_rows(self, data: Tensor) -> tuple[int, bool]:
        """Examples per batch and whether training shuffles. A model with ``order_free_passes``
        (its passes are sums over examples, e.g. EM) reads views in the stored order, in
        batches of about ``ORDER_FREE_BATCH_BYTES`` whatever ``batch_size``: per-batch costs
        (Python, kernel launches, small matrix products) then vanish."""
        if not getattr(self.model, "order_free_passes", False):
            return self.batch_size, self.shuffle
        example_bytes = data[0].numel() * data.element_size()
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
        low, high = self.bounds
        noise = self.preprocessing.batch_noise(low, high)
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
        return self._loader("test")


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
