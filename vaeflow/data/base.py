"""In-memory data modules: tensors sliced by index, never per-example Python or PIL."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor

from vaeflow.errors import DataError

Split = Literal["train", "val", "test"]
Noise = Literal["none", "static", "dynamic"]


class TensorLoader:
    """Batches of an in-memory tensor, each one indexing operation on a slice of a permutation.

    A ``DataLoader`` costs a Python list of indices per batch, a sampler and a collate step; on
    a CPU step of a few milliseconds that shows, so this loader does the one thing needed.
    Under DDP every process takes its own contiguous share of the same permutation: no example
    is repeated (epoch sums stay exact) and every process gets the same number of batches
    (their sizes differ by at most one example), so collective operations stay paired. Without
    shuffling, batches are views of the stored tensor.

    Per-batch noise (``transform``) is drawn from a generator of its own, seeded by (``seed``,
    epoch, ``rank``): the draws do not depend on what else consumes random numbers. (Drawing it
    in a background thread, one batch ahead, was measured: its OpenMP team competes with the
    model's for the two cores and made whole epochs up to 1.7x slower.)

    Args:
        data: the examples, ``(N, *dims)``.
        batch_size: examples per batch (per process).
        shuffle: a new permutation every epoch, drawn with the seed ``seed + epoch``, so all
            processes draw the same one.
        transform: per-batch noise (dynamic binarisation or dequantisation).
        seed: seed of the shuffling and of the noise.
        rank: this process's index among ``world_size``.
        world_size: number of processes sharing the data.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        shuffle: bool = False,
        transform: DynamicTransform | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(data) < world_size:
            raise DataError(
                f"{len(data)} examples cannot be shared by {world_size} processes: use fewer "
                "devices or more data"
            )
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.data) / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        size = len(self.data)
        start = self.rank * size // self.world_size
        stop = (self.rank + 1) * size // self.world_size
        if size % self.world_size == 0:  # every process has as many examples: plain batches
            edges = [*range(0, stop - start, self.batch_size), stop - start]
        else:  # as many batches everywhere, their sizes within one example of each other
            edges = [i * (stop - start) // len(self) for i in range(len(self) + 1)]
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(size, generator=generator)[start:stop]

        noise = np.random.default_rng((self.seed, epoch, self.rank))
        for low, high in itertools.pairwise(edges):
            if order is None:  # a view: no copy at all
                batch = self.data[start + low : start + high]
            else:
                batch = self.data[order[low:high]]
            yield batch if self.transform is None else self.transform(batch, noise)


def uniform(like: Tensor, rng: np.random.Generator) -> Tensor:
    """U[0, 1) noise shaped and typed like ``like``. NumPy's PCG64 draws it in 60% of the time
    of ``torch.rand`` (mt19937) on the CPU, which shows in every dynamically binarised step."""
    dtype = np.float64 if like.dtype == torch.float64 else np.float32
    return torch.from_numpy(rng.random(like.shape, dtype=dtype)).to(like.dtype)


def binarize(probabilities: Tensor, rng: np.random.Generator) -> Tensor:
    """Bernoulli draws: 1 where uniform noise falls below the probability. The distribution of
    ``torch.bernoulli``, in a third of its time (a vectorised uniform draw and an in-place
    comparison)."""
    return uniform(probabilities, rng).lt_(probabilities)


class DynamicTransform:
    """Per-batch noise: dequantisation then binarisation, each only where asked for."""

    def __init__(self, dequantize_width: float | None, binarize: bool) -> None:
        self.dequantize_width = dequantize_width
        self.binarize = binarize

    def __call__(self, batch: Tensor, rng: np.random.Generator) -> Tensor:
        if self.dequantize_width is not None:
            batch = uniform(batch, rng).mul_(self.dequantize_width).add_(batch)
        if self.binarize:
            batch = binarize(batch, rng)
        return batch


class InMemoryDataModule(LightningDataModule):
    """Base class of vaeflow's data modules: the whole data set lives in memory as one tensor.

    Subclasses implement :meth:`load`; this class validates, scales, adds noise, splits off a
    validation set with a seed, and serves batches by slicing. Batches are plain tensors of shape
    ``(batch, *dims)``, sharded by rank under DDP (see :class:`TensorLoader`).

    Args:
        batch_size: examples per training batch (evaluation uses the same).
        val_fraction: fraction of the training set held out for validation (0 disables it).
        seed: seed of the validation split, of every static noise draw and of the shuffling.
        shuffle: shuffle the training set every epoch. Models whose passes do not depend on
            the order (factor analysis) turn it off and read the data as views, without copies.
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

    def __init__(
        self,
        batch_size: int = 100,
        val_fraction: float = 0.1,
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
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
        self.splits: dict[str, Tensor] = {}
        self._level_width = 1.0
        self._data_range: tuple[float, float] | None = None

    # -- what subclasses provide ---------------------------------------------------------------

    def load(self) -> tuple[Tensor, Tensor | None]:
        """Raw ``(train, test)`` examples as tensors of shape ``(N, *example_shape)``.

        ``test`` may be None, in which case the test split is carved from the training data.
        """
        raise NotImplementedError

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one raw example, known without loading the data (it feeds the CLI link)."""
        raise NotImplementedError

    # -- the shared machinery ------------------------------------------------------------------

    @property
    def dims(self) -> tuple[int, ...]:
        """Shape of one example as the model sees it."""
        shape = self.example_shape
        return (math.prod(shape),) if self.flatten else shape

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self.load()
        rng = np.random.default_rng(self.seed)  # the static noise
        train = self._prepare(train, "training", rng)
        if test is None:
            train, test = self._split(train, 0.2, torch.Generator().manual_seed(0))
        else:
            test = self._prepare(test, "test", rng)
        train, val = self._split(train, self.val_fraction, torch.Generator().manual_seed(self.seed))
        self.splits = {"train": train, "val": val, "test": test}

    def _prepare(self, data: Tensor, name: str, rng: np.random.Generator) -> Tensor:
        """Validate, scale, add the static noise and flatten one raw split."""
        if data.ndim < 2 or len(data) == 0:
            raise DataError(
                f"{type(self).__name__}: the {name} data must hold at least one example "
                f"(shape (N, ...)), got shape {tuple(data.shape)}"
            )
        data = data.to(torch.get_default_dtype())
        if not torch.isfinite(data).all():
            bad = (~torch.isfinite(data)).sum().item()
            raise DataError(
                f"{type(self).__name__}: the {name} data contain {bad} NaN or infinite values; "
                "clean or impute them before training"
            )
        low, high = self._range(data)
        if self.dequantize != "none":
            if self.value_range is None and not torch.equal(data, data.round()):
                raise DataError("dequantize needs integer-valued data (counts, pixel levels)")
            levels = high - low + 1
            data = data - low
            if self.dequantize == "static":
                data = data + uniform(data, rng)
            low, high = 0.0, float(levels)
            self._level_width = 1.0 / levels if self.scale else 1.0
        if self.scale:
            data = (data - low) / max(high - low, 1e-12)
        if self.binarize == "static":
            data = binarize(data, rng)
        return data.flatten(1) if self.flatten else data

    def _range(self, data: Tensor) -> tuple[float, float]:
        """The known value range, else the training data's (every split is scaled alike)."""
        if self.value_range is not None:
            return float(self.value_range[0]), float(self.value_range[1])
        if self._data_range is None:  # the training split is prepared first
            self._data_range = data.min().item(), data.max().item()
        return self._data_range

    @staticmethod
    def _split(data: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        held_out = round(fraction * len(data))
        order = torch.randperm(len(data), generator=generator)
        return data[order[held_out:]], data[order[:held_out]]

    def _dynamic_transform(self) -> DynamicTransform | None:
        width = self._level_width if self.dequantize == "dynamic" else None
        if width is None and self.binarize != "dynamic":
            return None
        return DynamicTransform(width, self.binarize == "dynamic")

    def _loader(self, split: Split, shuffle: bool) -> TensorLoader:
        if not self.splits:
            self.setup()
        data = self.splits[split]
        if len(data) == 0:
            raise DataError(f"{type(self).__name__}: the {split} split is empty")
        transform = self._dynamic_transform()
        if split != "train" and transform is not None:
            data, transform = self._eval_noise(split, data), None
        trainer = self.trainer
        return TensorLoader(
            data,
            self.batch_size,
            shuffle=shuffle,
            transform=transform,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )

    def _eval_noise(self, split: Split, data: Tensor) -> Tensor:
        """Validation and test data get the dynamic noise drawn once, with the seed, and kept."""
        key = f"{split}_noisy"
        if key not in self.splits:
            rng = np.random.default_rng((self.seed, 1 if split == "val" else 2))
            self.splits[key] = self._dynamic_transform()(data, rng)
        return self.splits[key]

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> TensorLoader | list:
        """No loader (validation off) when ``val_fraction`` is 0."""
        return self._loader("val", shuffle=False) if self.val_fraction > 0 else []

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> TensorLoader:
        return self._loader("test", shuffle=False)
