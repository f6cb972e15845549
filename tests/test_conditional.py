"""Conditional VAEs: the condition appended to any net's input, the data modules' (examples,
one-hot labels) batches, sampling and predicting under a chosen condition, and clear errors."""

from pathlib import Path

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


# -- a condition from a table's column ----------------------------------------------------------


def batch_table(path, batches: list[str], rows: int = 60, seed: int = 0):
    """A CSV file with a header: features ``row`` (the row number) and ``x1``, ``x2``, and a
    ``batch`` column between them drawn from ``batches``; returns the batch of every row."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(batches, size=rows)
    lines = ["row,x1,batch,x2"]
    lines += [f"{i},{rng.normal():.6f},{b},{rng.normal():.6f}" for i, b in enumerate(chosen)]
    path.write_text("\n".join(lines) + "\n")
    return chosen


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_table_column_conditions_every_example_row_for_row(tmp_path, shuffle: bool) -> None:
    """Each batch pairs every row with the one-hot of its own ``batch`` cell, in every split;
    the column is not a feature; numbers are categories in numeric order."""
    chosen = batch_table(tmp_path / "t.csv", ["10", "2", "7"])
    data = ArrayDataModule(
        str(tmp_path / "t.csv"),
        condition="batch",
        batch_size=8,
        val_fraction=0.2,
        test_fraction=0.2,
        shuffle=shuffle,
    )
    assert data.dims == (3,) and data.feature_names == ["row", "x1", "x2"]
    assert data.condition_categories == ["2", "7", "10"] and data.condition_dim == 3
    seen = []
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        for x, condition in loader:
            rows = x[:, 0].long().numpy()
            expected = [data.condition_categories.index(b) for b in chosen[rows]]
            torch.testing.assert_close(condition, F.one_hot(torch.tensor(expected), 3).float())
            seen.extend(rows)
    assert sorted(seen) == list(range(60))


def test_a_text_column_and_a_test_file_use_the_training_categories(tmp_path) -> None:
    batch_table(tmp_path / "train.csv", ["lab_b", "lab_a"])
    test_batches = batch_table(tmp_path / "test.csv", ["lab_b"], rows=5, seed=1)
    data = ArrayDataModule(
        str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), condition="batch"
    )
    assert data.condition_categories == ["lab_a", "lab_b"]
    assert (test_batches == "lab_b").all()
    assert data.conditions("test").argmax(1).tolist() == [1] * 5
    batch_table(tmp_path / "test.csv", ["lab_c"], rows=5)
    unseen = ArrayDataModule(
        str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), condition="batch"
    )
    with pytest.raises(DataError, match="condition 'lab_c', which the training data do not"):
        unseen.condition_dim  # noqa: B018


def test_an_unknown_or_impossible_condition_column_is_explained(tmp_path) -> None:
    batch_table(tmp_path / "t.csv", ["a", "b"])
    with pytest.raises(DataError, match="no column 'donor' to condition on; its columns are: row"):
        ArrayDataModule(str(tmp_path / "t.csv"), condition="donor")
    np.savetxt(tmp_path / "plain.csv", np.ones((4, 2)), delimiter=",")
    with pytest.raises(DataError, match=r"first line of .* is a row of numbers: add a header"):
        ArrayDataModule(str(tmp_path / "plain.csv"), condition="batch")
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    with pytest.raises(DataError, match=r"condition: batch names a column, and .* has none"):
        ArrayDataModule(str(tmp_path / "x.npy"), condition="batch")
    (tmp_path / "gap.csv").write_text("x,batch\n1,a\n2,\n")
    with pytest.raises(DataError, match=r"empty cell in column 'batch' \(data row 2\)"):
        ArrayDataModule(str(tmp_path / "gap.csv"), condition="batch").condition_dim  # noqa: B018


def test_a_conditional_vae_trains_on_a_table_column_from_a_yaml(tmp_path, monkeypatch) -> None:
    """`vaeflow fit` with ``condition: batch`` and the matching ``condition_dim``; predict
    writes each example as if from batch 0."""
    from vaeflow.cli import main

    batch_table(tmp_path / "t.csv", ["a", "b", "c"])
    (tmp_path / "cvae.yaml").write_text(
        "model:\n"
        "  class_path: vaeflow.models.VAE\n"
        "  init_args: {latent_dim: 2, likelihood: gaussian, condition_dim: 3,"
        " predict_condition: 0}\n"
        "data:\n"
        "  class_path: vaeflow.data.ArrayDataModule\n"
        "  init_args: {path: t.csv, condition: batch, batch_size: 20}\n"
        "trainer:\n"
        "  max_epochs: 2\n"
        "  enable_progress_bar: false\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.CSVLogger\n"
        "    init_args: {save_dir: runs, name: cvae}\n"
    )
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "cvae.yaml"])
    checkpoint = "runs/cvae/version_0/checkpoints/last.ckpt"
    main(["predict", "--config", "cvae.yaml", "--ckpt_path", checkpoint])
    latents = torch.load(next(Path(".").rglob("latents.pt")))
    assert latents["counterfactuals"].shape == (54, 3)  # the training split: 60 less a tenth
