"""Memory-mapped ``.npy`` files streamed batch by batch (``ArrayDataModule(stream=True)``): the
batches and the fit are those of the in-memory path, memory stays at a batch, and what needs the
whole data is refused."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from vaeflow.data import ArrayDataModule
from vaeflow.data.stream import MappedRows
from vaeflow.errors import DataError
from vaeflow.models import VAE, FactorAnalysis


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """300 rows of 6 float32 values drawn from a 2-factor model."""
    rng = np.random.default_rng(0)
    loadings = rng.normal(size=(6, 2))
    values = rng.normal(size=(300, 2)) @ loadings.T + rng.normal(size=(300, 6)) * 0.5
    np.save(tmp_path / "x.npy", values.astype(np.float32))
    return tmp_path / "x.npy"


def attach(module: ArrayDataModule, model: object) -> ArrayDataModule:
    """The data module as a Trainer with ``model`` shows it to the data module."""
    module.trainer = SimpleNamespace(lightning_module=model, global_rank=0, world_size=1)
    return module


@pytest.mark.parametrize("shuffle", [False, True])
def test_streamed_batches_are_the_in_memory_ones(table: Path, shuffle: bool) -> None:
    """Same splits, same rows in the same order in every batch, in the stored dtype; the
    splits hold row numbers, not values."""
    options = {"batch_size": 16, "val_fraction": 0.2, "test_fraction": 0.1, "shuffle": shuffle}
    streamed = ArrayDataModule(str(table), stream=True, **options)
    memory = ArrayDataModule(str(table), stream=False, **options)
    for module in (streamed, memory):
        module.setup()
    for split in ("train", "val", "test"):
        assert isinstance(streamed.splits[split], MappedRows)
        assert torch.equal(streamed.indices[split], memory.indices[split])
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        batches = [list(getattr(module, name)()) for module in (streamed, memory)]
        assert len(batches[0]) == len(batches[1]) > 1
        for read, kept in zip(*batches, strict=True):
            assert read.dtype == torch.float32
            assert torch.equal(read, kept)


@pytest.mark.parametrize("stream", [True, False])
def test_a_streamed_pass_holds_one_batch_in_memory(tmp_path: Path, stream: bool) -> None:
    """Setting up and a pass over a 16 MB file in 64 KB batches allocate at most a few batches
    at a time when streamed (NumPy's allocations, which tracemalloc sees: the copies out of the
    map); in memory, the copy of the file."""
    path = tmp_path / "big.npy"
    np.save(path, np.ones((32_768, 128), dtype=np.float32))
    tracemalloc.start()
    module = ArrayDataModule(str(path), stream=stream, batch_size=128, val_fraction=0.0)
    module.setup()
    total = sum(float(batch.sum()) for batch in module.train_dataloader())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == 32_768 * 128
    if stream:
        assert peak < 1_000_000, f"{peak} bytes allocated at once during a pass over 16 MB"
    else:
        assert peak >= 16 * 2**20, "the in-memory path copies the file (the test's control)"


def mapped_file_bytes() -> int:
    """This process's resident pages of mapped files (Linux's RssFile)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc reports RssFile")
def test_the_pages_read_leave_the_process_with_their_batch(tmp_path: Path) -> None:
    """Each batch unmaps its stretch of the file: after a pass over 48 MB, the process holds
    no more of it than a batch (a map kept open would count all 48 MB as resident)."""
    path = tmp_path / "big.npy"
    np.save(path, np.ones((12 * 2**20 // 128, 128), dtype=np.float32))
    module = ArrayDataModule(str(path), stream=True, batch_size=2048, val_fraction=0.0)
    module.setup()
    before = mapped_file_bytes()
    for _ in module.train_dataloader():
        pass
    assert mapped_file_bytes() - before < 8 * 2**20


def test_factor_analysis_fits_streamed_data_as_in_memory(
    table: Path, em_trainer: Callable[..., Trainer]
) -> None:
    """Both fitting methods give the in-memory fit's parameters (float64 sums either way)."""
    for method in ("moments", "streaming"):
        fits = []
        for stream in (True, False):
            model = FactorAnalysis(latent_dim=2, method=method, max_iter=30)
            em_trainer().fit(model, ArrayDataModule(str(table), stream=stream))
            fits.append(model)
        for name in ("mean", "noise_variance", "loadings"):
            torch.testing.assert_close(
                getattr(fits[0], name), getattr(fits[1], name), rtol=1e-10, atol=1e-12
            )


def test_large_files_stream_by_default(table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``stream``, a .npy file is streamed when it exceeds a quarter of the memory."""
    assert not ArrayDataModule(str(table)).stream
    monkeypatch.setattr("vaeflow.data.stream.physical_memory", lambda: 3 * table.stat().st_size)
    assert ArrayDataModule(str(table)).stream
    assert not ArrayDataModule(str(table), stream=False).stream


def test_a_non_finite_row_is_named_when_its_batch_is_read(tmp_path: Path) -> None:
    values = np.zeros((50, 3))
    values[37, 1] = np.nan
    np.save(tmp_path / "x.npy", values)
    module = attach(ArrayDataModule(str(tmp_path / "x.npy"), stream=True, batch_size=10), None)
    module.setup()  # nothing read yet
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 examples .* row 37 "):
        list(module.train_dataloader())
    fiml = attach(
        ArrayDataModule(str(tmp_path / "x.npy"), stream=True, val_fraction=0.0, shuffle=False),
        FactorAnalysis((3,), latent_dim=1, missing="fiml"),
    )
    fiml.setup()
    assert torch.isnan(next(iter(fiml.train_dataloader()))).sum() == 1, "NaN: a missing value"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": True}, "scale: true needs them in memory"),
        ({"dequantize": "dynamic"}, "dequantize: dynamic needs them in memory"),
    ],
)
def test_what_needs_the_whole_data_is_refused(
    table: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        ArrayDataModule(str(table), stream=True, **options).setup()


def test_only_npy_files_stream(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"x\.npz is not one: save the data with numpy\.save"):
        ArrayDataModule(str(tmp_path / "x.npz"), stream=True)


def test_uint8_pixels_stream_scaled_to_the_unit_interval(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 2, 2), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    module = ArrayDataModule(str(tmp_path / "x.npy"), stream=True, val_fraction=0.0, shuffle=False)
    module.setup()
    batch = next(iter(module.train_dataloader()))
    expected = torch.from_numpy(pixels).float().div(255).flatten(1)
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)


def test_a_vae_trains_on_streamed_data(table: Path, silent_trainer: Callable[..., Trainer]) -> None:
    data = ArrayDataModule(str(table), stream=True, batch_size=50)
    silent_trainer(max_epochs=1).fit(VAE(data.dims, latent_dim=2, likelihood="gaussian"), data)
    assert isinstance(data.splits["val"], MappedRows)
