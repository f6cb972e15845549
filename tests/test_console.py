"""What `vaeflow fit` prints: lines about the run only, ending with where it went and what it
reached."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: The kinds of line a quickstart run may print (progress bar off).
ALLOWED = (
    r"Seed set to \d+",
    r"part +type +parameters",  # the model summary
    r"\w+ +\w+ +[\d.]+ ?[KMB]?",
    r"[\d.]+ ?[KMB]? trainable parameters of [\d.]+ ?[KMB]? \([\d.]+ MB\)",
    r"`Trainer\.fit` stopped: `max_epochs=\d+` reached\.",
    r"run folder: .+",
    r"best checkpoint: .+\.ckpt",
    r"last checkpoint: .+last\.ckpt",
    r"final metrics: .+",
)
#: What test, validate and predict print beyond the run folder and final metrics: the
#: checkpoint they read, the table of metrics (rich's box characters) and predict's file.
ALLOWED_EVALUATION = (
    r"Seed set to \d+",
    r"Restoring states from the checkpoint path at .+last\.ckpt",
    r"Loaded model weights from the checkpoint at .+last\.ckpt",
    r"[┏┡└][━┳╇┻┴─┬┼]+[┓┩┘]",
    r"[┃│] +(Test|Validate) metric +[┃│] +DataLoader 0 +[┃│]",
    r"│ +(test|val)/\w+ +│ +-?[\d.e-]+ +│",
    r"run folder: .+",
    r"checkpoint: runs/quickstart/version_0/checkpoints/last\.ckpt",
    r"predictions: runs/quickstart/version_\d/latents\.pt",
    r"final metrics: .+",
)
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def printed_lines(args: list[str], cwd: Path) -> tuple[list[str], list[str]]:
    """All non-empty lines a run printed, and its standard output's (the closing lines)."""
    result = subprocess.run(
        [sys.executable, "-m", "vaeflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines, result.stdout.splitlines()


def unexpected(lines: list[str], allowed: tuple[str, ...]) -> str:
    return "\n".join(line for line in lines if not any(re.fullmatch(p, line) for p in allowed))


def test_every_subcommand_prints_only_lines_about_the_run(tmp_path: Path) -> None:
    """fit, then test, validate and predict of its last checkpoint: each ends with its run
    folder, the checkpoints it wrote or read, its final metrics and predict's file."""
    quiet = ["--config", QUICKSTART, "--trainer.enable_progress_bar", "false"]
    lines, stdout = printed_lines(["fit", *quiet, "--trainer.max_epochs", "2"], tmp_path)
    assert not unexpected(lines, ALLOWED)
    closing = stdout[-4:]  # printed last (the log lines go to stderr)
    assert closing[0] == "run folder: runs/quickstart/version_0"
    assert closing[1].startswith("best checkpoint: runs/quickstart/version_0/checkpoints/")
    assert closing[2] == "last checkpoint: runs/quickstart/version_0/checkpoints/last.ckpt"
    assert re.search(r"val/elbo -\d+\.\d{4}", closing[3])
    last = "runs/quickstart/version_0/checkpoints/last.ckpt"
    for version, (subcommand, metric) in enumerate(
        [("test", "test/elbo"), ("validate", "val/elbo"), ("predict", None)], start=1
    ):
        lines, stdout = printed_lines([subcommand, *quiet, "--ckpt_path", last], tmp_path)
        assert not unexpected(lines, ALLOWED_EVALUATION), subcommand
        folder = f"runs/quickstart/version_{version}"
        assert stdout[stdout.index(f"run folder: {folder}") + 1] == f"checkpoint: {last}"
        if metric is None:
            assert stdout[-1] == f"predictions: {folder}/latents.pt"
            assert (tmp_path / folder / "latents.pt").is_file()
        else:
            assert re.search(rf"{metric} -\d+\.\d{{4}}", stdout[-1]), stdout[-1]


def test_the_progress_bar_shows_the_training_objective(tmp_path: Path) -> None:
    """The VAE's running ELBO beside the step count; factor analysis's EM iteration and
    log-likelihood (tqdm redraws its line with carriage returns; Lightning sends it to
    standard output)."""
    no_checkpoints = ["--trainer.enable_checkpointing", "false"]
    quickstart = ["fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", *no_checkpoints]
    _, stdout = printed_lines(quickstart, tmp_path)
    assert re.search(r"Epoch 0: 100%.*elbo=-\d+\.\d", "\n".join(stdout))
    fa = str(REPO / "configs" / "ppca_digits.yaml")
    _, stdout = printed_lines(["fit", "--config", fa, *no_checkpoints], tmp_path)
    assert re.search(r"EM iteration=\d+, log_likelihood=\d+\.\d+", "\n".join(stdout))


def vaeflow(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaeflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )


def test_a_model_without_data_is_a_message(tmp_path: Path) -> None:
    result = vaeflow(["fit", "--model", "VAE"], tmp_path, **os.environ)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "vaeflow: error: no data: give a data module, e.g. --data DigitsDataModule" in (
        result.stderr
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml"))


def test_weights_and_biases_without_an_account_is_a_message(tmp_path: Path) -> None:
    """configs/logging/wandb.yaml with no API key and no WANDB_MODE: log in, or go offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    config = str(REPO / "configs" / "quickstart.yaml")
    logging = str(REPO / "configs" / "logging" / "wandb.yaml")
    args = ["fit", "--config", config, "--config", logging, "--trainer.max_epochs", "1"]
    result = vaeflow(args, tmp_path, **{**env, "HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "vaeflow: error: Weights & Biases needs an account" in result.stderr
    assert "WANDB_MODE=offline" in result.stderr


def test_a_missing_optional_package_names_its_extra() -> None:
    """Lightning's TensorBoard logger without tensorboard installed says so in its message."""
    from vaeflow.user_errors import explain

    error = ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available.")
    assert explain(RuntimeError("while building the logger")) is None
    wrapped = RuntimeError("while building the logger")
    wrapped.__cause__ = error
    assert explain(wrapped) == (
        'this config needs a package that is not installed: pip install "vaeflow[tensorboard]"'
    )


def test_a_loaded_model_takes_what_users_hold_and_is_ready_for_inference(tmp_path: Path) -> None:
    """The README's snippet: load_from_checkpoint, then float64 tensors and NumPy arrays in,
    ``.numpy()`` out, without torch.no_grad (eval mode builds no graph)."""
    import numpy as np
    import torch
    from lightning.pytorch import Trainer

    from vaeflow.data import DigitsDataModule
    from vaeflow.models import VAE, FactorAnalysis

    data = DigitsDataModule(batch_size=256)
    for model in (VAE(data.dims, latent_dim=2), FactorAnalysis(data.dims, latent_dim=3)):
        trainer = Trainer(
            max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False
        )
        trainer.fit(model, data)
        path = tmp_path / f"{type(model).__name__}.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path)
        assert not loaded.training
        x = np.random.default_rng(0).random((5, 64))  # float64 NumPy
        if isinstance(loaded, VAE):
            codes = loaded.encode(x).mean.numpy()
            bound = loaded.elbo(torch.from_numpy(x)).numpy()
            assert codes.shape == (5, 2) and bound.shape == (5,)
        else:
            means, _ = loaded.posterior(x)
            assert means.numpy().shape == (5, 3)
            assert loaded.log_likelihood(x).numpy().shape == (5,)


def test_a_long_evaluation_shows_its_importance_samples(silent_trainer, capsys, monkeypatch):
    """An importance-weighted evaluation of minutes per batch shows how many of its samples
    are done, not a batch count that stands still: here 8 examples of 64 values take 2,048
    samples per chunk (:func:`~vaeflow.models.vae.samples_per_chunk`), so 6,144 samples take
    three chunks, each shown; outside the evaluation the model reports to nothing."""
    from torch.utils.data import DataLoader

    from vaeflow.console import ProgressBar
    from vaeflow.models import VAE
    from vaeflow.models.vae import samples_per_chunk

    monkeypatch.setattr(ProgressBar, "SAMPLES_REDRAW_SECONDS", 0.0)
    torch.manual_seed(0)
    model = VAE((64,), 2, eval_samples=6144)
    data = DataLoader(torch.rand(8, 64).round(), batch_size=8)
    assert samples_per_chunk(8, model.likelihood.num_outputs, torch.device("cpu")) == 2048
    trainer = silent_trainer(enable_progress_bar=True, callbacks=[ProgressBar()])
    trainer.test(model, data, verbose=False)
    printed = "".join(capsys.readouterr())
    shown = re.findall(r"importance samples ([\d,]+)/6,144", printed)
    assert shown[:3] == ["2,048", "4,096", "6,144"], printed
    assert model.sample_progress is None
