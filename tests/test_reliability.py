"""Reliability of the ``vaeflow`` command: bad input gets a message (not a traceback), earlier runs
are never touched, diverging training stops and keeps its last good checkpoint, checkpoints
are written atomically, interrupted runs save and resume exactly."""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentError

from vaeflow.checkpointing import AtomicCheckpointIO, model_config, read_checkpoint
from vaeflow.cli import main
from vaeflow.data import DigitsDataModule
from vaeflow.errors import CheckpointError, TrainingDiverged
from vaeflow.guards import DivergenceGuard
from vaeflow.models import VAE
from vaeflow.runs import claim

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
PPCA = str(REPO / "configs" / "ppca_digits.yaml")
FA_SYNTHETIC = str(REPO / "configs" / "fa_synthetic.yaml")
#: No importance sampling, no progress bar.
QUIET = ("--model.init_args.eval_samples", "0", "--trainer.enable_progress_bar", "false")
#: A short quickstart: few batches, quiet.
SHORT = ("--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2", *QUIET)


def run_main(*args: str) -> None:
    main(list(args))


def user_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI expecting a user error; its stderr, checked to start with the message."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    first = err.strip().splitlines()[0]
    assert first.startswith("vaeflow: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickstart checkpoint (one short epoch, trained with eval_samples 0)."""
    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run_main("fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", *SHORT)
    finally:
        os.chdir(cwd)
    return folder / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


# -- bad input ----------------------------------------------------------------------------------


def test_a_negative_learning_rate_is_a_message(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = user_error(
        capsys,
        "fit",
        "--config",
        QUICKSTART,
        "--model.init_args.optimizer.init_args.lr",
        "-0.1",
        "--trainer.fast_dev_run",
        "1",
    )
    assert "Invalid learning rate: -0.1" in err and "model.init_args.optimizer" in err


def test_malformed_yaml_names_its_file_and_line(capsys, tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: vaeflow.models.VAE\n  init_args: {latent_dim: 3\n")
    err = user_error(capsys, "fit", "--config", str(config))
    assert f"{config} is not valid YAML" in err and "line 4" in err


def test_parser_mistakes_come_first_with_a_suggestion(capsys) -> None:
    err = user_error(capsys, "fit", "--config", QUICKSTART, "--model.init_args.latent_dimm", "3")
    assert "'latent_dimm' is not accepted" in err and "Did you mean 'latent_dim'?" in err
    assert len(err.splitlines()) < 8
    err = user_error(capsys, "fit", "--config", QUICKSTART, "--model.init_args.latent_dim", "abc")
    assert 'key "latent_dim"' in err and "Expected a int" in err and "abc" in err
    err = user_error(capsys, "fit", "--config", QUICKSTART, "--trainer.max_epochss", "3")
    assert "unrecognized arguments: --trainer.max_epochss 3" in err


#: kind of broken checkpoint -> what the message says. Random bytes make torch's unpickler raise
#: UnpicklingError mostly, but IndexError (seed 2) or KeyError (seed 20) in about 7% of files:
#: os.urandom here once made this test fail now and then; fixed seeds cover each type.
BROKEN = {
    "empty": "is empty (0 bytes)",
    "random bytes": "cannot be read (UnpicklingError",
    "random bytes, IndexError": "cannot be read (IndexError",
    "random bytes, KeyError": "cannot be read (KeyError",
    "truncated": "cannot be read",
    "pickled code": "holds pickled Python objects (argparse.Namespace)",
}
RANDOM_SEEDS = {"random bytes": 0, "random bytes, IndexError": 2, "random bytes, KeyError": 20}


@pytest.mark.parametrize("kind", BROKEN)
def test_unusable_checkpoints_are_messages(capsys, tmp_path, trained, kind) -> None:
    path = tmp_path / "broken.ckpt"
    if kind == "pickled code":
        torch.save({"state_dict": {}, "hyper_parameters": Namespace(lr=1)}, path)
    elif kind in RANDOM_SEEDS:
        path.write_bytes(random.Random(RANDOM_SEEDS[kind]).randbytes(4096))
    else:
        data = trained.read_bytes()
        path.write_bytes({"empty": b"", "truncated": data[:20000]}[kind])
    err = user_error(capsys, "test", "--config", QUICKSTART, "--ckpt_path", str(path))
    assert str(path) in err and BROKEN[kind] in err


def test_a_missing_checkpoint_is_a_message(capsys, tmp_path) -> None:
    err = user_error(
        capsys, "test", "--config", QUICKSTART, "--ckpt_path", str(tmp_path / "nope.ckpt")
    )
    assert "checkpoint not found" in err and "nope.ckpt" in err


def test_checkpoint_settings_never_silently_override_the_command(
    capsys, tmp_path, monkeypatch, trained
) -> None:
    """The checkpoint was trained with eval_samples 0: the command's eval_samples applies; a
    latent size or model class that contradicts the checkpoint is refused."""
    monkeypatch.chdir(tmp_path)
    test = ("test", "--config", QUICKSTART, "--ckpt_path", str(trained))
    run_main(*test, "--model.init_args.eval_samples", "7", "--trainer.enable_progress_bar", "false")
    (run,) = (tmp_path / "runs" / "quickstart").iterdir()
    (row,) = metrics_rows(run)
    assert float(row["test/log_likelihood"]) < 0  # computed, with 7 samples
    err = user_error(capsys, *test, "--model.init_args.latent_dim", "4")
    assert "latent_dim: 4 (checkpoint: 8)" in err
    err = user_error(capsys, "test", "--config", PPCA, "--ckpt_path", str(trained))
    assert "is a checkpoint of vaeflow.models.VAE, but the config's model is " in err
    assert "vaeflow.models.FactorAnalysis" in err


def test_a_checkpoint_of_other_data_is_refused(capsys, tmp_path, trained) -> None:
    data = tmp_path / "ten.npy"
    np.save(data, np.random.default_rng(0).random((40, 10)))
    err = user_error(
        capsys,
        *("test", "--config", QUICKSTART, "--ckpt_path", str(trained)),
        *("--data", "vaeflow.data.ArrayDataModule", "--data.path", str(data)),
        *("--data.binarize", "none", "--data.test_fraction", "0.5"),
    )
    assert "examples of shape (64,), but the data module gives examples of shape (10,)" in err


def test_ckpt_path_last_without_a_last_checkpoint(capsys, tmp_path, monkeypatch) -> None:
    """``fit`` starts afresh (a job script can always pass it); ``test`` has nothing to test."""
    monkeypatch.chdir(tmp_path)
    run_main("fit", "--config", QUICKSTART, "--ckpt_path", "last", "--trainer.fast_dev_run", "1")
    err = capsys.readouterr().err
    assert "no runs/quickstart/version_*/checkpoints/last.ckpt, so training starts afresh" in err
    err = user_error(capsys, "test", "--config", QUICKSTART, "--ckpt_path", "last")
    assert "--ckpt_path last: no runs/quickstart/version_*/checkpoints/last.ckpt. Give a" in err


def test_model_config_keeps_the_checkpoints_architecture_and_the_commands_run_settings() -> None:
    checkpoint = {
        "hyper_parameters": {
            "_class_path": "vaeflow.models.VAE",
            "input_shape": (64,),
            "latent_dim": 8,
            "eval_samples": 0,
        }
    }
    path = Path("x.ckpt")
    # the class default (latent_dim 16) says nothing: the checkpoint's 8 stays
    class_path, args = model_config(
        checkpoint, path, "vaeflow.models.VAE", {"latent_dim": 16, "eval_samples": 50}
    )
    assert class_path == "vaeflow.models.VAE"
    assert args == {"input_shape": (64,), "latent_dim": 8, "eval_samples": 50}
    with pytest.raises(CheckpointError, match="latent_dim: 3 "):
        model_config(checkpoint, path, "vaeflow.models.VAE", {"latent_dim": 3})
    with pytest.raises(CheckpointError, match=r"checkpoint of vaeflow\.models\.VAE"):
        model_config(checkpoint, path, "vaeflow.models.FactorAnalysis", {})


def test_debug_shows_the_traceback(monkeypatch) -> None:
    """With --debug or VAEFLOW_DEBUG=1 the error propagates (Python prints its traceback)."""
    args = ("fit", "--config", QUICKSTART, "--model.init_args.latent_dimm", "3")
    with pytest.raises(ArgumentError, match="latent_dimm"):
        run_main(*args, "--debug")
    monkeypatch.setenv("VAEFLOW_DEBUG", "1")
    with pytest.raises(ArgumentError, match="latent_dimm"):
        run_main(*args)


# -- earlier runs are never touched ---------------------------------------------------------------


def test_an_existing_version_is_refused_before_any_file_changes(
    capsys, tmp_path, monkeypatch, trained
) -> None:
    monkeypatch.chdir(trained.parents[3].parent)  # the folder holding runs/
    run = trained.parents[1]
    before = file_digests(run)
    assert "metrics.csv" in before and "checkpoints/last.ckpt" in before
    version = ("--trainer.logger.init_args.version", "0")
    err = user_error(capsys, "fit", "--config", QUICKSTART, *version, *SHORT)
    assert f"{run} holds an earlier run" in err
    err = user_error(capsys, "test", "--config", QUICKSTART, "--ckpt_path", str(trained), *version)
    assert f"{run} holds an earlier run" in err
    assert file_digests(run) == before


def test_a_runs_own_config_evaluates_it_in_a_folder_of_its_own(tmp_path, monkeypatch, trained):
    """The saved config.yaml names no version (the claimed one would refuse every reuse)."""
    monkeypatch.chdir(tmp_path)
    run = trained.parents[1]
    before = file_digests(run)
    config = run / "config.yaml"
    assert "version: null" in config.read_text()
    run_main("test", "--config", str(config), "--ckpt_path", str(trained), *QUIET)
    assert (tmp_path / "runs" / "quickstart" / "version_0" / "metrics.csv").exists()
    assert file_digests(run) == before


def claim_next(root: str, start: multiprocessing.synchronize.Event, out) -> None:
    start.wait()
    out.put(claim(Path(root), None))


def test_runs_started_together_never_share_a_version_folder(tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=claim_next, args=(str(tmp_path), start, out)) for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(30)
    versions = sorted(out.get(timeout=5) for _ in workers)
    assert versions == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{v}" for v in versions)


# -- numerical failure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "lr", "cause"),
    [
        # the case: good for 13 epochs, then a blow-up the guard catches as NaN or as
        # norm growth, whichever comes first (that depends on round-off; 45 s on two cores)
        pytest.param("torch.optim.SGD", "0.2", "NaN or infinite|-fold", marks=pytest.mark.slow),
        ("torch.optim.Adam", "1e6", "-fold"),  # an ELBO of -6e15 per example, all finite
    ],
)
def test_diverging_training_stops_and_keeps_only_good_checkpoints(
    capsys, tmp_path, monkeypatch, optimizer, lr, cause
) -> None:
    monkeypatch.chdir(tmp_path)
    err = user_error(
        capsys,
        "fit",
        "--config",
        QUICKSTART,
        "--model.init_args.optimizer",
        optimizer,
        "--model.init_args.optimizer.init_args.lr",
        lr,
        "--trainer.max_epochs",
        "30",
        *QUIET,
    )
    assert "training diverged at epoch" in err and re.search(cause, err)
    assert f"lr={float(lr):g}" in err and "min_std" in err and "encoder scale" in err
    checkpoints = list((tmp_path / "runs").rglob("*.ckpt"))
    for path in checkpoints:
        state = read_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(value).all() for value in state.values()), path
    if optimizer.endswith("SGD"):  # diverged after some good epochs: their checkpoint stays
        assert "the last good one is " in err and any(p.name == "last.ckpt" for p in checkpoints)


def test_the_guard_names_parameters_that_hold_nan(silent_trainer) -> None:
    model = VAE((64,), latent_dim=2)
    trainer = silent_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=256))
    guard = DivergenceGuard()
    guard.on_train_start(trainer, model)
    guard.check(trainer, model)  # healthy: no error
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="the parameters hold NaN or infinite values"):
        guard.check(trainer, model)


def test_divergence_is_caught_mid_epoch_with_several_steps_per_call(
    capsys, tmp_path, monkeypatch
) -> None:
    """The guard counts steps, not the batch index its hook sees (every 5th batch here)."""
    monkeypatch.chdir(tmp_path)
    lr = ("--model.init_args.optimizer.init_args.lr", "1e6")
    steps = ("--model.init_args.steps_per_call", "5")
    err = user_error(capsys, "fit", "--config", QUICKSTART, *lr, *steps, *QUIET)
    assert "training diverged at epoch 0, step 5:" in err and "-fold" in err


# -- checkpoints survive crashes ----------------------------------------------------------------


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def crash(obj, file) -> None:
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointError, match=r"\(disk full\).*the previous .* is kept whole"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


# -- interrupted runs ---------------------------------------------------------------------------


def start_fit(folder: Path, *args: str, config: str = QUICKSTART) -> subprocess.Popen:
    command = [sys.executable, "-m", "vaeflow", "fit", "--config", config, *args]
    return subprocess.Popen(command, cwd=folder, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_non_zero(tmp_path, signum, code) -> None:
    process = start_fit(
        tmp_path, "--trainer.max_epochs", "10000", "--model.init_args.eval_samples", "0"
    )
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    epoch_end = read_checkpoint(last)["global_step"]
    time.sleep(0.3)  # into a later epoch
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert read_checkpoint(last)["global_step"] > epoch_end


@pytest.mark.slow  # three fits in subprocesses: two minutes on two CPU cores
def test_a_killed_run_resumes_with_the_same_batches_and_noise(tmp_path) -> None:
    """SIGKILL after an epoch's checkpoint; ``--ckpt_path last`` continues it in a new version
    folder, whose epochs equal those of an uninterrupted run (same batches, data noise and
    reparameterisation noise, to the last digit)."""
    args = ("--trainer.max_epochs", "6", "--model.init_args.eval_samples", "0")
    args += ("--trainer.enable_progress_bar", "false")
    reference = tmp_path / "reference"
    reference.mkdir()
    assert start_fit(reference, *args).wait(timeout=600) == 0
    expected = metrics_rows(reference / "runs" / "quickstart" / "version_0")

    process = start_fit(tmp_path, *args)
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed_from = read_checkpoint(last)["epoch"]
    assert resumed_from < 5  # killed before the end
    resumed = start_fit(tmp_path, *args, "--ckpt_path", "last")
    assert resumed.wait(timeout=600) == 0
    rows = metrics_rows(tmp_path / "runs" / "quickstart" / "version_1")
    later = [row for row in expected if int(row["epoch"]) > resumed_from]
    assert rows == later


@pytest.mark.slow  # three fits in subprocesses: about a minute on two CPU cores
def test_a_killed_factor_analysis_resumes_and_ends_at_the_uninterrupted_fit(tmp_path) -> None:
    """Streaming EM (one pass an iteration) killed with SIGKILL once a checkpoint exists,
    resumed with ``--ckpt_path last``: it continues from its iteration and parameters and ends
    with the uninterrupted fit's, to round-off."""
    args = ("--model.init_args.method", "streaming", "--model.init_args.tol", "0")
    args += ("--model.init_args.max_iter", "40", "--trainer.enable_progress_bar", "false")
    runs = Path("runs") / "fa_synthetic"  # the config file's stem: it names no logger
    reference = tmp_path / "reference"
    reference.mkdir()
    assert start_fit(reference, *args, config=FA_SYNTHETIC).wait(timeout=600) == 0
    expected = read_checkpoint(reference / runs / "version_0" / "checkpoints" / "last.ckpt")

    process = start_fit(tmp_path, *args, config=FA_SYNTHETIC)
    last = tmp_path / runs / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    while int(read_checkpoint(last)["state_dict"]["n_iter"]) < 3:  # written atomically
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    interrupted = read_checkpoint(last)
    assert 0 < int(interrupted["state_dict"]["n_iter"]) < 40
    resumed = start_fit(tmp_path, *args, "--ckpt_path", "last", config=FA_SYNTHETIC)
    assert resumed.wait(timeout=600) == 0
    final = read_checkpoint(tmp_path / runs / "version_1" / "checkpoints" / "last.ckpt")
    assert int(final["state_dict"]["n_iter"]) == int(expected["state_dict"]["n_iter"]) == 40
    steps = [int(row["step"]) for row in metrics_rows(tmp_path / runs / "version_1")]
    assert min(steps) >= int(interrupted["state_dict"]["n_iter"])  # continued, not refitted
    for name in ("loadings", "noise_variance", "mean"):
        torch.testing.assert_close(
            final["state_dict"][name], expected["state_dict"][name], rtol=1e-9, atol=1e-12
        )


def test_a_refused_run_leaves_no_empty_run_folder(capsys, tmp_path, monkeypatch) -> None:
    """The run folder is claimed before the model is built; a model the config cannot build
    leaves no ``version_<n>`` behind, and a folder that holds files is never removed."""
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "runs" / "quickstart" / "version_0"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("an earlier run")
    err = user_error(capsys, "fit", "--config", QUICKSTART, "--model.init_args.latent_dim", "0")
    assert "latent_dim" in err
    assert [p.name for p in kept.parent.iterdir()] == ["version_0"]
    assert (kept / "notes.txt").read_text() == "an earlier run"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    user_error(capsys, "fit", "--config", QUICKSTART, "--model.init_args.latent_dim", "0")
    assert list(fresh.iterdir()) == []  # not even runs/quickstart
