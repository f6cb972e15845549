"""Shared fixtures. Tests never download: MNIST and Fashion-MNIST come from a local copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The published MNIST-format files, as torchvision expects them in ``<root>/<Name>/raw``.
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_NAMES = ("MNIST", "FashionMNIST")


def shared_data_dir() -> Path:
    """The folder holding ``MNIST/raw/*.gz``: ``$VAEFLOW_DATA_DIR``, else ``shared/data`` beside
    the repository (CI clones the repository next to ``shared/``)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("VAEFLOW_DATA_DIR", default)).expanduser()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable ``root`` for MNIST and Fashion-MNIST whose ``<Name>/raw/*.gz`` link to the
    shared read-only copy, so unpacking happens in a temporary folder once per session."""
    source = shared_data_dir()
    absent = [
        str(source / name / "raw" / file)
        for name in MNIST_NAMES
        for file in MNIST_FILES
        if not (source / name / "raw" / file).is_file()
    ]
    if absent:
        pytest.skip(
            f"MNIST files absent ({', '.join(absent)}); set VAEFLOW_DATA_DIR to a folder "
            "holding MNIST/raw/*.gz and FashionMNIST/raw/*.gz"
        )
    root = tmp_path_factory.mktemp("data")
    for name in MNIST_NAMES:
        raw = root / name / "raw"
        raw.mkdir(parents=True)
        for file in MNIST_FILES:
            (raw / file).symlink_to(source / name / "raw" / file)
    return root
