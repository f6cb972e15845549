"""Several steps per call of Lightning's training step: the steps, batches, metrics and resumes
of one step per call, the settings that count calls refused, Lightning's notices hidden only
around a fit that uses it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from vaeflow.cli import main
from vaeflow.data import DigitsDataModule
from vaeflow.errors import ConfigError
from vaeflow.lightning_private import DATALOADER_ITER_NOTICES, logged_steps
from vaeflow.models import VAE

REPO = Path(__file__).resolve().parents[1]


def fit_digits(
    silent_trainer: Callable[..., pl.Trainer],
    root: Path,
    steps_per_call: int,
    training: str,
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> tuple[VAE, pl.Trainer]:
    """A small VAE fitted on dynamically binarised digits (21 batches of 64 per epoch), its
    metrics written to ``root/csv/version_0/metrics.csv``."""
    pl.seed_everything(0)
    model = VAE((64,), latent_dim=3, training=training, steps_per_call=steps_per_call)
    logger = CSVLogger(root, name="csv", version=0)
    trainer = silent_trainer(
        default_root_dir=root, logger=logger, log_every_n_steps=5, **trainer_kwargs
    )
    trainer.fit(model, DigitsDataModule(batch_size=64, binarize="dynamic"), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize(
    ("training", "trainer_kwargs"),
    [
        ("joint", {"max_epochs": 2}),  # 21 batches: the epoch ends inside a call of 4
        ("joint", {"max_epochs": 2, "max_steps": 7}),  # max_steps inside a call
        ("alternating", {"max_epochs": 1, "limit_train_batches": 6}),
        ("joint", {"max_epochs": 1, "precision": "bf16-mixed"}),  # steps inside autocast
    ],
)
def test_several_steps_per_call_take_the_steps_of_one(
    silent_trainer, tmp_path, training, trainer_kwargs
) -> None:
    """Same batches, noise, steps and metrics: only Lightning's calls are grouped."""
    one, one_trainer = fit_digits(silent_trainer, tmp_path / "one", 1, training, **trainer_kwargs)
    four, four_trainer = fit_digits(
        silent_trainer, tmp_path / "four", 4, training, **trainer_kwargs
    )
    assert four_trainer.global_step == one_trainer.global_step > 0
    assert "train/elbo" in one_trainer.callback_metrics
    assert four_trainer.fit_loop.epoch_loop.batch_progress.current.ready < (
        one_trainer.fit_loop.epoch_loop.batch_progress.current.ready
    )  # fewer calls
    for key, value in one.state_dict().items():
        torch.testing.assert_close(four.state_dict()[key], value, rtol=0, atol=0)
    assert four_trainer.callback_metrics == one_trainer.callback_metrics
    # the same metrics file: same values at the same steps (the x-axis counts batches)
    csv = Path("csv/version_0/metrics.csv")
    assert (tmp_path / "four" / csv).read_text() == (tmp_path / "one" / csv).read_text()


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {"val_check_interval": 5},
        {"val_check_interval": 0.5},
        {"enable_checkpointing": True, "callbacks": [ModelCheckpoint(every_n_train_steps=10)]},
    ],
)
def test_several_steps_per_call_refuse_what_counts_calls(
    silent_trainer, tmp_path, trainer_kwargs
) -> None:
    with pytest.raises(ConfigError, match="steps_per_call: 1"):
        fit_digits(silent_trainer, tmp_path, 4, "joint", **trainer_kwargs)


def test_several_steps_per_call_run_the_batch_transfer_hooks_of_the_data(silent_trainer) -> None:
    class CountingDigits(DigitsDataModule):
        moved = 0

        def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int):
            self.moved += self.trainer.training
            return batch

    data = CountingDigits(batch_size=64)
    model = VAE((64,), latent_dim=2, steps_per_call=4)
    silent_trainer(limit_train_batches=6).fit(model, data)
    assert data.moved == 6


def test_several_steps_per_call_resume_from_a_checkpoint(silent_trainer, tmp_path) -> None:
    _, first = fit_digits(
        silent_trainer, tmp_path / "first", 4, "joint", max_epochs=1, enable_checkpointing=True
    )
    path = first.checkpoint_callback.best_model_path
    _, trainer = fit_digits(
        silent_trainer, tmp_path / "resumed", 4, "joint", ckpt_path=path, max_epochs=2
    )
    assert trainer.global_step == 2 * 21
    assert logged_steps(trainer) == 2 * 21


def test_several_steps_per_call_validate_on_a_time_interval(silent_trainer, tmp_path) -> None:
    _, trainer = fit_digits(
        silent_trainer, tmp_path, 4, "joint", max_epochs=1, val_check_interval="00:00:10:00"
    )
    assert "val/elbo" in trainer.callback_metrics


def test_vaeflow_fit_hides_the_step_flavour_notices_during_the_fit_only(
    tmp_path, monkeypatch
) -> None:
    """``vaeflow fit`` with several steps per call prints none of Lightning's notices about its
    experimental step, nor one about the VAE's batch transfer, and leaves the process's
    warning filters as they were."""
    monkeypatch.chdir(tmp_path)
    filters = list(warnings.filters)
    config = str(REPO / "configs" / "quickstart.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "fit",
                "--config",
                config,
                "--model.init_args.steps_per_call=4",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=8",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
            ]
        )
    messages = [str(w.message) for w in caught]
    assert (tmp_path / "runs").is_dir()  # the fit ran
    assert not [m for m in messages if m.startswith(DATALOADER_ITER_NOTICES)]
    assert not [m for m in messages if "transfer_batch_to_device" in m]
    assert warnings.filters == filters
