"""Shared fixtures. Tests never download: MNIST and Fashion-MNIST come from a local copy."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch import Trainer
from threadpoolctl import threadpool_limits

from vaeflow.lightning_private import SpawnSkippingFinalisation

#: The published MNIST-format files, as torchvision expects them in ``<root>/<Name>/raw``.
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_NAMES = ("MNIST", "FashionMNIST")

#: A trainer that prints and writes nothing of its own, for one short fit.
SILENT_TRAINER = dict(
    accelerator="cpu",
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def pytest_configure(config: pytest.Config) -> None:
    """Give each pytest-xdist worker its share of the cores for torch, BLAS and the ``vaeflow``
    processes its tests start: several workers each running one thread per core oversubscribe
    them, and OpenMP threads then spin waiting for one another (two workers on two cores: the
    suite took 8 min with two threads each, 5.5 min with one). An OMP_NUM_THREADS the user set
    is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(share)
        threadpool_limits(limits=share)  # OpenBLAS, behind NumPy, SciPy and scikit-learn
        os.environ.setdefault("OMP_NUM_THREADS", str(share))  # the subprocesses' torch


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch, BLAS and OpenMP thread for a test of tiny matrices (the EM models'): a second
    thread only adds synchronisation, which costs seconds per fit when other processes keep
    the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # OpenBLAS, behind SciPy and scikit-learn
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def em_trainer(silent_trainer: Callable[..., Trainer]) -> Callable[..., Trainer]:
    """Quiet trainers that run an EM-style fit to its own stopping rule, without validation."""
    return functools.partial(
        silent_trainer, max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0
    )


@pytest.fixture
def silent_trainer(tmp_path: Path) -> Callable[..., Trainer]:
    """Build quiet CPU trainers (:data:`SILENT_TRAINER`, one epoch) rooted in the test's
    ``tmp_path``; keyword arguments override any setting."""

    def build(**kwargs: Any) -> Trainer:
        return Trainer(**SILENT_TRAINER | {"default_root_dir": tmp_path} | kwargs)

    return build


@pytest.fixture
def ddp_spawn(monkeypatch: pytest.MonkeyPatch) -> SpawnSkippingFinalisation:
    """The strategy of a multi-process test (``strategy=ddp_spawn, devices=2``): ``ddp_spawn``
    whose workers skip interpreter finalisation, where gloo aborts a finished fit at random,
    on a free port of its own. Tests run in parallel, and Lightning would otherwise leave the
    first fit's ``MASTER_PORT`` in the test process's environment for every later one."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    return SpawnSkippingFinalisation()
