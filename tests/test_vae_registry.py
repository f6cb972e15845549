"""Every registered likelihood with every registered prior: a VAE trains a step, checkpoints
and reloads alone (generated from the registries, so a new family is tested the day it is
registered)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vaeflow.models import VAE
from vaeflow.registry import LIKELIHOODS, PRIORS

INPUT_SHAPE = (12,)
#: constructor arguments that keep a registered family small in a test
SMALL = {"vamp": {"components": 3}, "mixture_of_gaussians": {"components": 2}}


def data_for(model: VAE) -> torch.Tensor:
    """Data in the likelihood's support: draws from it at random decoder outputs."""
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(32, model.likelihood.num_outputs, generator=generator)
    return model.likelihood(outputs).sample().float()


@pytest.mark.parametrize("prior", PRIORS.names())
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_every_likelihood_with_every_prior_trains_checkpoints_and_reloads(
    silent_trainer, tmp_path, likelihood: str, prior: str
) -> None:
    pl.seed_everything(0)
    model = VAE(
        INPUT_SHAPE,
        latent_dim=2,
        likelihood=LIKELIHOODS.build(likelihood, **SMALL.get(likelihood, {})),
        prior=PRIORS.build(prior, **SMALL.get(prior, {})),
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = silent_trainer(max_steps=1)
    trainer.fit(model, DataLoader(data_for(model), batch_size=16))
    assert trainer.global_step == 1
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = VAE.load_from_checkpoint(path)
    assert type(reloaded.likelihood) is type(model.likelihood)
    assert type(reloaded.prior) is type(model.prior)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    x = data_for(model)[:4]
    torch.manual_seed(1)
    expected = model.elbo(x)
    torch.manual_seed(1)
    torch.testing.assert_close(reloaded.elbo(x), expected)
