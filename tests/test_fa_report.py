"""Factor analysis for data analysis from the command line: a CSV with a header, a rotation,
the named tables in the run folder and the fit statistics on the console."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaeflow.analysis import correlation, parallel_analysis
from vaeflow.cli import main
from vaeflow.data import ArrayDataModule
from vaeflow.models import FactorAnalysis

NAMES = ["vocab", "reading", "grammar", "algebra", "geometry", "calculus"]


def two_correlated_factors(n: int = 600, correlation: float = 0.4) -> np.ndarray:
    """Six test scores loading on two factors that correlate at ``correlation``."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(n, 2))
    f[:, 1] = correlation * f[:, 0] + np.sqrt(1 - correlation**2) * f[:, 1]
    w = np.array([[0.8, 0], [0.7, 0], [0.75, 0.1], [0, 0.8], [0.1, 0.7], [0, 0.75]])
    return (f @ w.T + rng.normal(size=(n, 6)) * 0.5) * 10 + 50


def test_fit_and_test_of_a_named_csv_with_an_oblique_rotation(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    np.savetxt(
        "scores.csv", two_correlated_factors(), delimiter=",", header=",".join(NAMES), comments=""
    )
    Path("fa.yaml").write_text(
        "data:\n  class_path: vaeflow.data.ArrayDataModule\n  init_args:\n"
        "    path: scores.csv\n    val_fraction: 0.0\n    test_fraction: 0.2\n"
        "model:\n  class_path: vaeflow.models.FactorAnalysis\n  init_args:\n"
        "    latent_dim: 2\n    rotation: oblimin\n"
    )
    quiet = ["--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", "fa.yaml", *quiet])
    printed = capsys.readouterr().out
    assert "stopped by aitken" in printed and "Chi-square (Bartlett's correction)" in printed
    run = tmp_path / "runs" / "fa" / "version_0"
    rows = list(csv.reader((run / "loadings.csv").open()))
    assert rows[0] == ["feature", "F1", "F2", "h2", "u2"]
    assert [row[0] for row in rows[1:]] == NAMES
    loadings = np.array([[float(v) for v in row[1:3]] for row in rows[1:]])
    # simple structure: each test loads on its own factor (the first three on one)
    assert (np.abs(loadings[:3]).argmax(1) == np.abs(loadings[0]).argmax()).all()
    assert (np.abs(loadings[3:]).argmax(1) != np.abs(loadings[0]).argmax()).all()
    summary = (run / "summary.txt").read_text()
    assert "rotation: oblimin" in summary and "RMSEA" in summary and "calculus" in summary
    phi = float(summary.split("Factor correlations (Phi):")[1].split()[4])
    assert phi == pytest.approx(0.4, abs=0.1)  # the factors' true correlation
    # the scree picture: parallel analysis of the fitted rows' correlation matrix
    data = ArrayDataModule("scores.csv", val_fraction=0.0, test_fraction=0.2)
    data.setup()
    analysis = parallel_analysis(correlation(data.splits["train"]), len(data.splits["train"]))
    assert "Parallel analysis (eigenvalues of the correlation matrix above the 95th " in summary
    assert f"random data's): {analysis.num_factors} factor(s); picture: scree.png" in summary
    written = np.asarray(Image.open(run / "scree.png"))
    expected = (analysis.picture() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (written != expected).any(2).mean() < 1e-3  # rounding may move a pixel
    main(["test", "--config", "fa.yaml", "--ckpt_path", "last", *quiet])
    table = capsys.readouterr().out
    assert "fit/chi_square" in table and "fit/rmsea" in table and "test/log_likelihood" in table
    # vaeflow predict: the factor scores of the test rows, by row number in the file
    main(["predict", "--config", "fa.yaml", "--ckpt_path", "last", *quiet])
    capsys.readouterr()
    rows = list(csv.reader(next(Path("runs").rglob("scores.csv")).open()))
    assert rows[0] == ["row", "F1", "F2"]
    assert [int(row[0]) for row in rows[1:]] == data.indices["test"].tolist()
    model = FactorAnalysis.load_from_checkpoint(next(Path("runs").rglob("last.ckpt")))
    expected = model.factor_scores(data.splits["test"])  # regression, oblimin
    written = torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]], dtype=torch.float64)
    torch.testing.assert_close(written, expected, rtol=1e-9, atol=1e-9)
    assert written.mean(0).abs().max() < 0.3  # scores of standardised factors
