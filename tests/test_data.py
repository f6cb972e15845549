"""Data modules: shapes, scaling, noise, splits, batching by index, file formats and user errors."""

from __future__ import annotations

import hashlib
import itertools
import pickle
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchvision.datasets import CIFAR10
from typing_extensions import override

from vaeflow.data import (
    AnnDataModule,
    ArrayDataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    InMemoryDataModule,
    MNISTDataModule,
)
from vaeflow.data.base import ORDER_FREE_BATCH_BYTES
from vaeflow.data.loader import Stream, TensorLoader, random_stream
from vaeflow.data.preprocess import BatchNoise, draw_bernoulli
from vaeflow.data.torchvision import TorchvisionDataModule
from vaeflow.errors import DataError

TORCHVISION_MODULES = [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule]


def epoch(loader: TensorLoader) -> Tensor:
    """All batches of one pass, concatenated."""
    return torch.cat(list(loader))


NOISE_SEEDS = itertools.count()


def whole(loader: TensorLoader) -> Tensor:
    """Every example of the loader in its stored order, with fresh per-batch noise applied."""
    if loader.transform is None:
        return loader.data
    return loader.transform(loader.data, np.random.default_rng(next(NOISE_SEEDS)))


# -- torchvision data sets ---------------------------------------------------------------------


@pytest.fixture(scope="session", params=[MNISTDataModule, FashionMNISTDataModule])
def mnist_module(
    request: pytest.FixtureRequest, mnist_root: Path
) -> Iterator[TorchvisionDataModule]:
    """MNIST or Fashion-MNIST set up once per session, with PIL forbidden while it loads."""

    def no_pil(*args: object, **kwargs: object) -> None:
        raise AssertionError("images went through PIL one by one")

    module = request.param(root=str(mnist_root), batch_size=500)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("PIL.Image.fromarray", no_pil)
        patch.setattr("torchvision.datasets.mnist._Image_fromarray", no_pil)
        module.setup()
    yield module


def test_mnist_splits_shapes_and_scale(mnist_module: TorchvisionDataModule) -> None:
    splits = mnist_module.splits
    assert mnist_module.dims == (784,)
    assert {name: tuple(splits[name].shape) for name in ("train", "val", "test")} == {
        "train": (54_000, 784),
        "val": (6_000, 784),
        "test": (10_000, 784),
    }
    assert splits["train"].min() == 0.0 and splits["train"].max() == 1.0
    # Pixels are scaled by the known range, not the data's: 255 levels, all on the 1/255 grid.
    levels = splits["test"] * 255
    assert torch.equal(levels, levels.round())
    batch = next(iter(mnist_module.train_dataloader()))
    assert batch.shape == (500, 784) and batch.dtype == torch.get_default_dtype()


def test_mnist_archives_are_unpacked_beside_them(mnist_module: TorchvisionDataModule) -> None:
    for archive in mnist_module.archives():
        assert archive.is_extracted(), archive.extracted


@pytest.mark.parametrize("module_class", TORCHVISION_MODULES)
def test_torchvision_dims_known_without_files(
    module_class: type[TorchvisionDataModule], tmp_path: Path
) -> None:
    image = (3, 32, 32) if module_class is CIFAR10DataModule else (1, 28, 28)
    assert module_class(root=str(tmp_path / "absent")).dims == (int(np.prod(image)),)
    assert module_class(root=str(tmp_path / "absent"), flatten=False).dims == image
    assert module_class.value_range == (0, 255)


@pytest.mark.parametrize("module_class", TORCHVISION_MODULES)
def test_torchvision_missing_files_say_where_and_how(
    module_class: type[TorchvisionDataModule], tmp_path: Path
) -> None:
    module = module_class(root=str(tmp_path))
    with pytest.raises(DataError) as error:
        module.setup()
    message = str(error.value)
    assert str(module.archives()[0].path.parent.resolve()) in message
    assert all(archive.path.name in message for archive in module.archives())
    assert "download: true" in message and "root" in message


def test_mnist_md5_catches_a_corrupted_copy(tmp_path: Path, mnist_root: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        (raw / source.name).symlink_to(source.resolve())
    corrupted = raw / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(corrupted.read_bytes())
    content[100] ^= 0xFF
    corrupted.unlink()
    corrupted.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is corrupted"):
        MNISTDataModule(root=str(tmp_path)).setup()
    assert not (raw / "t10k-labels-idx1-ubyte").exists(), "nothing is unpacked from a bad copy"


def test_unwritable_root_says_so(
    tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (mnist_root / "FashionMNIST" / "raw").glob("*.gz"):
        (raw / source.name).symlink_to(source.resolve())

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("vaeflow.data.torchvision.tempfile.TemporaryDirectory", read_only)
    with pytest.raises(DataError, match=r"could not unpack .* point `root` at a writable folder"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Tensor, Tensor]:
    """A tiny CIFAR-10 archive in the published layout, with torchvision's checksums patched to
    it: the offline path (MD5, unpacking, channels-last to channels-first) runs without CIFAR."""
    generator = torch.Generator().manual_seed(0)
    train, test = (torch.randint(0, 256, (n, 3, 32, 32), generator=generator) for n in (6, 4))
    folder = tmp_path / "build" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    batches = {"data_batch_1": train, "test_batch": test}
    for name, images in batches.items():
        entry = {"data": images.to(torch.uint8).flatten(1).numpy(), "labels": [0] * len(images)}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    archive = tmp_path / "root" / CIFAR10.filename
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=CIFAR10.base_folder)
    monkeypatch.setattr(CIFAR10, "train_list", [["data_batch_1", None]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": None})
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    return archive.parent, train, test


def test_cifar_archive_is_verified_unpacked_and_channels_first(
    fake_cifar: tuple[Path, Tensor, Tensor],
) -> None:
    root, train, test = fake_cifar
    loaded_train, loaded_test = CIFAR10DataModule(root=str(root)).load()
    assert loaded_train.shape == (6, 3, 32, 32) and loaded_train.dtype == torch.uint8
    assert torch.equal(loaded_train, train.to(torch.uint8))
    assert torch.equal(loaded_test, test.to(torch.uint8))


def test_cifar_corrupted_archive(
    fake_cifar: tuple[Path, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz is corrupted"):
        CIFAR10DataModule(root=str(fake_cifar[0])).setup()


@pytest.mark.parametrize("module_class", [MNISTDataModule, ArrayDataModule, AnnDataModule])
def test_cli_help_shows_inherited_options(module_class: type[InMemoryDataModule]) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(module_class, "data")
    text = parser.format_help()
    assert "--data.batch_size" in text and "examples per training batch" in text
    assert "--data.binarize" in text


# -- base-class options, on the small bundled digits ---------------------------------------------


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    module = DigitsDataModule(batch_size=64)
    module.setup()
    return module


def test_digits_scaled_to_unit_interval(digits: DigitsDataModule) -> None:
    train = digits.splits["train"]
    assert train.min() == 0.0 and train.max() == 1.0
    levels = train * 16
    assert torch.equal(levels, levels.round())


def test_split_sizes_and_fixed_test_split(digits: DigitsDataModule) -> None:
    sizes = {name: len(digits.splits[name]) for name in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(0.2 * 1797)
    other_seed = DigitsDataModule(seed=5)
    other_seed.setup()
    assert torch.equal(other_seed.splits["test"], digits.splits["test"])


def test_flatten_on_and_off(digits: DigitsDataModule) -> None:
    assert digits.dims == (64,)
    assert next(iter(digits.train_dataloader())).shape == (64, 64)
    images = DigitsDataModule(batch_size=10, flatten=False)
    assert images.dims == (1, 8, 8)
    assert next(iter(images.val_dataloader())).shape == (10, 1, 8, 8)


def test_batches_are_slices_of_one_permutation_per_epoch(digits: DigitsDataModule) -> None:
    loader = digits.train_dataloader()
    data = digits.splits["train"]
    for epoch_index in (0, 1, 0):  # the order of the epoch Lightning sets, from its stream
        loader.sampler.set_epoch(epoch_index)
        stream = random_stream(digits.seed, Stream.ORDER, epoch_index)
        order = torch.from_numpy(stream.permutation(len(data)))
        batches = list(loader)
        assert len(batches) == len(loader) == -(-len(data) // 64)
        assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
        torch.testing.assert_close(torch.cat(batches), data[order], rtol=0, atol=0)
    assert torch.equal(epoch(loader), epoch(loader)), "the epoch is set, not counted"
    evaluation = torch.cat(list(digits.val_dataloader()))
    torch.testing.assert_close(evaluation, digits.splits["val"], rtol=0, atol=0)


def test_unshuffled_batches_are_views_of_the_stored_tensor() -> None:
    module = DigitsDataModule(shuffle=False, batch_size=100)
    module.setup()
    stored = module.splits["train"]
    batches = list(module.train_dataloader())
    assert all(
        b.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr() for b in batches
    )
    torch.testing.assert_close(torch.cat(batches), stored, rtol=0, atol=0)


@pytest.mark.parametrize("size", [12, 13])
def test_processes_share_the_data_without_repeats_in_equal_numbers_of_batches(size: int) -> None:
    data = torch.arange(float(size))[:, None]
    loaders = [TensorLoader(data, 4, shuffle=True, seed=1, rank=r, world_size=2) for r in (0, 1)]
    shards = [list(loader) for loader in loaders]
    assert len(shards[0]) == len(shards[1]) == len(loaders[0])
    seen = torch.cat([batch for shard in shards for batch in shard]).flatten()
    assert sorted(seen.tolist()) == data.flatten().tolist()
    assert all(len(b) <= 4 for shard in shards for b in shard)
    with pytest.raises(DataError, match="cannot be shared by 3 processes"):
        TensorLoader(data[:2], 4, world_size=3)


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    """Rows that identify themselves: row i is (i, i, i)."""
    path = tmp_path / "numbered.npy"
    np.save(path, np.repeat(np.arange(200.0)[:, None], 3, axis=1))
    return path


def test_validation_split_reproducible_and_disjoint(numbered: Path) -> None:
    def rows(seed: int, split: str) -> set[int]:
        module = ArrayDataModule(str(numbered), seed=seed, val_fraction=0.25, test_fraction=0.2)
        module.setup()
        values = module.splits[split][:, 0]
        assert torch.equal(values, module.indices[split].to(values.dtype)), "indices: the rows"
        return set(values.int().tolist())

    train, val, test = (rows(0, split) for split in ("train", "val", "test"))
    assert len(test) == 40 and len(val) == 40  # 25% of the 160 rows left after the test split
    assert not train & val and not (train | val) & test
    assert train | val | test == set(range(200))
    assert rows(0, "val") == val
    assert rows(1, "val") != val
    assert rows(1, "test") == test


def test_binarize_draws_bernoulli_variables() -> None:
    probabilities = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat(40_000, 1)
    draws = draw_bernoulli(probabilities, np.random.default_rng(0))
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    # 40,000 draws each: the standard error of a frequency is at most 0.0025
    torch.testing.assert_close(draws.mean(0), probabilities[0], rtol=0, atol=0.01)


def test_static_binarisation_is_drawn_once(digits: DigitsDataModule) -> None:
    module = DigitsDataModule(binarize="static")
    module.setup()
    loader = module.train_dataloader()
    first = whole(loader)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, whole(loader))
    again = DigitsDataModule(binarize="static")
    again.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.splits[split], module.splits[split])
    # Roughly the grey levels on average: binarising keeps the mean image.
    assert abs(first.mean() - digits.splits["train"].mean()) < 0.01


def test_dynamic_binarisation_is_fresh_each_epoch_and_fixed_for_evaluation() -> None:
    module = DigitsDataModule(binarize="dynamic", batch_size=2000)
    loader = module.train_dataloader()
    first, second = whole(loader), whole(loader)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    assert torch.equal(module.splits["train"], loader.data), "stored data stay grey"
    val = epoch(module.val_dataloader())
    assert set(val.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(val, epoch(module.val_dataloader()))
    twin = DigitsDataModule(binarize="dynamic", batch_size=7)
    assert torch.equal(epoch(twin.val_dataloader()), val)
    assert torch.equal(epoch(twin.test_dataloader()), epoch(module.test_dataloader()))
    other_seed = DigitsDataModule(binarize="dynamic", seed=3)
    other_seed.setup()
    assert not torch.equal(epoch(other_seed.test_dataloader()), epoch(module.test_dataloader()))


def test_dynamic_noise_has_its_own_seeded_stream_per_epoch_and_process() -> None:
    """The noise is drawn from a generator of (seed, epoch, rank): reproducible whatever else
    draws random numbers, new every epoch, different per process."""
    data = torch.full((40, 3), 0.5)

    def epochs(seed: int, rank: int = 0, count: int = 2) -> list[Tensor]:
        loader = TensorLoader(
            data, 8, transform=BatchNoise(None, bernoulli=True), seed=seed, rank=rank, world_size=2
        )
        passes = []
        for index in range(count):
            loader.sampler.set_epoch(index)
            passes.append(epoch(loader))
        return passes

    torch.manual_seed(0)
    first = epochs(seed=1)
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(10)
    again = epochs(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], epochs(seed=1, rank=1, count=1)[0])
    assert not torch.equal(first[0], epochs(seed=2, count=1)[0])


@pytest.mark.parametrize("dequantize", ["static", "dynamic"])
def test_dequantisation_stays_within_each_level(digits: DigitsDataModule, dequantize: str) -> None:
    module = DigitsDataModule(dequantize=dequantize)
    test = epoch(module.test_dataloader())
    assert test.min() >= 0.0 and test.max() < 1.0
    assert not torch.equal(test * 17, (test * 17).floor()), "noise was added"
    # 17 grey levels (0..16), each widened to an interval of 1/17.
    assert torch.equal((test * 17).floor(), (digits.splits["test"] * 16).round())
    assert torch.equal(test, epoch(DigitsDataModule(dequantize=dequantize).test_dataloader()))
    loader = module.train_dataloader()
    assert torch.equal(whole(loader), whole(loader)) == (dequantize == "static")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"binarize": "static", "scale": False}, "binarize needs the data in"),
    ],
)
def test_impossible_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        DigitsDataModule(**options)


# -- ArrayDataModule -----------------------------------------------------------------------------

DATA = np.arange(60, dtype=np.float32).reshape(20, 3) / 4


def save_npy(path: Path) -> tuple[Path, str | None]:
    np.save(path.with_suffix(".npy"), DATA)
    return path.with_suffix(".npy"), None


def save_npz_single(path: Path) -> tuple[Path, str | None]:
    np.savez(path.with_suffix(".npz"), DATA)
    return path.with_suffix(".npz"), None


def save_npz_keyed(path: Path) -> tuple[Path, str | None]:
    np.savez_compressed(path.with_suffix(".npz"), x=DATA, y=np.zeros(20))
    return path.with_suffix(".npz"), "x"


def save_pt_tensor(path: Path) -> tuple[Path, str | None]:
    torch.save(torch.from_numpy(DATA), path.with_suffix(".pt"))
    return path.with_suffix(".pt"), None


def save_pt_dict(path: Path) -> tuple[Path, str | None]:
    torch.save({"x": torch.from_numpy(DATA), "labels": torch.zeros(20)}, path.with_suffix(".pt"))
    return path.with_suffix(".pt"), "x"


def save_csv(path: Path) -> tuple[Path, str | None]:
    np.savetxt(path.with_suffix(".csv"), DATA, delimiter=",")
    return path.with_suffix(".csv"), None


def save_csv_header(path: Path) -> tuple[Path, str | None]:
    np.savetxt(path.with_suffix(".csv"), DATA, delimiter=",", header="a,b,c", comments="")
    return path.with_suffix(".csv"), None


@pytest.mark.parametrize(
    "save",
    [
        save_npy,
        save_npz_single,
        save_npz_keyed,
        save_pt_tensor,
        save_pt_dict,
        save_csv,
        save_csv_header,
    ],
)
def test_array_formats_round_trip(
    save: Callable[[Path], tuple[Path, str | None]], tmp_path: Path
) -> None:
    path, key = save(tmp_path / "data")
    module = ArrayDataModule(str(path), key=key, val_fraction=0.0)
    assert module.dims == (3,)
    module.setup()
    assert module.value_range is None and len(module.splits["test"]) == 0
    np.testing.assert_array_equal(module.splits["train"].numpy(), DATA)


@pytest.mark.parametrize(
    ("stored", "kept"),
    [(np.float64, torch.float64), (np.float32, torch.float32), (np.int64, torch.float32)],
)
def test_array_float64_data_stay_float64(stored, kept, tmp_path: Path) -> None:
    """float64 arrays keep their precision (factor analysis computes in float64: in float32 an
    offset of 1e6 moved the fitted mean by 6e-4); other types become the default dtype."""
    values = (np.random.default_rng(0).normal(size=(40, 3)) * 100).astype(stored) + 10**6
    np.save(tmp_path / "x.npy", values)
    module = ArrayDataModule(str(tmp_path / "x.npy"), val_fraction=0.25)
    module.setup()
    rows = values[module.indices["train"].numpy()]
    assert module.splits["train"].dtype == kept
    if kept == torch.float64:
        np.testing.assert_array_equal(module.splits["train"].numpy(), rows)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_csv_header_names_the_features_and_no_row_is_lost(bom: bytes, tmp_path: Path) -> None:
    """A header (after a UTF-8 byte-order mark or not) gives the feature names; a first row of
    numbers (with a byte-order mark too) is data: every row is kept."""
    (tmp_path / "named.csv").write_bytes(bom + b"height, weight,age\n1,2,3\n4,5,6\n")
    (tmp_path / "plain.csv").write_bytes(bom + b"1,2,3\n4,5,6\n7,8,9\n")
    named = ArrayDataModule(str(tmp_path / "named.csv"), val_fraction=0.0)
    plain = ArrayDataModule(str(tmp_path / "plain.csv"), val_fraction=0.0)
    named.setup(), plain.setup()
    assert named.feature_names == ["height", "weight", "age"] and plain.feature_names is None
    assert len(named.splits["train"]) == 2 and len(plain.splits["train"]) == 3


def test_quoted_header_names_as_r_writes_them(tmp_path: Path) -> None:
    """R's ``write.csv(x, row.names = FALSE)`` quotes the names: they are names all the same."""
    (tmp_path / "r.csv").write_text('"height","body weight","age"\n1,2,3\n4,5,6\n')
    module = ArrayDataModule(str(tmp_path / "r.csv"), val_fraction=0.0)
    module.setup()
    assert module.feature_names == ["height", "body weight", "age"]
    np.testing.assert_array_equal(module.splits["train"].numpy(), [[1, 2, 3], [4, 5, 6]])


def test_array_images_uint8_and_test_path(tmp_path: Path) -> None:
    generator = np.random.default_rng(0)
    train = generator.integers(0, 200, (30, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", train[:5])
    module = ArrayDataModule(
        str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy"), flatten=False
    )
    assert module.dims == (1, 4, 4)
    module.setup()
    assert module.value_range == (0, 255), "uint8 data are pixels"
    expected = torch.from_numpy(train[:5]).float() / 255
    torch.testing.assert_close(module.splits["test"], expected)
    assert len(module.splits["train"]) + len(module.splits["val"]) == 30


def test_array_float_data_scaled_by_their_range_when_asked(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", DATA - 3)
    module = ArrayDataModule(
        str(tmp_path / "x.npy"), val_fraction=0.0, test_fraction=0.2, scale=True
    )
    module.setup()
    every = torch.cat([module.splits["train"], module.splits["test"]])
    assert every.min() == 0.0 and every.max() == 1.0


def test_array_test_path_scaled_with_the_training_range(tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", np.linspace(0.0, 10.0, 40).reshape(20, 2))
    np.save(tmp_path / "test.npy", np.array([[2.0, 4.0], [6.0, 8.0]]))
    module = ArrayDataModule(
        str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy"), scale=True
    )
    module.setup()
    expected = torch.tensor([[0.2, 0.4], [0.6, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(module.splits["test"], expected)


def write_bytes(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return write


def write_array(name: str, array: np.ndarray) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        np.save(folder / name, array)
        return folder / name

    return write


def write_pt(name: str, content: object) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        torch.save(content, folder / name)
        return folder / name

    return write


def write_npz(name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        np.savez(folder / name, images=DATA, labels=np.zeros(20))
        return folder / name

    return write


@pytest.mark.parametrize(
    ("write", "key", "message"),
    [
        (write_bytes("x.txt", b"1,2\n"), None, r"unsupported file type '\.txt'; supported: \.npy"),
        (write_bytes("x.csv", b"a,b\n1,2\n3,oops\n"), None, "could not convert string 'oops'"),
        (write_bytes("x.csv", b""), None, "is empty"),
        (write_bytes("x.csv", b"1,,3\n4,5,6\n"), None, "neither a row of numbers nor a header"),
        (write_bytes("x.csv", b"a,b,c\n4,5,6\n1,,3\n"), None, "line 3 of .* has an empty cell"),
        (write_bytes("x.csv", b"a,2,c\n4,5,6\n"), None, "neither a row of numbers nor a header"),
        (write_bytes("x.npy", b"not numpy"), None, "could not be read as .npy"),
        (write_array("x.npy", np.arange(5.0)), None, r"shape \(5,\); expected \(N, \.\.\.\)"),
        (write_array("x.npy", np.array([["a", "b"]])), None, "must hold numbers, got dtype <U1"),
        (write_array("x.npy", np.zeros((0, 4))), None, r"is empty: its array has shape \(0, 4\)"),
        (
            write_array("x.npy", np.array([[0.0, 1.0], [2.0, np.nan], [np.inf, 0.0]])),
            None,
            r"NaN or infinite values in 2 examples of the train split \(the first is row 1 of the "
            r"file\)",
        ),
        (write_npz("x.npz"), None, r"holds several arrays \(images, labels\): choose one with"),
        (write_npz("x.npz"), "pixels", "has no array 'pixels'; its keys are: images, labels"),
        (write_pt("x.pt", {"a": torch.ones(2, 2)}), "b", "has no array 'b'; its keys are: a"),
        (write_pt("x.pt", [1, 2]), None, "holds a list; expected a tensor"),
    ],
)
def test_array_errors_are_clear(
    write: Callable[[Path], Path], key: str | None, message: str, tmp_path: Path
) -> None:
    path = write(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        ArrayDataModule(str(path), key=key).setup()
    assert str(path) in str(error.value)


def test_array_missing_file_gives_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data file not found") as error:
        _ = ArrayDataModule("absent.npy").dims
    assert str(tmp_path / "absent.npy") in str(error.value)


def test_array_test_path_of_another_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", DATA)
    np.save(tmp_path / "test.npy", DATA[:, :2])
    module = ArrayDataModule(str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy"))
    with pytest.raises(DataError, match=r"examples of shape \(2,\), but path .* shape \(3,\)"):
        module.setup()


# -- epochs from Lightning, order-free models, loading cost ---------------------------------------


class FirstBatches(LightningModule):
    """Records the first training batch of every epoch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.first: dict[int, Tensor] = {}
        self.batch_shapes: list[tuple[int, ...]] = []
        self.views = True

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        if batch_idx == 0:
            self.first[self.current_epoch] = batch.clone()
        self.batch_shapes.append(tuple(batch.shape))
        stored = self.trainer.datamodule.splits["train"]
        self.views &= batch.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Nothing to evaluate: a test run only needs the test data."""

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class OrderFree(FirstBatches):
    order_free_passes = True


def digits_streams() -> DigitsDataModule:
    """Shuffled and dynamically binarised: both random streams depend on the epoch."""
    return DigitsDataModule(batch_size=50, binarize="dynamic", val_fraction=0.0)


FEW_BATCHES = {"limit_train_batches": 2}


def test_resumed_run_sees_the_batches_of_an_uninterrupted_one(
    silent_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    whole_run = FirstBatches()
    silent_trainer(max_epochs=3, **FEW_BATCHES).fit(whole_run, digits_streams())
    first_part = FirstBatches()
    trainer = silent_trainer(max_epochs=1, **FEW_BATCHES)
    trainer.fit(first_part, digits_streams())
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed = FirstBatches()
    silent_trainer(max_epochs=3, **FEW_BATCHES).fit(
        resumed, digits_streams(), ckpt_path=tmp_path / "epoch0.ckpt"
    )
    assert sorted(resumed.first) == [1, 2]
    for epoch_index in (0, 1, 2):
        run = first_part if epoch_index == 0 else resumed
        assert torch.equal(run.first[epoch_index], whole_run.first[epoch_index]), epoch_index
    assert not torch.equal(whole_run.first[0], whole_run.first[1]), "a new order every epoch"


def test_loaders_rebuilt_every_epoch_keep_the_epoch_streams(
    silent_trainer: Callable[..., Trainer],
) -> None:
    whole_run, reloaded = FirstBatches(), FirstBatches()
    silent_trainer(max_epochs=3, **FEW_BATCHES).fit(whole_run, digits_streams())
    silent_trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1, **FEW_BATCHES).fit(
        reloaded, digits_streams()
    )
    for epoch_index in (0, 1, 2):
        assert torch.equal(reloaded.first[epoch_index], whole_run.first[epoch_index])
    assert not torch.equal(whole_run.first[1], whole_run.first[2]), "a new order every epoch"


def test_order_free_models_get_large_unshuffled_views(
    silent_trainer: Callable[..., Trainer],
) -> None:
    data = DigitsDataModule(batch_size=10, val_fraction=0.0)  # shuffle: true by default
    ordinary, order_free = FirstBatches(), OrderFree()
    silent_trainer().fit(ordinary, data)
    silent_trainer().fit(order_free, DigitsDataModule(batch_size=10, val_fraction=0.0))
    train = data.splits["train"]
    assert len(ordinary.batch_shapes) == -(-len(train) // 10) and not ordinary.views
    # 1,438 examples of 64 float32 values: far below ORDER_FREE_BATCH_BYTES, so one batch,
    # a view of the stored tensor in its stored order
    assert order_free.batch_shapes == [tuple(train.shape)] and order_free.views
    assert torch.equal(order_free.first[0], train)


def test_order_free_batch_size_follows_the_example_size() -> None:
    example_bytes = 784 * 4
    module = DigitsDataModule(batch_size=7)
    module.trainer = SimpleNamespace(lightning_module=OrderFree())  # all batch_rows reads
    rows, shuffle = module.batch_rows(torch.zeros(2, 784))
    assert not shuffle and rows == ORDER_FREE_BATCH_BYTES // example_bytes
    assert 10 * 2**20 <= rows * example_bytes <= ORDER_FREE_BATCH_BYTES  # tens of MB


@pytest.mark.parametrize("size", [12, 13])
def test_order_free_shares_under_ddp_stay_exact_and_balanced(size: int) -> None:
    data = torch.arange(float(size))[:, None]
    loaders = [TensorLoader(data, 1000, rank=r, world_size=2) for r in (0, 1)]
    shards = [torch.cat(list(loader)) for loader in loaders]
    assert [len(loader) for loader in loaders] == [1, 1]
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert torch.equal(torch.cat(shards), data), "contiguous shares, every example once"


def test_array_defaults_keep_every_row_in_the_users_units(tmp_path: Path) -> None:
    values = np.random.default_rng(0).normal(50.0, 20.0, (40, 3))
    np.save(tmp_path / "x.npy", values)
    module = ArrayDataModule(str(tmp_path / "x.npy"), val_fraction=0.0)
    module.setup()
    assert module.log_scale == 0.0 and len(module.splits["test"]) == 0
    assert torch.equal(module.splits["train"], torch.from_numpy(values))  # float64 kept
    assert torch.equal(module.indices["train"], torch.arange(40))
    pixels = ArrayDataModule(str(write_array("p.npy", (values % 256).astype(np.uint8))(tmp_path)))
    pixels.setup()
    assert pixels.splits["train"].max() <= 1.0, "uint8 data are pixels, scaled by default"
    raw = ArrayDataModule(str(tmp_path / "p.npy"), scale=False)
    raw.setup()
    assert raw.splits["train"].max() > 1.0 and raw.log_scale == 0.0


def test_array_splits_and_their_row_numbers(numbered: Path) -> None:
    module = ArrayDataModule(str(numbered), val_fraction=0.1, test_fraction=0.25)
    module.setup()
    sizes = {split: len(rows) for split, rows in module.indices.items()}
    assert sizes == {"train": 135, "val": 15, "test": 50}
    for split, rows in module.indices.items():
        assert torch.equal(rows, rows.sort().values), "rows in file order"
        assert torch.equal(module.splits[split][:, 0], rows.to(module.splits[split].dtype))
    assert ArrayDataModule(str(numbered), test_path=str(numbered)).test_fraction == 0.0


def test_a_missing_test_split_and_contradictory_options_are_explained(
    numbered: Path, silent_trainer: Callable[..., Trainer]
) -> None:
    module = ArrayDataModule(str(numbered))
    with pytest.raises(DataError, match=r"no test examples: set test_fraction \(e\.g\. 0\.2\)"):
        silent_trainer().test(FirstBatches(), module)
    with pytest.raises(DataError, match=r"test_fraction=0\.2 and test_path=.* both ask"):
        ArrayDataModule(str(numbered), test_path=str(numbered), test_fraction=0.2)
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1\), got 1.0"):
        ArrayDataModule(str(numbered), test_fraction=1.0)


def test_non_finite_test_file_is_named(tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", DATA)
    np.save(tmp_path / "test.npy", np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 0.0]]))
    module = ArrayDataModule(str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy"))
    with pytest.raises(DataError, match=r"test\.npy has NaN or infinite values in 1 examples"):
        module.setup()


@pytest.mark.slow
def test_loading_a_large_array_costs_a_small_fraction_of_a_fit(tmp_path: Path) -> None:
    """60,000 x 784 float32 (188 MB, MNIST's size): read, split, checked in well under 0.3 s."""
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).random((60_000, 784), dtype=np.float32))
    times = []
    for _ in range(3):  # the best of three: the page cache warm, the machine at its quietest
        start = time.perf_counter()
        ArrayDataModule(str(path)).setup()
        times.append(time.perf_counter() - start)
    assert min(times) < 0.3, times


def test_without_val_fraction_the_model_decides(tmp_path: Path) -> None:
    """Factor analysis fits every row; a VAE (a model that states nothing) holds out a tenth;
    an explicit ``val_fraction`` wins over both."""
    from vaeflow.models import VAE, FactorAnalysis

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(100, 4)))

    def validation_rows(model: LightningModule | None, **options: float) -> int:
        module = ArrayDataModule(str(tmp_path / "x.npy"), **options)
        module.trainer = SimpleNamespace(lightning_module=model)
        module.setup()
        return len(module.splits["val"])

    assert validation_rows(FactorAnalysis((4,), latent_dim=1)) == 0
    assert validation_rows(VAE((4,), latent_dim=1)) == 10
    assert validation_rows(None) == 10
    assert validation_rows(FactorAnalysis((4,), latent_dim=1), val_fraction=0.2) == 20
