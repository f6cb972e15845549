"""Batches of an in-memory tensor, and the random streams behind them (shuffling, batch noise).

Every random stream is a function of (``seed``, stream, epoch, rank) only, with the epoch taken
from Lightning (``loader.sampler.set_epoch``): a resumed run, or a loader rebuilt every epoch
(``reload_dataloaders_every_n_epochs``), sees the batches of an uninterrupted run. The loader
also keeps its place in the epoch in checkpoints (Lightning's ``state_dict`` interface of a
resumable loader), so a run resumed from a mid-epoch checkpoint goes on with the next batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeflow.data.stream import MappedRows
from vaeflow.errors import DataError

#: Per-batch noise: ``(batch, generator) -> noisy batch``.
Transform = Callable[[Tensor, np.random.Generator], Tensor]


class Stream(IntEnum):
    """The word after the seed in the key of every random stream, so no two streams share draws.

    NumPy pads a short key with zeros (``(s, 1)`` and ``(s, 1, 0)`` seed the same generator), so
    without it the validation noise was the training noise of epoch 1, and the static noise that
    of epoch 0.
    """

    #: ``(seed, ORDER, epoch)``: an epoch's training order, the same on every process.
    ORDER = 1
    #: ``(seed, BATCH_NOISE, epoch, rank)``: the dynamic noise of one process's epoch.
    BATCH_NOISE = 2
    #: ``(seed, STATIC_NOISE, split)``: noise drawn once into a stored split.
    STATIC_NOISE = 3
    #: ``(seed, EVAL_NOISE, split)``: dynamic noise drawn once for validation or test.
    EVAL_NOISE = 4


def random_stream(seed: int, stream: Stream, *words: int) -> np.random.Generator:
    """The generator of one random stream. NumPy's PCG64 draws uniform noise in 60% of the
    time of ``torch.rand`` (mt19937) on the CPU, which shows in every dynamically noised step."""
    return np.random.default_rng((seed, int(stream), *words))


class ShardSampler:
    """The rows one process reads in one epoch, batch by batch.

    It is the loader's ``sampler`` in Lightning's sense: Lightning calls
    ``loader.sampler.set_epoch(epoch)`` before every epoch, after a resume too, as it does for
    torch's ``DistributedSampler``. Outside a Trainer the epoch stays where it was set (0).

    Under DDP every process takes its own contiguous share of the same order: no example is
    repeated (epoch sums stay exact) and every process gets the same number of batches (their
    sizes within one example of each other), so collective operations stay paired.

    Args:
        size: number of examples.
        batch_size: examples per batch (per process).
        shuffle: a new order every epoch, from the stream ``(seed, ORDER, epoch)``.
        seed: seed of the order.
        rank: this process's index among ``world_size``.
        world_size: number of processes sharing the data.
        condition: one condition row per example (a conditional VAE's); given, each batch is
            the pair ``(examples, conditions)`` of the same rows.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size < world_size:
            raise DataError(
                f"{size} examples cannot be shared by {world_size} processes: use fewer "
                "devices or more data"
            )
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order (and noise) the next pass draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.size / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[slice | Tensor]:
        """Each batch's rows: a slice (the batch is then a view) or, shuffled, an index tensor."""
        start = self.rank * self.size // self.world_size
        stop = (self.rank + 1) * self.size // self.world_size
        if self.size % self.world_size == 0:  # every process has as many examples: plain batches
            edges = [*range(0, stop - start, self.batch_size), stop - start]
        else:  # as many batches everywhere, their sizes within one example of each other
            edges = [i * (stop - start) // len(self) for i in range(len(self) + 1)]
        if not self.shuffle:
            for low, high in itertools.pairwise(edges):
                yield slice(start + low, start + high)
            return
        order = random_stream(self.seed, Stream.ORDER, self.epoch).permutation(self.size)
        share = torch.from_numpy(order[start:stop])
        for low, high in itertools.pairwise(edges):
            yield share[low:high]


class TensorLoader:
    """Batches of an in-memory tensor, each one indexing operation.

    A ``DataLoader`` costs a Python list of indices per batch, a sampler and a collate step; on
    a CPU step of a few milliseconds that shows, so this loader does the one thing needed.
    Without shuffling, batches are views of the stored tensor.

    Per-batch noise (``transform``) is drawn from the stream ``(seed, BATCH_NOISE, epoch,
    rank)``: the draws do not depend on what else consumes random numbers. (Drawing it in a
    background thread, one batch ahead, was measured: its OpenMP team competes with the
    model's for the two cores and made whole epochs up to 1.7x slower.)

    Args:
        data: the examples, ``(N, *dims)``, in memory or read from disk batch by batch.
        batch_size: examples per batch (per process).
        shuffle: a new order every epoch (see :class:`ShardSampler`).
        transform: per-batch noise (dynamic binarisation or dequantisation).
        seed: seed of the order and of the noise.
        rank: this process's index among ``world_size``.
        world_size: number of processes sharing the data.
        condition: one condition row per example (a conditional VAE's); given, each batch is
            the pair ``(examples, conditions)`` of the same rows.
    """

    #: Lightning reads a loader as a ``DataLoader``: a ``sampler`` (here :class:`ShardSampler`,
    #: which yields whole batches of rows) and a ``batch_sampler`` (none besides it).
    batch_sampler = None

    def __init__(
        self,
        data: Tensor | MappedRows,
        batch_size: int,
        shuffle: bool = False,
        transform: Transform | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        condition: Tensor | None = None,
    ) -> None:
        self.data = data
        self.condition = condition
        self.transform = transform
        self.sampler = ShardSampler(len(data), batch_size, shuffle, seed, rank, world_size)
        #: Batches of the current epoch handed out (Lightning fetches none ahead from a loader
        #: with a length, so these are the batches the training loop has taken).
        self.taken = 0
        self._resume_at: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        sampler = self.sampler
        noise = random_stream(sampler.seed, Stream.BATCH_NOISE, sampler.epoch, sampler.rank)
        resume, self._resume_at = self._resume_at, None
        skip = resume["batches"] if resume and resume["epoch"] == sampler.epoch else 0
        self.taken = 0
        for rows in sampler:
            batch = self.data[rows]
            if self.transform is not None:  # skipped batches draw their noise all the same
                batch = self.transform(batch, noise)
            self.taken += 1
            if self.taken > skip:
                yield batch if self.condition is None else (batch, self.condition[rows])

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: the epoch and the batches of it handed out (Lightning stores this
        in every checkpoint of a fit)."""
        return {"epoch": self.sampler.epoch, "batches": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on after the checkpoint's batches in its epoch (Lightning calls this only when it
        resumes a fit mid-epoch): the next pass over that epoch skips them."""
        self._resume_at = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
