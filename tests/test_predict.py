"""``vaeflow predict`` after ``vaeflow fit``, for every model: the latent codes written are the
reloaded model's posterior means of the configured data's prediction split, in order, and
what else the model adds (the posterior covariance of factor analysis)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from vaeflow.cli import VaeflowCLI, main
from vaeflow.models import VAE, FactorAnalysis

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("config", "model_class", "expected", "overrides"),
    [
        (
            "quickstart.yaml",
            VAE,
            lambda model, x: {"latents": model.encode(x).mean},
            ["--trainer.max_epochs=1"],
        ),
        (  # a flow's codes are the mean of MEAN_SAMPLES samples, the same in any batch
            "quickstart.yaml",
            VAE,
            lambda model, x: {
                "latents": model.encode(x).mean,
                "latent_mean_samples": torch.tensor(model.posterior.mean_samples),
            },
            ["--trainer.max_epochs=1", "--model.init_args.posterior=iaf"],
        ),
        (
            "fa_synthetic.yaml",
            FactorAnalysis,
            lambda model, x: dict(
                zip(("latents", "covariance"), model.posterior(x), strict=True),
                scores=model.factor_scores(x),
            ),
            [],
        ),
    ],
    ids=["VAE", "VAE-iaf", "FactorAnalysis"],
)
def test_predict_writes_the_latent_codes_of_the_fitted_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    model_class: type[LightningModule],
    expected: Callable[[LightningModule, Tensor], dict[str, Tensor]],
    overrides: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / config)
    main(["fit", "--config", config, "--trainer.enable_progress_bar=false", *overrides])
    (checkpoint,) = (tmp_path / "runs").rglob("epoch=*.ckpt")  # the best (last.ckpt beside it)
    main(["predict", "--config", config, "--ckpt_path", str(checkpoint)])
    (written,) = (tmp_path / "runs").rglob("latents.pt")
    record = torch.load(written)
    data = VaeflowCLI(args=["--config", config], run=False).datamodule
    data.setup("predict")
    x = torch.cat(list(data.predict_dataloader()))
    model = model_class.load_from_checkpoint(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(record, expected(model, x))


def test_predict_without_a_test_split_takes_the_training_file(tmp_path, monkeypatch, capsys):
    """Factor analysis on a user's file with no test split: ``predict`` writes the codes of
    every row of the file (val_fraction 0, the model's default), in the file's order, into a
    folder it prints; a refused predict (no checkpoint) leaves no folder."""
    monkeypatch.chdir(tmp_path)
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.save(x, tmp_path / "rows.pt")
    args = ["--model", "FactorAnalysis", "--model.latent_dim", "2", "--data", "ArrayDataModule"]
    args += ["--data.path", "rows.pt", "--trainer.enable_progress_bar", "false"]
    main(["fit", *args])
    last = tmp_path / "runs" / "vaeflow" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["predict", *args, "--ckpt_path", str(last)])
    assert "run folder: runs/vaeflow/version_1" in capsys.readouterr().out
    record = torch.load(tmp_path / "runs" / "vaeflow" / "version_1" / "latents.pt")
    model = FactorAnalysis.load_from_checkpoint(last)
    torch.testing.assert_close(record["latents"], model.posterior(x)[0])
    with pytest.raises(SystemExit):
        main(["predict", *args, "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert sorted(p.name for p in (tmp_path / "runs" / "vaeflow").iterdir()) == [
        "version_0",
        "version_1",
    ]
