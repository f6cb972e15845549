"""Resuming the run the user means, exactly: ``--ckpt_path last`` finds the run of the config (or of
the run's own ``config.yaml``), and a run interrupted mid-epoch by SIGINT or SIGTERM resumes with
the batches, metrics and final weights of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from vaeflow.checkpointing import read_checkpoint
from vaeflow.cli import main
from vaeflow.data import base
from vaeflow.runs import remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FA_SYNTHETIC = str(REPO / "configs" / "fa_synthetic.yaml")
#: Two short epochs of the quickstart (21 batches each), quiet, without pictures.
SHORT = (
    *("--trainer.max_epochs", "2", "--model.init_args.eval_samples", "0"),
    *("--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"),
)
#: The batch after which the interrupted runs get their signal: the 9th of epoch 1, step 30.
SIGNAL_AT = (1, 9)
SIGNAL_STEP = 30
BATCHES_FILE = "batches.csv"


class Recorder(Callback):
    """Writes each training batch's epoch, step and checksum to ``batches.csv`` in the run
    folder, and sends this process ``signum`` after batch ``batch`` (from 1) of epoch ``epoch``
    (0: never)."""

    def __init__(self, epoch: int = 0, batch: int = 0, signum: int = 0) -> None:
        self.at = (epoch, batch)
        self.signum = signum

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with (Path(trainer.log_dir) / BATCHES_FILE).open("a") as file:
            file.write(f"{trainer.current_epoch},{trainer.global_step},{batch.double().sum()}\n")
        if self.signum and (trainer.current_epoch, batch_idx + 1) == self.at:
            os.kill(os.getpid(), self.signum)


def recorder(at: tuple[int, int] = (0, 0), signum: int = 0) -> tuple[str, ...]:
    """The options that add a :class:`Recorder` to a run."""
    return (
        "--trainer.callbacks+=" + f"{Recorder.__module__}.Recorder",
        *("--trainer.callbacks.init_args.epoch", str(at[0])),
        *("--trainer.callbacks.init_args.batch", str(at[1])),
        *("--trainer.callbacks.init_args.signum", str(signum)),
    )


def fit(*args: str) -> int:
    """``vaeflow fit`` in this process; its exit code."""
    try:
        main(["fit", *args])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def rows(run: Path, name: str) -> list[list[str]]:
    with (run / name).open() as file:
        return list(csv.reader(file))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the quickstart's two epochs, uninterrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert fit("--config", QUICKSTART, *SHORT, *recorder()) == 0
    return folder / "runs" / "quickstart" / "version_0"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_interrupted_mid_epoch_resumes_as_if_uninterrupted(
    tmp_path, monkeypatch, capsys, uninterrupted, signum, code
) -> None:
    """Interrupted after the 9th of epoch 1's 21 batches, another run written in between, then
    ``--ckpt_path last`` from the original config and from the run's ``config.yaml``: each
    resumed run trains the remaining batches of the uninterrupted run and ends with its metrics
    and weights, to the last bit."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "quickstart"
    assert fit("--config", QUICKSTART, *SHORT, *recorder(SIGNAL_AT, signum)) == code
    err = capsys.readouterr().err
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    assert f"interrupted by {name} at epoch 1, step {SIGNAL_STEP} (batch 9 of 21): saved" in err
    assert "Traceback" not in err
    saved = read_checkpoint(last)
    assert (saved["epoch"], saved["global_step"]) == (1, SIGNAL_STEP)  # as the message says
    # another run of another model in between: the latest folder, but not this config's run
    assert fit("--config", QUICKSTART, *SHORT, "--model.init_args.latent_dim", "2") == 0
    capsys.readouterr()

    expected_batches = rows(uninterrupted, BATCHES_FILE)
    expected_metrics = rows(uninterrupted, "metrics.csv")
    interrupted = rows(runs / "version_0", BATCHES_FILE)
    assert interrupted == expected_batches[:SIGNAL_STEP]
    own_config = runs / "version_0" / "config.yaml"
    for config, version, meant in (
        (
            QUICKSTART,
            2,
            "runs/quickstart/version_0, the latest run under runs/quickstart that "
            "trained this model on this data",
        ),
        (str(own_config), 3, f"{own_config.parent} (the run of {own_config})"),
    ):
        resume = ("--config", config, *SHORT, *recorder(), "--ckpt_path", "last")
        assert fit(*resume) == 0
        assert f"vaeflow: --ckpt_path last: continuing {meant}" in capsys.readouterr().err
        run = runs / f"version_{version}"
        assert rows(run, BATCHES_FILE) == expected_batches[SIGNAL_STEP:]
        # the header and epoch 1's rows (its train means over all 21 batches)
        assert rows(run, "metrics.csv") == [expected_metrics[0], *expected_metrics[-2:]]
        for key, value in weights(uninterrupted).items():
            assert torch.equal(weights(run)[key], value), key


def test_last_finds_no_run_of_another_model(tmp_path, monkeypatch, capsys) -> None:
    """The quickstart's run is not the run of the same config with another latent_dim: the
    message names the nearest run, how it differs and the command that continues it."""
    monkeypatch.chdir(tmp_path)
    quick = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", *SHORT)
    assert fit("--config", QUICKSTART, "--model.init_args.latent_dim", "2", *quick) == 0
    capsys.readouterr()
    assert fit("--config", QUICKSTART, "--ckpt_path", "last", *quick) == 0
    err = capsys.readouterr().err
    own = Path("runs/quickstart/version_0/config.yaml")
    assert (
        "no run under runs/quickstart trained this model on this data (the latest, version_0, "
        "differs in model.init_args.latent_dim (2 there, 8 here)), so training starts afresh. "
        f"To continue version_0, give its own config: --config {own} --ckpt_path last"
    ) in err
    assert (
        read_checkpoint(tmp_path / "runs/quickstart/version_1/checkpoints/last.ckpt")[
            "hyper_parameters"
        ]["latent_dim"]
        == 8
    )


def test_factor_analysis_interrupted_mid_pass_finishes_the_pass(tmp_path, monkeypatch, capsys):
    """Streaming EM keeps its pass sums out of checkpoints, so SIGINT in the middle of a pass
    (epoch 5, batch 2 of 5) stops at the pass's end, where Lightning wrote ``last.ckpt``; the
    resumed fit reads the remaining passes and ends with the uninterrupted fit's parameters."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "ORDER_FREE_BATCH_BYTES", 1000 * 20 * 8)  # 1000 rows of D = 20
    em = ("--model.init_args.method", "streaming", "--model.init_args.tol", "0")
    em += ("--model.init_args.max_iter", "8", "--trainer.enable_progress_bar", "false")
    args = ("--config", FA_SYNTHETIC, *em, "--trainer.callbacks", "[]")
    runs = tmp_path / "runs" / "fa_synthetic"
    assert fit(*args, *recorder()) == 0
    assert fit(*args, *recorder((5, 2), signal.SIGINT)) == 130
    err = capsys.readouterr().err
    last = Path("runs/fa_synthetic/version_1/checkpoints/last.ckpt")
    assert "interrupted by SIGINT after epoch 5, step " in err and f"{last} holds it" in err
    assert read_checkpoint(last)["epoch"] == 5
    batches = rows(runs / "version_0", BATCHES_FILE)
    assert len([row for row in batches if row[0] == "5"]) == 5
    assert rows(runs / "version_1", BATCHES_FILE) == [row for row in batches if int(row[0]) <= 5]
    assert fit(*args, *recorder(), "--ckpt_path", "last") == 0
    assert rows(runs / "version_2", BATCHES_FILE) == [row for row in batches if int(row[0]) > 5]
    for key, value in weights(runs / "version_0").items():
        torch.testing.assert_close(weights(runs / "version_2")[key], value, rtol=1e-9, atol=1e-12)


class SignalAt(Callback):
    """Sends this process ``signum``, ``times`` times in a row, at the first ``hook`` (a batch
    hook's name) that runs during the sanity check (``sanity``) or outside it."""

    def __init__(self, hook: str, signum: int, times: int = 1, sanity: bool = False) -> None:
        self.hook, self.signum, self.times, self.sanity = hook, signum, times, sanity

    def _at(self, trainer: Trainer, hook: str) -> None:
        if hook == self.hook and trainer.sanity_checking == self.sanity and self.times:
            for _ in range(self.times):
                self.times -= 1
                os.kill(os.getpid(), self.signum)

    @override
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._at(trainer, "on_train_batch_end")

    @override
    def on_validation_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._at(trainer, "on_validation_batch_end")

    @override
    def on_test_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._at(trainer, "on_test_batch_end")

    @override
    def on_predict_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._at(trainer, "on_predict_batch_end")


def signal_at(
    hook: str, times: int = 1, sanity: bool = False, signum: int = signal.SIGINT
) -> tuple[str, ...]:
    return (
        "--trainer.callbacks+=" + f"{SignalAt.__module__}.SignalAt",
        *("--trainer.callbacks.init_args.hook", hook),
        *("--trainer.callbacks.init_args.signum", str(int(signum))),
        *("--trainer.callbacks.init_args.times", str(times)),
        *("--trainer.callbacks.init_args.sanity", str(sanity).lower()),
    )


def one_line(err: str) -> str:
    """The vaeflow lines of ``err``, checked to hold no traceback nor Lightning's notice."""
    assert "Traceback" not in err and "Detected KeyboardInterrupt" not in err, err
    return "\n".join(line for line in err.splitlines() if line.startswith("vaeflow:"))


@pytest.mark.parametrize(
    ("where", "said"),
    [
        (signal_at("on_validation_batch_end"), "after epoch 0, step 21: "),
        (signal_at("on_validation_batch_end", sanity=True), "nothing was saved"),
        (signal_at("on_train_batch_end", times=2), "nothing was saved"),
    ],
    ids=["validation", "sanity-check", "twice"],
)
def test_sigint_outside_a_training_batch(tmp_path, monkeypatch, capsys, where, said) -> None:
    """During validation: the epoch ends as usual, with its checkpoint, and the run stops before
    the next (no checkpoint claims an epoch it did not finish); during the sanity check: at
    once, nothing trained; a second SIGINT: at once. Each exits 130 with one line; a run that
    saved nothing leaves no folder."""
    monkeypatch.chdir(tmp_path)
    assert fit("--config", QUICKSTART, *SHORT, *where) == 130
    assert said in one_line(capsys.readouterr().err)
    runs = tmp_path / "runs" / "quickstart"
    if "after epoch" in said:
        saved = read_checkpoint(runs / "version_0" / "checkpoints" / "last.ckpt")
        assert (saved["epoch"], saved["global_step"]) == (0, 21)
    else:
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_evaluating_exits_128_plus_it_with_one_line(
    tmp_path, monkeypatch, capsys, subcommand, signum
) -> None:
    """Ctrl+C (130) or SIGTERM (143) during ``vaeflow test``, ``validate`` or ``predict`` (whose
    Lightning loop went on to the end after SIGTERM, exit 0); no new folder."""
    monkeypatch.chdir(tmp_path)
    assert fit("--config", QUICKSTART, *SHORT, "--trainer.max_steps", "1") == 0
    capsys.readouterr()
    hook = {"validate": "on_validation_batch_end"}.get(subcommand, f"on_{subcommand}_batch_end")
    stop_at = signal_at(hook, signum=signum)
    with pytest.raises(SystemExit) as stop:
        main([subcommand, "--config", QUICKSTART, *SHORT, *stop_at, "--ckpt_path", "last"])
    assert stop.value.code == 128 + signum
    said = one_line(capsys.readouterr().err)
    assert said.endswith(f"interrupted by {signum.name}; nothing was saved"), said
    assert [run.name for run in (tmp_path / "runs" / "quickstart").iterdir()] == ["version_0"]


def test_sigint_at_start_up_exits_130_with_one_line(tmp_path) -> None:
    command = [sys.executable, "-m", "vaeflow", "fit", "--config", QUICKSTART]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    # interrupt while torch is being imported (a fixed sleep raced the interpreter's own
    # start-up on a loaded machine, before Python handles SIGINT at all)
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    while "torch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert one_line(err).splitlines()[-1].startswith("vaeflow: interrupted by SIGINT")


def test_a_killed_saves_temporary_file_is_removed_at_the_next_start(tmp_path) -> None:
    """``.last.ckpt.<pid>.tmp`` of a process that is gone (SIGKILL while saving) is removed
    when the next run claims its folder; a live process's file stays."""
    checkpoints = tmp_path / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = checkpoints / f".last.ckpt.{int(gone.stdout)}.tmp"
    live = checkpoints / f".last.ckpt.{os.getpid()}.tmp"
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()
