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
            lambda model, x: {"latents": model.encode(x).mean},
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
