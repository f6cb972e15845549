"""Everything vaeflow relies on beyond Lightning's public API (vaeflow/lightning_private.py),
checked against the installed Lightning: a failure here means a Lightning release changed it,
and that module (and its pin in pyproject.toml) needs mending before the pin moves."""

from __future__ import annotations

import csv
import inspect
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from torch.utils.data import DataLoader

from vaeflow import lightning_private
from vaeflow.steps_per_call import SteppedModule

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_lightning_is_one_this_plumbing_was_checked_on() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in dependencies if Requirement(d).name == "lightning"]
    assert pin.specifier == SpecifierSet(lightning_private.VERIFIED)
    assert any(spec.operator == "<" for spec in pin.specifier)  # an upper bound
    assert lightning.__version__ in pin.specifier


class Ones(LightningModule):
    """One parameter, a batch per step; optionally moves the loggers' step on at its first."""

    def __init__(self, extra_steps: int = 0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.extra_steps = extra_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            lightning_private.add_logged_steps(self.trainer, self.extra_steps)
        loss = (self.weight - batch).pow(2).mean()
        self.log("loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def logged_at(silent_trainer, root: Path, extra_steps: int) -> list[int]:
    """The steps at which the logger recorded the loss over 4 batches."""
    trainer = silent_trainer(logger=CSVLogger(root, name="", version=0), log_every_n_steps=1)
    trainer.fit(Ones(extra_steps), DataLoader(torch.ones(4, 1)))
    assert lightning_private.logged_steps(trainer) == 4 + extra_steps
    with (root / "version_0" / "metrics.csv").open() as file:
        return [int(row["step"]) for row in csv.DictReader(file)]


def test_the_loggers_step_is_counted_where_this_plumbing_moves_it(silent_trainer, tmp_path) -> None:
    plain = logged_at(silent_trainer, tmp_path / "plain", 0)
    moved = logged_at(silent_trainer, tmp_path / "moved", 10)
    assert len(plain) == 4
    assert moved == [step + 10 for step in plain]


def test_the_step_interval_of_a_checkpoint_callback() -> None:
    assert lightning_private.every_n_train_steps(ModelCheckpoint(every_n_train_steps=7)) == 7
    assert lightning_private.every_n_train_steps(ModelCheckpoint()) == 0
    by_time = ModelCheckpoint(train_time_interval=timedelta(minutes=5))
    assert lightning_private.every_n_train_steps(by_time) == 0


def test_before_batch_transfer_runs_the_data_modules_hook(silent_trainer) -> None:
    class Shifted(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.zeros(2, 1))

        def on_before_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int):
            return batch + 5

    class Seen(Ones):
        seen: list[torch.Tensor] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen.append(lightning_private.before_batch_transfer(self, batch))
            return super().training_step(batch, batch_idx)

    silent_trainer().fit(Seen(), datamodule=Shifted())
    # Lightning's loop has run the hook once (5), the plumbing once more (10)
    assert [batch.item() for batch in Seen.seen] == [10.0, 10.0]


class TwoStepsPerCall(SteppedModule):
    def __init__(self) -> None:
        super().__init__(steps_per_call=2)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_on_batch(self, batch: torch.Tensor) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.weight - batch).pow(2).mean())
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_with_several_steps_per_call(silent_trainer) -> None:
    silent_trainer().fit(TwoStepsPerCall(), DataLoader(torch.ones(4, 1)))


def test_the_step_flavour_notices_are_lightnings_and_hidden_in_the_block_only(
    silent_trainer,
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_with_several_steps_per_call(silent_trainer)
        with lightning_private.dataloader_iter_notices_silenced():
            fit_with_several_steps_per_call(silent_trainer)
    messages = [str(w.message) for w in caught]
    for notice in lightning_private.DATALOADER_ITER_NOTICES:
        assert sum(m.startswith(notice) for m in messages) == 1, notice  # the first fit's


def test_lightning_asks_for_the_nvml_cuda_check_and_vaeflow_keeps_it_on_import() -> None:
    """Lightning sets the variable on import (else the workaround has nothing to do); importing
    vaeflow changes no environment variable (scikit-learn, imported first, sets one of its own)."""
    code = (
        "import os, lightning, sklearn; before = dict(os.environ); "
        "import vaeflow.cli, vaeflow.models; "
        f"print(before.get({lightning_private.NVML_CHECK!r}), dict(os.environ) == before)"
    )
    env = {k: v for k, v in os.environ.items() if k != lightning_private.NVML_CHECK}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.split() == ["1", "True"]


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_nvml_cuda_check_is_dropped_only_without_a_gpu(monkeypatch, gpus: int) -> None:
    """Lightning's NVML-based availability check re-opens NVML at every Adam step when there is
    no GPU; it is kept where a GPU could be initialised by mistake."""
    monkeypatch.setenv(lightning_private.NVML_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    lightning_private.plain_cuda_check_without_gpu()
    assert (lightning_private.NVML_CHECK in os.environ) == bool(gpus)


def test_the_spawn_launcher_is_configured_and_called_as_this_plumbing_expects() -> None:
    """:class:`~vaeflow.lightning_private.SpawnSkippingFinalisation` replaces the launcher that
    ``DDPStrategy._configure_launcher`` builds and wraps its worker entry point; the DDP tests
    run it."""
    assert "_configure_launcher" in vars(DDPStrategy)
    parameters = list(inspect.signature(_MultiProcessingLauncher._wrapping_function).parameters)
    assert parameters == [
        "self",
        "process_idx",
        "trainer",
        "function",
        "args",
        "kwargs",
        "return_queue",
        "global_states",
    ]
    strategy = lightning_private.SpawnSkippingFinalisation()
    assert strategy._start_method == "spawn"


def test_jsonargparse_keeps_the_actions_and_the_known_subclasses_help() -> None:
    """The help of an option typed with a class ends with the known subclasses, which
    vaeflow's help replaces by registered names (vaeflow/cli_parser.py)."""
    from jsonargparse import ArgumentParser

    from vaeflow.likelihoods import GaussianLikelihood, Likelihood

    parser = ArgumentParser()
    parser.add_argument("--likelihood", type=Likelihood | str, default="bernoulli")
    (action,) = [a for a in lightning_private.parser_actions(parser) if a.dest == "likelihood"]
    extra = lightning_private.known_subclasses_help(action)
    assert extra.startswith(", known subclasses: ")
    assert f"{GaussianLikelihood.__module__}.GaussianLikelihood" in extra
    # the list's start: test modules' own subclasses (test_plugin_contract) may follow
    assert " ".join(extra.split())[:120] in " ".join(parser.format_help().split())
    (help_action,) = [a for a in lightning_private.parser_actions(parser) if a.dest == "help"]
    assert lightning_private.known_subclasses_help(help_action) == ""
