"""One table of bad inputs to the ``vaeflow`` command, across configs, trainer settings, values,
data files, checkpoints and file systems: each ends with ``vaeflow: error:`` and a message that
says what was wrong, exit code 2, no traceback, and every file that existed before (configs,
data, the earlier run and its checkpoint) is byte-identical after.

Each case runs in-process through :func:`vaeflow.cli.main` in a folder of its own holding a copy
of one earlier run; faults (a full disk, a file truncated while mapped, parameters turning NaN)
are injected with ``monkeypatch``.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vaeflow.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = "run.yaml"  # a copy of configs/quickstart.yaml in each case's folder
EARLIER = Path("runs") / "quickstart" / "version_0"
CKPT = str(EARLIER / "checkpoints" / "last.ckpt")
QUIET = ("--trainer.enable_progress_bar", "false", "--model.init_args.eval_samples", "0")
SHORT = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *QUIET)
FIT = ("fit", "--config", CONFIG, *SHORT, "--trainer.limit_val_batches", "1")
TEST = ("test", "--config", CONFIG, *QUIET)
ARRAY = (
    *("fit", "--data", "vaeflow.data.ArrayDataModule", "--model", "vaeflow.models.FactorAnalysis"),
    *("--model.init_args.latent_dim", "1", "--trainer.enable_progress_bar", "false"),
)
MATRIX = (
    *("fit", "--data", "vaeflow.data.CovarianceDataModule", "--data.path", "r.csv"),
    *ARRAY[3:],
)

Setup = Callable[[Path, pytest.MonkeyPatch], None]


@dataclass(frozen=True)
class Case:
    """A command (``args``), what its message must say, and what to prepare first."""

    args: tuple[str, ...]
    says: str
    setup: Setup | None = None
    #: a file that the fault injected by ``setup`` itself changes
    altered: str = ""


def write(name: str, content: bytes | str) -> Setup:
    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)

    return setup


def array(name: str, values: np.ndarray) -> Setup:
    return lambda folder, monkeypatch: np.save(folder / name, values)


def saved(name: str, obj: Any) -> Setup:
    return lambda folder, monkeypatch: torch.save(obj, folder / name)


def link(name: str, target: str) -> Setup:
    return lambda folder, monkeypatch: os.symlink(folder / target, folder / name)


def both(*setups: Setup) -> Setup:
    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for each in setups:
            each(folder, monkeypatch)

    return setup


def edited(change: Callable[[dict[str, Any]], None]) -> Setup:
    """``c.ckpt``: the earlier run's checkpoint with ``change`` made to it."""

    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        checkpoint = torch.load(folder / CKPT, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, folder / "c.ckpt")

    return setup


def first_weight(change: Callable[[torch.Tensor], Any]) -> Callable[[dict[str, Any]], None]:
    def edit(checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        name = next(iter(state))
        state[name] = change(state[name])

    return edit


def drop_first_weight(checkpoint: dict[str, Any]) -> None:
    del checkpoint["state_dict"][next(iter(checkpoint["state_dict"]))]


def damage_random_state(checkpoint: dict[str, Any]) -> None:
    for name, state in checkpoint["callbacks"].items():
        if "RandomState" in name:
            state["torch"] = torch.zeros(5, dtype=torch.uint8)


def nan_row(row: int) -> np.ndarray:
    values = np.random.default_rng(0).normal(size=(100, 3))
    values[row, 1] = np.nan
    return values


def noise(rows: int = 40, columns: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(rows, columns))


def disk_full(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's writer fails part-way, as on a full disk (its message, from inline_container)."""

    def save(obj: Any, file: Any) -> None:
        file.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr("vaeflow.checkpointing.torch.save", save)


def truncated_after_opening(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``big.npy`` is cut short after the data module read its header (memory-mapped), before it
    reads the values: reading them would raise SIGBUS."""
    np.save(folder / "big.npy", noise(20_000, 50))
    from vaeflow.data.array import ArrayDataModule

    load = ArrayDataModule.load

    def truncate_then_load(self: ArrayDataModule) -> Any:
        os.truncate(self.path, 4096)
        return load(self)

    monkeypatch.setattr(ArrayDataModule, "load", truncate_then_load)


def nan_after_first_epoch(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter turns NaN between two of the guard's checks, before validation."""
    from vaeflow.models import VAE

    def poisoned(self: VAE, *args: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            next(self.decoder.parameters()).fill_(float("nan"))

    monkeypatch.setattr(VAE, "on_train_batch_end", poisoned, raising=False)


def nan_in_validation(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``x.npy`` with NaN in one row that ``val_fraction 0.5, seed 3`` puts in the validation
    split, the training split clean: Python's ``min`` of the splits' minima dropped that NaN."""
    from vaeflow.data import ArrayDataModule

    values = noise(100)
    np.save(folder / "x.npy", values)
    clean = ArrayDataModule(path=str(folder / "x.npy"), val_fraction=0.5, seed=3)
    clean.setup("fit")
    values[int(clean.indices["val"][-1]), 1] = np.nan
    np.save(folder / "x.npy", values)


def read_only(name: str) -> Setup:
    """The folder ``name`` refuses writes as a read-only one refuses a user who is not root
    (tests run as root, whom ``chmod`` does not stop): creating a folder or opening a file for
    writing under it raises ``PermissionError``; reading works."""

    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        target = folder / name
        target.mkdir(exist_ok=True)

        def deny(path: Any) -> None:
            if Path(os.path.abspath(os.fsdecode(path))).is_relative_to(target):
                raise PermissionError(13, "Permission denied", os.fsdecode(path))

        def guarded(call: Callable[..., Any], writes: Callable[..., bool]) -> Callable[..., Any]:
            def checked(path: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(path, str | bytes | os.PathLike) and writes(*args, **kwargs):
                    deny(path)
                return call(path, *args, **kwargs)

            return checked

        def opens_to_write(mode: str = "r", *args: Any, **kwargs: Any) -> bool:
            return any(letter in mode for letter in "wax+")

        def flags_write(flags: int, *args: Any, **kwargs: Any) -> bool:
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

        monkeypatch.setattr(os, "mkdir", guarded(os.mkdir, lambda *a, **k: True))
        monkeypatch.setattr(os, "open", guarded(os.open, flags_write))
        monkeypatch.setattr(builtins, "open", guarded(builtins.open, opens_to_write))
        monkeypatch.setattr(io, "open", guarded(io.open, opens_to_write))

    return setup


def unreadable(name: str) -> Setup:
    """Reading the file ``name`` raises ``PermissionError``, as for a user without read
    permission (tests run as root, whom ``chmod`` does not stop)."""

    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path.resolve() == folder / name:
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)

    return setup


def run_folder_deleted(hook: str) -> Setup:
    """The run's folder is deleted (a cleanup script, a user) at the model's ``hook`` of the
    first epoch: after its last batch (``on_train_epoch_end``, before the epoch's checkpoint)
    or after its first (``on_train_batch_end``, before validation logs its metrics)."""

    def setup(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from vaeflow.models import VAE

        original = getattr(VAE, hook)

        def delete_then_go_on(self: VAE, *args: Any) -> Any:
            shutil.rmtree(self.trainer.log_dir, ignore_errors=True)
            return original(self, *args)

        monkeypatch.setattr(VAE, hook, delete_then_go_on)

    return setup


def quantised(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``x.pt``: a tensor of 8-bit integers with a scale, as ``torch.quantize_per_tensor``
    makes them (deprecated by torch, so its warning is expected)."""
    with pytest.warns(UserWarning, match="deprecated"):
        data = torch.quantize_per_tensor(torch.randn(40, 3), 0.1, 0, torch.qint8)
    torch.save(data, folder / "x.pt")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)
)

CASES: dict[str, Case] = {
    # -- config files ------------------------------------------------------------------------
    "malformed YAML": Case(
        ("fit", "--config", "c.yaml"), "is not valid YAML", write("c.yaml", "model: {a: 1\n")
    ),
    "config of random bytes": Case(
        ("fit", "--config", "c.yaml"), "is not UTF-8 text", write("c.yaml", bytes(range(256)))
    ),
    "UTF-16 config": Case(
        ("fit", "--config", "c.yaml"),
        "is UTF-16 text",
        write("c.yaml", "seed_everything: 1\n".encode("utf-16")),
    ),
    "YAML alias bomb": Case(
        ("fit", "--config", "c.yaml"), "expands to more than 100,000 values", write("c.yaml", BOMB)
    ),
    "empty config": Case(("fit", "--config", "c.yaml"), "is empty", write("c.yaml", "")),
    "comment-only config": Case(
        ("fit", "--config", "c.yaml"), "is empty (or only comments)", write("c.yaml", "# x\n")
    ),
    "list config": Case(
        ("fit", "--config", "c.yaml"), "is a YAML sequence, not a mapping", write("c.yaml", "- 1\n")
    ),
    "scalar config": Case(
        ("fit", "--config", "c.yaml"), "is a YAML scalar, not a mapping", write("c.yaml", "hi\n")
    ),
    "unreadable config": Case(
        ("fit", "--config", CONFIG), "cannot be read (Permission denied)", unreadable(CONFIG)
    ),
    "missing config": Case(("fit", "--config", "nope.yaml"), "does not exist"),
    "config is a folder": Case(("fit", "--config", "runs"), "is not a file"),
    "misspelt option": Case(
        (*FIT, "--model.init_args.latent_dimm", "3"), "Did you mean 'latent_dim'?"
    ),
    "value of the wrong type": Case((*FIT, "--model.init_args.latent_dim", "abc"), "abc"),
    "unknown trainer option": Case((*FIT, "--trainer.max_epochss", "3"), "unrecognized"),
    # -- trainer settings ----------------------------------------------------------------------
    "negative max_epochs": Case((*FIT, "--trainer.max_epochs", "-5"), "max_epochs"),
    "zero devices": Case((*FIT, "--trainer.devices", "0"), "refused the trainer settings"),
    "absent accelerator": Case(
        (*FIT, "--trainer.accelerator", "mps"), "refused the trainer settings"
    ),
    "accelerator tpu without torch_xla": Case(
        (*FIT, "--trainer.accelerator", "tpu"), "trainer.accelerator needs torch_xla"
    ),
    "negative limit_train_batches": Case(
        (*FIT, "--trainer.limit_train_batches", "-1"), "limit_train_batches"
    ),
    "zero val_check_interval": Case(
        (*FIT, "--trainer.val_check_interval", "0"), "val_check_interval=0"
    ),
    "zero check_val_every_n_epoch": Case(
        (*FIT, "--trainer.check_val_every_n_epoch", "0"), "check_val_every_n_epoch=0"
    ),
    "trainer gradient clipping": Case(
        (*FIT, "--trainer.gradient_clip_val", "1"), "model.init_args.gradient_clip_val"
    ),
    "trainer gradient accumulation": Case(
        (*FIT, "--trainer.accumulate_grad_batches", "2"), "batch_size"
    ),
    "bf16-true": Case((*FIT, "--trainer.precision", "bf16-true"), "use bf16-mixed"),
    "16-true": Case((*FIT, "--trainer.precision", "16-true"), "use 16-mixed"),
    "ckpt_path best in test": Case((*TEST, "--ckpt_path", "best"), "--ckpt_path best"),
    "ckpt_path hpc": Case((*FIT, "--ckpt_path", "hpc"), "--ckpt_path hpc"),
    "ckpt_path registry": Case((*TEST, "--ckpt_path", "registry"), "--ckpt_path registry"),
    "seed_everything 2**70": Case(
        (*FIT, "--seed_everything", str(2**70)), "seed_everything=1180591620717411303424"
    ),
    "negative seed_everything": Case((*FIT, "--seed_everything", "-1"), "seed_everything=-1"),
    "ckpt_path last without runs": Case(
        (
            "test",
            "--config",
            "c.yaml",
            "--ckpt_path",
            "last",
            "--trainer.enable_progress_bar=false",
        ),
        "--ckpt_path last: no runs/",
        lambda folder, mp: shutil.copy(REPO / "configs" / "ppca_digits.yaml", folder / "c.yaml"),
    ),
    # -- values ----------------------------------------------------------------------------------
    "data seed 2**70": Case((*FIT, "--data.init_args.seed", str(2**70)), "seed must be"),
    "latent_dim of 5000 digits": Case(
        (*FIT, "--model.init_args.latent_dim", "9" * 5000), "no size or count is that large"
    ),
    "latent_dim 10**9": Case(
        (*FIT, "--model.init_args.latent_dim", str(10**9)), "GiB of memory, more than"
    ),
    "num_samples 10**9": Case(
        (*FIT, "--model.init_args.num_samples", str(10**9)), "num_samples=1000000000"
    ),
    "negative hidden width": Case(
        (*FIT, "--model.init_args.encoder.init_args.hidden", "[-5]"), "must be a positive integer"
    ),
    "latent_dim 0": Case((*FIT, "--model.init_args.latent_dim", "0"), "latent_dim"),
    "negative learning rate": Case(
        (*FIT, "--model.init_args.optimizer.init_args.lr", "-0.1"), "Invalid learning rate"
    ),
    "StepLR step_size 0": Case(
        (
            *FIT,
            *("--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.StepLR"),
            *("--model.init_args.lr_scheduler.init_args.step_size", "0"),
        ),
        "learning-rate scheduler refused its settings",
    ),
    "gaussian min_std above max_std": Case(
        (
            *FIT,
            *("--model.init_args.likelihood", "vaeflow.likelihoods.GaussianLikelihood"),
            *("--model.init_args.likelihood.init_args.min_std", "5"),
            *("--model.init_args.likelihood.init_args.max_std", "1"),
        ),
        "floor < cap",
    ),
    "batch_size 0": Case((*FIT, "--data.init_args.batch_size", "0"), "batch_size"),
    "val_fraction 1.5": Case((*FIT, "--data.init_args.val_fraction", "1.5"), "val_fraction"),
    "eval_samples 1e8": Case(
        (*FIT, "--model.init_args.eval_samples", "1e8"),
        "without a point or exponent: 100000000",
    ),
    "eval_samples taking days": Case(
        (*TEST, "--ckpt_path", CKPT, "--model.init_args.eval_samples", str(10**10)),
        "on the 359 test examples takes about",
    ),
    # -- data files --------------------------------------------------------------------------------
    "missing data file": Case((*ARRAY, "--data.path", "nope.npy"), "data file not found"),
    "data path is a folder": Case((*ARRAY, "--data.path", "runs"), "is a folder"),
    "data link loop": Case(
        (*ARRAY, "--data.path", "a.npy"),
        "leads back to itself",
        both(link("a.npy", "b.npy"), link("b.npy", "a.npy")),
    ),
    "dangling data link": Case(
        (*ARRAY, "--data.path", "a.npy"), "which does not exist", link("a.npy", "gone.npy")
    ),
    "unsupported extension": Case(
        (*ARRAY, "--data.path", "x.txt"), "unsupported file type", write("x.txt", "1,2\n")
    ),
    "CSV first row with an empty cell": Case(
        (*ARRAY, "--data.path", "x.csv"),
        "neither a row of numbers nor a header",
        write("x.csv", "1,,3\n" + "1,2,3\n4,5,7\n" * 20),
    ),
    "CSV header mixing names and numbers": Case(
        (*ARRAY, "--data.path", "x.csv"),
        "neither a row of numbers nor a header",
        write("x.csv", "a,2,c\n" + "1,2,3\n4,5,7\n" * 20),
    ),
    "empty CSV": Case((*ARRAY, "--data.path", "x.csv"), "is empty", write("x.csv", "")),
    "covariance matrix not symmetric": Case(
        (*MATRIX, "--data.n_obs", "50"),
        "not symmetric: entry (0, 1) is 0.5 but (1, 0) is 0.4",
        write("r.csv", "a,b,c\n1,0.5,0\n0.4,1,0\n0,0,1\n"),
    ),
    "covariance matrix with n_obs not above D": Case(
        (*MATRIX, "--data.n_obs", "3"),
        "an integer above D = 3",
        write("r.csv", "a,b,c\n1,0.5,0\n0.5,1,0\n0,0,1\n"),
    ),
    "1-D array": Case(
        (*ARRAY, "--data.path", "x.npy"), "reshape it to (N, 1)", array("x.npy", noise()[:, 0])
    ),
    "complex array": Case(
        (*ARRAY, "--data.path", "x.npy"),
        "numbers, got dtype complex128",
        array("x.npy", noise() * 1j),
    ),
    "NaN in a validation row": Case(
        (*ARRAY, "--data.path", "x.npy", "--data.val_fraction", "0.5", "--data.seed", "3"),
        "of the val split (the first is row",
        nan_in_validation,
    ),
    "NaN in the test file": Case(
        (*ARRAY, "--data.path", "x.npy", "--data.test_path", "t.npy"),
        "t.npy has NaN or infinite values in 1 examples of the test split (the first is row 5",
        both(array("x.npy", noise(100)), array("t.npy", nan_row(5))),
    ),
    ".pt dict with non-string keys": Case(
        (*ARRAY, "--data.path", "x.pt"),
        "keys are not all names",
        saved("x.pt", {1: torch.ones(20, 3), "b": torch.ones(20, 3)}),
    ),
    ".pt of pickled objects": Case(
        (*ARRAY, "--data.path", "x.pt"), "objects other than tensors", saved("x.pt", Path("a"))
    ),
    "quantised .pt tensor": Case(
        (*ARRAY, "--data.path", "x.pt"), "holds a quantised tensor (torch.qint8)", quantised
    ),
    "float64 data beyond float32": Case(
        (
            *("fit", "--data", "vaeflow.data.ArrayDataModule", "--data.path", "x.npy"),
            *("--model", "vaeflow.models.VAE", "--model.init_args.likelihood", "gaussian"),
            *SHORT,
        ),
        "overflow torch.float32",
        array("x.npy", noise() * 1e300),
    ),
    "factor analysis of D = 1": Case(
        (*ARRAY, "--data.path", "x.npy"), "(D = 1)", array("x.npy", noise(columns=1))
    ),
    "data file truncated while mapped": Case(
        (*ARRAY, "--data.path", "big.npy"),
        "was truncated or rewritten",
        truncated_after_opening,
        altered="big.npy",
    ),
    # -- checkpoints -------------------------------------------------------------------------------
    "missing checkpoint": Case((*TEST, "--ckpt_path", "nope.ckpt"), "checkpoint not found"),
    "checkpoint is a folder": Case((*TEST, "--ckpt_path", "runs"), "is a folder"),
    "empty checkpoint": Case(
        (*TEST, "--ckpt_path", "c.ckpt"), "is empty (0 bytes)", write("c.ckpt", b"")
    ),
    "checkpoint of one byte": Case(
        (*TEST, "--ckpt_path", "c.ckpt"), "cannot be read", write("c.ckpt", b"x")
    ),
    "checkpoint of random bytes": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "cannot be read (IndexError",
        write("c.ckpt", random.Random(2).randbytes(4096)),
    ),
    "truncated checkpoint": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "cannot be read",
        lambda folder, mp: (folder / "c.ckpt").write_bytes((folder / CKPT).read_bytes()[:9000]),
    ),
    "pickled checkpoint": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "holds pickled Python objects (pathlib.PosixPath)",
        saved("c.ckpt", {"state_dict": {}, "path": Path("x")}),
    ),
    "hyper_parameters of the wrong type": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "'hyper_parameters' are a list",
        edited(lambda c: c.update(hyper_parameters=[1, 2])),
    ),
    "state_dict not a dict": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "'state_dict' is a list",
        edited(lambda c: c.update(state_dict=[1])),
    ),
    "state_dict missing a weight": Case(
        (*TEST, "--ckpt_path", "c.ckpt"), "missing weights: ", edited(drop_first_weight)
    ),
    "state_dict of wrong shapes": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "weights of another shape",
        edited(first_weight(lambda w: torch.zeros(3))),
    ),
    "empty state_dict": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "missing weights: ",
        edited(lambda c: c.update(state_dict={})),
    ),
    "NaN weights at test": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "holds NaN or infinite weights",
        edited(first_weight(lambda w: w * float("nan"))),
    ),
    "NaN weights at resume": Case(
        (*FIT, "--ckpt_path", "c.ckpt", "--trainer.max_epochs", "2"),
        "holds NaN or infinite weights",
        edited(first_weight(lambda w: w * float("nan"))),
    ),
    "damaged random-generator state": Case(
        (*FIT, "--ckpt_path", "c.ckpt", "--trainer.max_epochs", "2"),
        "random-generator state is damaged",
        edited(damage_random_state),
    ),
    "weights without Lightning's stamp": Case(
        (*TEST, "--ckpt_path", "c.ckpt"),
        "has no 'pytorch-lightning_version'",
        edited(lambda c: c.pop("pytorch-lightning_version")),
    ),
    "checkpoint of another model": Case(
        ("test", "--config", "c.yaml", "--ckpt_path", CKPT, "--trainer.enable_progress_bar=false"),
        "is a checkpoint of vaeflow.models.VAE",
        lambda folder, mp: shutil.copy(REPO / "configs" / "ppca_digits.yaml", folder / "c.yaml"),
    ),
    "config contradicting the checkpoint": Case(
        (*TEST, "--ckpt_path", CKPT, "--model.init_args.latent_dim", "4"),
        "latent_dim: 4 (checkpoint: 8)",
    ),
    # -- file systems ------------------------------------------------------------------------------
    "save_dir is a file": Case(
        (*FIT, "--trainer.logger.init_args.save_dir", "blocked"),
        "blocked is a file, not a folder",
        write("blocked", "x"),
    ),
    "runs is a dangling link": Case(
        (*FIT, "--trainer.logger.init_args.save_dir", "gone_runs"),
        "which does not exist",
        link("gone_runs", "nowhere"),
    ),
    "default_root_dir is a file": Case(
        (*FIT, "--trainer.default_root_dir", "f"), "is a file, not a folder", write("f", "x")
    ),
    "runs read-only": Case(
        FIT, "Permission denied: this user cannot write there", read_only("runs")
    ),
    "default_root_dir read-only": Case(
        (*FIT, "--trainer.logger", "false", "--trainer.default_root_dir", "out"),
        "in out: Permission denied: this user cannot write there. Choose another "
        "trainer.default_root_dir",
        read_only("out"),
    ),
    "run folder deleted before a checkpoint": Case(
        FIT,
        "was deleted while the run was going (found gone at epoch 0, step 2, before a checkpoint",
        run_folder_deleted("on_train_epoch_end"),
    ),
    "run folder deleted before metrics are written": Case(
        FIT,
        "was deleted while the run was going (writing ",
        run_folder_deleted("on_train_batch_end"),
    ),
    "logger name of 5000 characters": Case(
        (*FIT, "--trainer.logger.init_args.name", "n" * 5000),
        "longer than the file system allows",
    ),
    "logger version walking out": Case(
        (*FIT, "--trainer.logger.init_args.version", "new/../version_0"), "is a path"
    ),
    "version of the earlier run": Case(
        (*FIT, "--trainer.logger.init_args.version", "0"), "holds an earlier run"
    ),
    "disk full while checkpointing": Case(
        (*FIT, "--trainer.logger.init_args.name", "other"),
        "unexpected pos 64), so the run stopped",
        disk_full,
    ),
    "parameters turning NaN between checks": Case(
        FIT, "the parameters hold NaN or infinite values", nan_after_first_epoch
    ),
}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``run.yaml`` and one short quickstart run trained from it."""
    folder = tmp_path_factory.mktemp("earlier")
    shutil.copy(REPO / "configs" / "quickstart.yaml", folder / CONFIG)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["fit", "--config", CONFIG, *SHORT, "--trainer.limit_val_batches", "1"])
    finally:
        os.chdir(cwd)
    assert (folder / CKPT).is_file()
    return folder


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) by its SHA-256 (read with ``open``,
    which :func:`unreadable` leaves alone)."""

    def sha256(path: Path) -> str:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()

    return {
        str(path.relative_to(folder)): sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def test_the_table_holds_sixty_cases_or_more() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_a_message_and_touches_no_file(
    name: str,
    earlier_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    case = CASES[name]
    shutil.copytree(earlier_run, tmp_path, dirs_exist_ok=True, symlinks=True)
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    before = digests(tmp_path)
    before.pop(case.altered, None)
    with pytest.raises(SystemExit) as exit_info:
        main(list(case.args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    message = err[err.index("vaeflow: error: ") :]
    assert case.says in message, message
    after = digests(tmp_path)
    assert {path: after.get(path) for path in before} == before


# -- the Python API ----------------------------------------------------------------------------

#: a file given to ``load_from_checkpoint`` -> what the CheckpointError says
UNLOADABLE: dict[str, tuple[Setup | None, str]] = {
    "missing": (None, "checkpoint not found"),
    "empty": (write("c.ckpt", b""), "is empty (0 bytes)"),
    "truncated": (
        lambda folder, mp: (folder / "c.ckpt").write_bytes((folder / CKPT).read_bytes()[:9000]),
        "cannot be read",
    ),
    "foreign": (write("c.ckpt", random.Random(20).randbytes(4096)), "cannot be read (KeyError"),
    "pickled": (saved("c.ckpt", {"state_dict": {}, "p": Path("x")}), "pickled Python objects"),
    "weights alone": (saved("c.ckpt", {"state_dict": {}}), "is not a Lightning checkpoint"),
    "NaN weights": (edited(first_weight(lambda w: w * float("nan"))), "NaN or infinite weights"),
    "missing weight": (edited(drop_first_weight), "missing weights: "),
}

LOADS_AS_VAE = ("missing weight", "FactorAnalysis")


@pytest.mark.parametrize(
    ("kind", "model"),
    # a VAE's file with a weight missing: FactorAnalysis reads it as the VAE it describes
    [(k, m) for k in UNLOADABLE for m in ("VAE", "FactorAnalysis") if (k, m) != LOADS_AS_VAE],
)
def test_load_from_checkpoint_uses_the_clis_reader_and_messages(
    kind: str, model: str, earlier_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vaeflow import models
    from vaeflow.errors import CheckpointError

    shutil.copytree(earlier_run, tmp_path, dirs_exist_ok=True)
    setup, says = UNLOADABLE[kind]
    if setup is not None:
        setup(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        getattr(models, model).load_from_checkpoint(tmp_path / "c.ckpt")


def test_the_python_api_checks_what_it_is_given(earlier_run: Path) -> None:
    """Bernoulli data of 2.0 gave a log-likelihood of +19.4 nats; a 1-D tensor of 20 values gave
    factor analysis's 20 numbers."""
    from vaeflow.errors import DataError
    from vaeflow.models import VAE, FactorAnalysis

    vae = VAE.load_from_checkpoint(earlier_run / CKPT)
    x = torch.full((3, 64), 2.0)
    with pytest.raises(DataError, match=r"outside the support of the 'bernoulli' likelihood"):
        vae.log_likelihood(x, num_samples=4)
    with pytest.raises(DataError, match="outside the support"):
        vae.elbo(x)
    with pytest.raises(DataError, match=r"that is one example; add the batch dimension, x\[None\]"):
        vae.elbo(torch.rand(64))
    assert vae.elbo(torch.rand(1, 64).round()).shape == (1,)
    fa = FactorAnalysis(input_shape=(20,), latent_dim=2)
    with pytest.raises(DataError, match=r"got a tensor of shape \(20,\): that is one example"):
        fa.log_likelihood(torch.randn(20))
    with pytest.raises(DataError, match=r"examples of shape \(N, 20\).*got a tensor of shape"):
        fa.log_likelihood(torch.randn(4, 21))
    assert fa.log_likelihood(torch.randn(1, 20)).shape == (1,)
