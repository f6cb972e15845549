"""AnnData ``.h5ad`` files read with h5py (``AnnDataModule``): a file anndata itself wrote
(``tests/data/anndata_0.12.h5ad``, :mod:`make_h5ad_fixture`), files written here to the same
layout, a negative-binomial conditional VAE trained from ``configs/nb_cvae_h5ad.yaml``, and the
errors for each malformed input."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from make_h5ad_fixture import BATCHES, FIXTURE, cells, example_file

from vaeflow.data import AnnDataModule
from vaeflow.errors import DataError

h5py = pytest.importorskip(
    "h5py", reason="h5py (pip install 'vaeflow[anndata]') reads .h5ad files; it is not installed"
)
REPO = Path(__file__).resolve().parents[1]


def test_a_file_anndata_wrote_reads_as_written() -> None:
    """X (CSR float32), the dense int32 and CSC layers: the counts, in float32, genes named."""
    expected = torch.from_numpy(cells()["counts"]).float()
    for layer in (None, "counts", "csc"):
        data = AnnDataModule(str(FIXTURE), layer=layer, val_fraction=0.0, shuffle=False)
        data.setup()
        assert data.dims == (12,)
        assert data.feature_names == [f"gene{j}" for j in range(12)]
        assert data.splits["train"].dtype == torch.float32
        assert torch.equal(data.splits["train"], expected), layer


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_obs_column_conditions_every_cell_row_for_row(shuffle: bool) -> None:
    """A categorical keeps anndata's category order; every batch pairs each cell with the
    one-hot of its own batch, in every split."""
    data = AnnDataModule(
        str(FIXTURE), condition="batch", val_fraction=0.2, test_fraction=0.2, batch_size=7,
        shuffle=shuffle,
    )  # fmt: skip
    assert data.condition_categories == BATCHES and data.condition_dim == 3
    counts = torch.from_numpy(cells()["counts"]).float()
    batch = torch.from_numpy(cells()["batch"])
    seen = 0
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        for x, condition in loader:
            rows = [int(torch.nonzero((counts == row).all(1))[0]) for row in x]
            torch.testing.assert_close(condition, F.one_hot(batch[rows], 3).float())
            seen += len(x)
    assert seen == 40


def test_text_and_label_columns() -> None:
    """A string column's categories are its sorted values; ``labels`` names the class labels,
    which ``condition: labels`` conditions on."""
    donor = AnnDataModule(str(FIXTURE), condition="donor")
    assert donor.condition_categories == ["d1", "d2"]
    expected = ["d1", "d2"]
    batch = cells()["batch"]
    donor.setup()
    codes = donor.conditions("train").argmax(1)
    assert [expected[c] for c in codes] == [
        ["d1", "d2"][b % 2] for b in batch[donor.indices["train"]]
    ]
    typed = AnnDataModule(str(FIXTURE), labels="cell_type", condition="labels")
    assert typed.condition_dim == 2 and typed.condition_categories == ["T", "B"]
    typed.setup()
    assert torch.equal(
        typed.labels("val"), torch.from_numpy(cells()["cell_type"])[typed.indices["val"]]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer": "raw"}, r"no layer 'raw'; its layers are: counts, csc, log1p"),
        ({"condition": "sample"}, r"no obs column 'sample'; its obs columns are: batch, "),
        ({"condition": "score"}, r"obs column 'score' .* holds float64 values, not categories"),
        ({"condition": "plate"}, r"obs column 'plate' .* has no value for 1 cells .* row 38"),
        ({"condition": "labels"}, r"no class labels to condition on: set labels"),
    ],
)
def test_wrong_layers_and_obs_columns_are_named(options: dict[str, str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        AnnDataModule(str(FIXTURE), **options).condition_dim  # noqa: B018


def test_files_that_are_no_anndata_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="data file not found"):
        AnnDataModule(str(tmp_path / "none.h5ad"))
    (tmp_path / "text.h5ad").write_text("cell,gene\n")
    with pytest.raises(DataError, match="could not be read as an HDF5"):
        AnnDataModule(str(tmp_path / "text.h5ad"))
    with h5py.File(tmp_path / "plain.h5", "w") as file:
        file["X"] = np.ones((3, 2))
    with pytest.raises(DataError, match=r"not an AnnData file .*write_h5ad"):
        AnnDataModule(str(tmp_path / "plain.h5"))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match=r"needs h5py: pip install 'vaeflow\[anndata\]'"):
        AnnDataModule(str(FIXTURE))


def test_a_count_likelihood_refuses_normalised_values() -> None:
    """log1p values are not counts: the VAE's support check refuses them before training."""
    from vaeflow.models import VAE

    data = AnnDataModule(str(FIXTURE), layer="log1p")
    model = VAE(data.dims, likelihood="negative_binomial")
    model.trainer = type("T", (), {"datamodule": data})()  # what setup reads
    data.setup()
    with pytest.raises(DataError, match="outside the support of the 'negative_binomial'"):
        VAE.setup(model, "fit")


def test_the_h5ad_config_trains_a_negative_binomial_cvae(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``configs/nb_cvae_h5ad.yaml`` as printed, on a file written here; ``predict`` writes
    every cell's counts as if from the first batch."""
    from vaeflow.cli import main

    example_file(tmp_path / "cells.h5ad")
    shutil.copy(REPO / "configs" / "nb_cvae_h5ad.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", "nb_cvae_h5ad.yaml", *quick])
    checkpoint = "runs/nb_cvae_h5ad/version_0/checkpoints/last.ckpt"
    predict = ["--model.init_args.predict_condition", "0", "--ckpt_path", checkpoint]
    main(["predict", "--config", "nb_cvae_h5ad.yaml", *predict, *quick])
    latents = torch.load(next(Path("runs").rglob("latents.pt")))
    assert latents["latents"].shape == (81, 10)  # the training split: 90 less a tenth
    shares = latents["counterfactuals"]
    torch.testing.assert_close(shares.sum(1), torch.ones(81))  # observed library: shares
