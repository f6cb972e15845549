"""Conditional VAEs: the condition appended to any net's input, the data modules' (examples,
one-hot labels) batches, sampling and predicting under a chosen condition, and clear errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaeflow.data import ArrayDataModule, DigitsDataModule
from vaeflow.errors import ConfigError, DataError
from vaeflow.models import VAE
from vaeflow.nets import append_condition


def test_the_condition_is_appended_as_features_or_constant_channels() -> None:
    """A vector gets K more features; an image K more channels, each constant over the pixels
    and equal to the condition; leading sample dimensions broadcast."""
    condition = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    vectors = torch.randn(2, 5)
    torch.testing.assert_close(
        append_condition(vectors, condition, 1), torch.cat([vectors, condition], 1)
    )
    images = torch.randn(4, 2, 1, 3, 3)  # samples, examples, channels, height, width
    widened = append_condition(images, condition, 3)
    assert widened.shape == (4, 2, 3, 3, 3)
    torch.testing.assert_close(widened[:, :, :1], images)
    expected = condition[None, :, :, None, None].expand(4, 2, 2, 3, 3)
    torch.testing.assert_close(widened[:, :, 1:], expected)


def test_digits_batches_pair_each_example_with_its_one_hot_label() -> None:
    data = DigitsDataModule(batch_size=50, condition="labels", shuffle=False)
    data.setup()
    assert data.condition_dim == 10
    x, condition = next(iter(data.train_dataloader()))
    torch.testing.assert_close(x, data.splits["train"][:50])
    expected = F.one_hot(data.labels("train")[:50].long(), 10).float()
    torch.testing.assert_close(condition, expected)
    plain = DigitsDataModule(batch_size=50)
    assert plain.condition_dim == 0
    assert isinstance(next(iter(plain.train_dataloader())), torch.Tensor)


def test_data_without_labels_cannot_give_a_condition(tmp_path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((20, 3)))
    with pytest.raises(DataError, match="no class labels to condition on"):
        ArrayDataModule(path=str(path), condition="labels").condition_dim  # noqa: B018


def test_sampling_and_predicting_under_a_chosen_condition() -> None:
    """``sample`` cycles through the classes without a condition and takes one row or n rows;
    ``predict_condition`` decodes each code under the chosen class, as ``decode`` does."""
    torch.manual_seed(0)
    model = VAE((6,), latent_dim=2, condition_dim=3, predict_condition=2).eval()
    torch.manual_seed(1)
    cycled = model.sample(6, mean=True)
    torch.manual_seed(1)
    z = model.prior().sample((6,))
    classes = F.one_hot(torch.arange(6) % 3, 3).float()
    torch.testing.assert_close(cycled, model.decode(z, condition=classes).mean)
    assert model.sample(4, condition=torch.eye(3)[1]).shape == (4, 6)
    assert model.sample(2, condition=torch.eye(3)[[0, 1]]).shape == (2, 6)
    x = torch.rand(5, 6).round()
    own = torch.eye(3)[[0, 1, 0, 1, 0]]
    predictions = model.predict_step((x, own), 0)
    codes = model.encode(x, own).mean
    torch.testing.assert_close(predictions["latents"], codes)
    expected = model.decode(codes, condition=torch.eye(3)[[2]]).mean
    torch.testing.assert_close(predictions["counterfactuals"], expected)


def test_a_missing_or_misshapen_condition_is_refused() -> None:
    conditional, plain = VAE((6,), condition_dim=3), VAE((6,))
    x = torch.rand(2, 6)
    with pytest.raises(ConfigError, match="pass a condition"):
        conditional.elbo(x)
    with pytest.raises(ConfigError, match="3 numbers per example"):
        conditional.elbo(x, condition=torch.ones(2, 4))
    with pytest.raises(ConfigError, match="takes no condition"):
        plain.encode(x, torch.ones(2, 3))
    with pytest.raises(ConfigError, match="predict_condition=3"):
        VAE((6,), condition_dim=3, predict_condition=3)


def test_a_vae_whose_condition_dim_differs_from_the_data_is_refused(silent_trainer) -> None:
    data = DigitsDataModule(condition="labels")
    with pytest.raises(ConfigError, match="condition_dim: 10"):
        silent_trainer().fit(VAE(data.dims), datamodule=data)
