"""Write ``tests/data/checkpoints/``: a tiny checkpoint of every model, and of a VAE with each
registered likelihood, prior and posterior, with the numbers each gives
(``expected.json``), as this release writes them.

Run it after a change of checkpoint format, and after registering a family
(``python tests/make_checkpoint_fixtures.py``): it writes only what the current format's folder
lacks, never overwriting. ``tests/test_checkpoint_fixtures.py`` checks that every later vaeflow
loads the files of every earlier format and gives the same numbers. Never regenerate a file:
it stands for the checkpoints users keep.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from conftest import SILENT_TRAINER
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from vaeflow.checkpointing import FORMAT, AtomicCheckpointIO
from vaeflow.data import SyntheticFADataModule
from vaeflow.models import VAE, BayesianFactorAnalysis, FactorAnalysis, MixtureOfFactorAnalyzers
from vaeflow.nets import MLP
from vaeflow.registry import LIKELIHOODS, POSTERIORS, PRIORS

FOLDER = Path(__file__).resolve().parent / "data" / "checkpoints" / f"format_{FORMAT}"
#: examples of 4 values, latent codes of 2: a few kilobytes per checkpoint
DIM, LATENT = 4, 2
#: constructor arguments that keep a family small
SMALL: dict[str, dict[str, Any]] = {
    "vamp": {"components": 2},
    "mixture_of_gaussians": {"components": 2},
    "iaf": {"hidden": (4,), "context": 2},
    "planar": {"num_flows": 2},
}
NET = functools.partial(MLP, hidden=(4,))


def vaes() -> dict[str, VAE]:
    """A VAE for each registered family, the other parts at their defaults."""
    found = {}
    for kind, registry in (("likelihood", LIKELIHOODS), ("prior", PRIORS)):
        for name in registry.names():
            family = registry.build(name, **SMALL.get(name, {}))
            found[f"vae_{kind}_{name}"] = VAE(
                (DIM,), LATENT, encoder=NET, decoder=NET, **{kind: family}
            )
    for name in POSTERIORS.names():
        posterior = POSTERIORS.build(name, **SMALL.get(name, {}))
        found[f"vae_posterior_{name}"] = VAE(
            (DIM,), LATENT, encoder=NET, decoder=NET, posterior=posterior
        )
    return found


def em_models() -> dict[str, LightningModule]:
    return {
        "factor_analysis": FactorAnalysis(latent_dim=LATENT, max_iter=3),
        "ppca": FactorAnalysis(latent_dim=LATENT, noise="isotropic", max_iter=3),
        "bayesian_factor_analysis": BayesianFactorAnalysis(latent_dim=LATENT, max_iter=3),
        "mixture_of_factor_analyzers": MixtureOfFactorAnalyzers(
            num_components=2, latent_dim=1, max_iter=3
        ),
    }


def vae_data(model: VAE) -> torch.Tensor:
    """16 examples in the likelihood's support."""
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(16, model.likelihood.num_outputs, generator=generator)
    return model.likelihood(outputs).sample().float().reshape(16, DIM)


def numbers(model: LightningModule, x: torch.Tensor) -> dict[str, list[float]]:
    """What the fixture test compares: the VAE's decoder means at fixed codes and its ELBO
    under seed 1; the EM models' exact log-likelihood."""
    with torch.no_grad():
        if isinstance(model, VAE):
            z = torch.linspace(-1, 1, 2 * LATENT).reshape(2, LATENT)
            torch.manual_seed(1)
            elbo = model.elbo(x)
            return {"decoded": model.decode(z).mean.flatten().tolist(), "elbo": elbo.tolist()}
        return {"log_likelihood": model.log_likelihood(x).tolist()}


def trainer() -> pl.Trainer:
    return pl.Trainer(**{**SILENT_TRAINER, "max_epochs": 3}, plugins=[AtomicCheckpointIO()])


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    record = FOLDER / "expected.json"
    expected = json.loads(record.read_text()) if record.exists() else {}
    for name, model in {**vaes(), **em_models()}.items():
        if name in expected or (FOLDER / f"{name}.ckpt").exists():
            continue  # written by an earlier run: kept as it is
        pl.seed_everything(0)
        fit = trainer()
        if isinstance(model, VAE):
            x = vae_data(model)
            fit.fit(model, DataLoader(x, batch_size=8))
        else:
            data = SyntheticFADataModule(
                num_train=64, num_test=8, dim=DIM, latent_dim=LATENT, val_fraction=0.0
            )
            fit.fit(model, datamodule=data)
            x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fit.save_checkpoint(FOLDER / f"{name}.ckpt")
        model.eval()
        expected[name] = {"class": type(model).__name__, "x": x.tolist(), **numbers(model, x)}
    record.write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
