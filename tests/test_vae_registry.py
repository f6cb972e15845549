"""Every registered likelihood with every registered prior, and every registered net as encoder
and decoder: a VAE trains a step, checkpoints and reloads alone (generated from the registries,
so a new family or net is tested the day it is registered)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vaeflow.errors import ConfigError
from vaeflow.models import VAE
from vaeflow.registry import LIKELIHOODS, NETS, PRIORS

INPUT_SHAPE = (12,)
#: constructor arguments that keep a registered family small in a test
SMALL = {"vamp": {"components": 3}, "mixture_of_gaussians": {"components": 2}}


def data_for(model: VAE) -> torch.Tensor:
    """Data in the likelihood's support: draws from it at random decoder outputs."""
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(32, model.likelihood.num_outputs, generator=generator)
    return model.likelihood(outputs).sample().float().reshape(32, *model.input_shape)


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
    assert_trains_checkpoints_and_reloads(model, silent_trainer, tmp_path)
    assert type(VAE.load_from_checkpoint(tmp_path / "model.ckpt").prior) is type(model.prior)


#: images small enough for a quick step, with sides a convolutional net can halve twice
IMAGE = (1, 8, 8)


@pytest.mark.parametrize("name", NETS.names())
def test_every_net_serves_as_encoder_or_decoder_trains_checkpoints_and_reloads(
    silent_trainer, tmp_path, name: str
) -> None:
    """In each role a net either refuses at construction with a ConfigError (a convolutional
    encoder cannot decode a latent code into an image) or trains, checkpoints and reloads;
    every net serves at least one role."""
    served = []
    for role in ("encoder", "decoder"):
        pl.seed_everything(0)
        try:
            model = VAE(IMAGE, latent_dim=3, **{role: name})
        except ConfigError:
            continue
        served.append(role)
        assert_trains_checkpoints_and_reloads(model, silent_trainer, tmp_path)
    assert served, f"net {name!r} serves neither as encoder nor as decoder"


@pytest.mark.parametrize("name", NETS.names())
def test_every_net_takes_a_condition_in_every_role_it_serves(
    silent_trainer, tmp_path, name: str
) -> None:
    """A conditional VAE (condition_dim 3) with the net as encoder or decoder trains on
    (examples, conditions) batches, checkpoints and reloads; its decoder's outputs depend on
    the condition. The net itself is not changed: the condition is appended to its input."""
    served = []
    for role in ("encoder", "decoder"):
        pl.seed_everything(0)
        try:
            model = VAE(IMAGE, latent_dim=3, condition_dim=3, **{role: name})
        except ConfigError:
            continue
        served.append(role)
        assert_trains_checkpoints_and_reloads(model, silent_trainer, tmp_path)
        z = torch.randn(2, 3)
        one, other = (torch.eye(3)[[k, k]] for k in (0, 2))
        assert not torch.allclose(model.decoder_outputs(z, one), model.decoder_outputs(z, other))
    assert served, f"net {name!r} serves neither as encoder nor as decoder"


def assert_trains_checkpoints_and_reloads(model: VAE, silent_trainer, tmp_path) -> None:
    """One training step changes the parameters; the checkpoint reloads alone to the same
    parameters and the same ELBO under the same random draws. A conditional model gets
    batches of (examples, one-hot conditions)."""
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = silent_trainer(max_steps=1)
    x = data_for(model)
    classes = torch.arange(len(x)) % max(model.condition_dim, 1)
    condition = torch.eye(model.condition_dim)[classes] if model.condition_dim else None
    data = TensorDataset(x) if condition is None else TensorDataset(x, condition)
    trainer.fit(model, DataLoader(data, batch_size=16))
    assert trainer.global_step == 1
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = VAE.load_from_checkpoint(path)
    assert type(reloaded.likelihood) is type(model.likelihood)
    assert type(reloaded.encoder) is type(model.encoder)
    assert type(reloaded.decoder) is type(model.decoder)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    condition = None if condition is None else condition[:4]
    torch.manual_seed(1)
    expected = model.elbo(x[:4], condition=condition)
    torch.manual_seed(1)
    torch.testing.assert_close(reloaded.elbo(x[:4], condition=condition), expected)
