"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, kept in memory as one uint8 tensor each.

torchvision reads and checks the files; this module adds what a run needs offline: the published
archives found under ``root`` are verified by MD5 and unpacked without any network, and a missing
or corrupted file is a :class:`~vaeflow.errors.DataError` that says how to fix it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST, VisionDataset
from torchvision.datasets.utils import check_integrity, extract_archive
from typing_extensions import override

from vaeflow.data.base import InMemoryDataModule
from vaeflow.errors import DataError


class Archive(NamedTuple):
    """One published archive and the files that unpacking it yields."""

    path: Path
    md5: str
    extracted: tuple[Path, ...]

    def is_extracted(self) -> bool:
        return all(path.is_file() for path in self.extracted)


class TorchvisionDataModule(InMemoryDataModule):
    """An image data set read by a torchvision class; ``.data`` is taken whole, never per example.

    Subclasses name the torchvision class and the image shape. The default file layout is
    MNIST's (``<root>/<Name>/raw/*.gz``, listed in the class's ``resources``).

    Args:
        root: folder holding the data set's folder (e.g. ``<root>/MNIST/raw``).
        download: fetch missing files from the internet; otherwise they must already be there,
            as the published archives or unpacked.
        **kwargs: the options of :class:`~vaeflow.data.base.InMemoryDataModule`.
    """

    value_range = (0, 255)
    #: The torchvision class that reads (and downloads) the files.
    dataset_class: ClassVar[type[VisionDataset]]
    #: Shape of one image, channels first.
    image_shape: ClassVar[tuple[int, int, int]]

    def __init__(self, root: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def archives(self) -> list[Archive]:
        """The published archives under ``root`` and their unpacked files (MNIST's layout)."""
        raw = self.root / self.dataset_class.__name__ / "raw"
        return [
            Archive(raw / name, md5, (raw / Path(name).stem,))
            for name, md5 in self.dataset_class.resources
        ]

    def prepare_data(self) -> None:
        """Unpack verified local archives, or download what is missing (once per node under DDP)."""
        pending = [archive for archive in self.archives() if not archive.is_extracted()]
        missing = [archive for archive in pending if not archive.path.is_file()]
        corrupted = [
            archive
            for archive in pending
            if archive not in missing and not check_integrity(archive.path, archive.md5)
        ]
        if self.download and (missing or corrupted):
            # torchvision fetches what is missing or corrupted, and checks it
            self._read(train=True)
            return
        if missing:
            raise DataError(self._missing_message(missing))
        if corrupted:
            names = ", ".join(str(archive.path.resolve()) for archive in corrupted)
            raise DataError(
                f"{type(self).__name__}: {names} is corrupted (its MD5 checksum differs from the "
                "published one); delete it and set `download: true`, or copy it again"
            )
        for archive in pending:
            self._unpack(archive)

    def _unpack(self, archive: Archive) -> None:
        """Unpack into a scratch folder, then move each file in place: an interrupted run, or
        another process unpacking at the same time, never leaves a truncated file behind."""
        folder = archive.path.parent
        try:
            with tempfile.TemporaryDirectory(dir=folder, prefix=".unpacking-") as scratch:
                extract_archive(archive.path, scratch)
                for path in archive.extracted:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(Path(scratch) / path.relative_to(folder), path)
        except OSError as error:
            raise DataError(
                f"{type(self).__name__}: could not unpack {archive.path} in {folder.resolve()} "
                f"({error}); point `root` at a writable folder (links to the archives will do)"
            ) from error

    def _missing_message(self, missing: list[Archive]) -> str:
        name = self.dataset_class.__name__
        folder = missing[0].path.parent.resolve()
        expected = ", ".join(archive.path.name for archive in missing)
        relative = ", ".join(str(archive.path.relative_to(self.root)) for archive in missing)
        return (
            f"{type(self).__name__}: {name} not found in {folder} (searched for {expected}, or "
            f"what they unpack to). Set `download: true` to fetch it, or point `root` at a "
            f"folder that holds {relative}"
        )

    def load(self) -> tuple[Tensor, Tensor]:
        self.prepare_data()
        return self._read(train=True), self._read(train=False)

    @override
    def load_labels(self) -> tuple[Tensor, Tensor]:
        self.prepare_data()  # a conditional model reads them (condition_dim) before setup
        return tuple(torch.as_tensor(self._dataset(train).targets) for train in (True, False))

    def _dataset(self, train: bool) -> VisionDataset:
        try:
            return self.dataset_class(str(self.root), train=train, download=self.download)
        except (RuntimeError, OSError) as error:
            raise DataError(
                f"{type(self).__name__}: torchvision could not read {self.dataset_class.__name__} "
                f"from {self.root.resolve()}: {error}"
            ) from error

    def _read(self, train: bool) -> Tensor:
        """All images of one split as a uint8 tensor ``(N, C, H, W)``."""
        images = torch.as_tensor(self._dataset(train).data)
        # Grey images come as (N, H, W), colour ones as (N, H, W, C).
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        return images.contiguous()


class MNISTDataModule(TorchvisionDataModule):
    """MNIST handwritten digits: 60,000 training and 10,000 test images of 28x28 grey pixels."""

    dataset_class = MNIST
    image_shape = (1, 28, 28)


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (Zalando's clothing images): MNIST's sizes and file format, harder images."""

    dataset_class = FashionMNIST
    image_shape = (1, 28, 28)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test colour images of 32x32 pixels.

    Its files are one archive, ``<root>/cifar-10-python.tar.gz``, unpacked to
    ``<root>/cifar-10-batches-py``.
    """

    dataset_class: ClassVar[type[CIFAR10]] = CIFAR10
    image_shape = (3, 32, 32)

    def archives(self) -> list[Archive]:
        cls = self.dataset_class
        folder = self.root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [Archive(self.root / cls.filename, cls.tgz_md5, tuple(folder / n for n in names))]
