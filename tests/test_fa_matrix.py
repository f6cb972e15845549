"""Factor analysis of a covariance or correlation matrix with the number of examples it came
from (psych's ``fa(r, n.obs = )``): from Python (``FactorAnalysis.fit_covariance``) and from the
command line (``CovarianceDataModule``), against the fit of the data whose matrix it is."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fa_report import NAMES, two_correlated_factors

from vaeflow.analysis import check_covariance
from vaeflow.cli import main
from vaeflow.data import CovarianceDataModule
from vaeflow.errors import DataError
from vaeflow.sklearn import FactorAnalysis

#: The statistics that must not depend on whether the data or their matrix were fitted.
STATISTICS = ("chi_square", "dof", "p_value", "rmsea", "rmsea_upper", "tli", "bic", "srmr")


@pytest.fixture(scope="module")
def scores() -> np.ndarray:
    return two_correlated_factors()


def fitted(**kwargs) -> FactorAnalysis:
    return FactorAnalysis(2, rotation="oblimin", tol=1e-10, **kwargs)


@pytest.mark.parametrize("ddof", [0, 1])
def test_the_statistics_of_a_covariance_matrix_are_those_of_its_data(
    scores: np.ndarray, ddof: int
) -> None:
    """Either divisor of the covariance: the ML fit and its statistics are invariant to a
    common factor of S. Measured: 1e-11 relative apart (tol 1e-10)."""
    raw = fitted().fit(scores)
    matrix = fitted().fit_covariance(np.cov(scores.T, ddof=ddof), len(scores))
    for name in STATISTICS:
        ours, theirs = getattr(matrix.fit_statistics_, name), getattr(raw.fit_statistics_, name)
        assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-10), name
    np.testing.assert_allclose(matrix.loadings_, raw.loadings_, atol=1e-8)
    np.testing.assert_allclose(matrix.phi_, raw.phi_, atol=1e-8)
    scale = len(scores) / (len(scores) - ddof)  # the matrix's units are the data's
    np.testing.assert_allclose(matrix.noise_variance_, raw.noise_variance_ * scale, rtol=1e-7)
    if ddof == 0:
        assert matrix.log_likelihood_ == pytest.approx(raw.log_likelihood_, abs=1e-9)
        centred = scores - scores.mean(0)
        np.testing.assert_allclose(matrix.transform(centred), raw.transform(scores), atol=1e-7)


def test_a_correlation_matrix_gives_the_standardised_solution(scores: np.ndarray) -> None:
    raw = fitted().fit(scores)
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(np.corrcoef(scores.T), columns=NAMES)
    matrix = fitted().fit_covariance(frame, len(scores), mean=np.zeros(6))
    assert list(matrix.feature_names_in_) == NAMES
    # the data-unit loadings are standardised ones, the noise variances the uniquenesses
    np.testing.assert_allclose(matrix.components_.T, raw.loadings_, atol=1e-7)
    np.testing.assert_allclose(matrix.noise_variance_, raw.uniquenesses_, atol=1e-7)
    np.testing.assert_allclose(matrix.communalities_, raw.communalities_, atol=1e-8)
    for name in STATISTICS:
        ours, theirs = getattr(matrix.fit_statistics_, name), getattr(raw.fit_statistics_, name)
        assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-10), name
    standardised = (scores - scores.mean(0)) / scores.std(0)
    assert matrix.score(pandas.DataFrame(standardised, columns=NAMES)) == pytest.approx(
        matrix.log_likelihood_, abs=1e-7
    )


def bad_matrices() -> dict[str, tuple[np.ndarray, int, str]]:
    good = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.4], [0.3, 0.4, 1.0]])
    asymmetric = good.copy()
    asymmetric[0, 1] = 0.6
    singular = np.array([[1.0, 1.0, 0.3], [1.0, 1.0, 0.3], [0.3, 0.3, 1.0]])
    negative = good.copy()
    negative[2, 2] = -1.0
    holed = good.copy()
    holed[1, 0] = holed[0, 1] = np.nan
    return {
        "not symmetric": (asymmetric, 100, r"not symmetric: entry \(0, 1\) is 0\.6 but \(1, 0\)"),
        "not positive definite": (singular, 100, "not positive definite"),
        "not square": (good[:2], 100, r"square D x D .* got shape \(2, 3\)"),
        "a variance below 0": (negative, 100, "diagonal entry 2 .* is -1"),
        "NaN": (holed, 100, "NaN or infinite entries"),
        "n_obs not above D": (good, 3, "an integer above D = 3 .* got 3"),
        "n_obs not an integer": (good, 99.5, "an integer above D = 3 .* got 99.5"),
    }


@pytest.mark.parametrize("name", bad_matrices())
def test_a_bad_matrix_is_refused_with_what_is_wrong(name: str, tmp_path: Path) -> None:
    matrix, n_obs, message = bad_matrices()[name]
    with pytest.raises(DataError, match=message):
        check_covariance(torch.from_numpy(matrix), n_obs)
    if name != "NaN":  # scikit-learn's check_array refuses NaN first, with its own message
        with pytest.raises(ValueError, match=message):
            FactorAnalysis(1).fit_covariance(matrix, n_obs)
    np.save(tmp_path / "m.npy", matrix)
    with pytest.raises(DataError, match=message):
        CovarianceDataModule(str(tmp_path / "m.npy"), n_obs)


def test_the_header_must_name_each_column(tmp_path: Path) -> None:
    np.savetxt(tmp_path / "r.csv", np.eye(3), delimiter=",", header="a,b", comments="")
    with pytest.raises(DataError, match="header names 2 features but the matrix is 3 x 3"):
        CovarianceDataModule(str(tmp_path / "r.csv"), 50)
    with pytest.raises(ValueError, match="feature_names must be D = 3 strings"):
        FactorAnalysis(1).fit_covariance(np.eye(3), 50, feature_names=["a", "b"])


def read_loadings(run: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader((run / "loadings.csv").open()))
    return [row[0] for row in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def test_the_command_line_fits_a_matrix_file_as_its_data(
    scores: np.ndarray, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    """A YAML of CovarianceDataModule (a CSV correlation matrix with a header, n_obs) writes the
    tables and prints the statistics of the data's own fit; test and predict say why not."""
    monkeypatch.chdir(tmp_path)
    header = ",".join(NAMES)
    np.savetxt("scores.csv", scores, delimiter=",", header=header, comments="")
    np.savetxt("r.csv", np.corrcoef(scores.T), delimiter=",", header=header, comments="")
    model = (
        "model:\n  class_path: vaeflow.models.FactorAnalysis\n  init_args:\n"
        "    latent_dim: 2\n    rotation: oblimin\n    tol: 1.0e-10\n"
    )
    Path("raw.yaml").write_text(
        f"data:\n  class_path: vaeflow.data.ArrayDataModule\n  init_args:\n"
        f"    path: scores.csv\n{model}"
    )
    Path("matrix.yaml").write_text(
        f"data:\n  class_path: vaeflow.data.CovarianceDataModule\n  init_args:\n"
        f"    path: r.csv\n    n_obs: {len(scores)}\n{model}"
    )
    quiet = ["--trainer.enable_progress_bar", "false"]
    printed = {}
    for name in ("raw", "matrix"):
        main(["fit", "--config", f"{name}.yaml", *quiet])
        printed[name] = [
            line for line in capsys.readouterr().out.splitlines() if "Chi-square" in line
        ]
    assert printed["matrix"] == printed["raw"] and len(printed["raw"]) == 1
    names, matrix = read_loadings(Path("runs/matrix/version_0"))
    raw_names, raw = read_loadings(Path("runs/raw/version_0"))
    assert names == raw_names == NAMES
    np.testing.assert_allclose(matrix, raw, atol=2e-6)  # printed to 6 significant digits
    summary = Path("runs/matrix/version_0/summary.txt").read_text()
    assert "RMSEA" in summary and "calculus" in summary
    for command in ("test", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--config", "matrix.yaml", "--ckpt_path", "last", *quiet])
        assert "is a matrix, not examples" in capsys.readouterr().err


def test_moments_under_two_processes_count_once(tmp_path: Path) -> None:
    """Processes other than the first get the matrix with count 0."""
    np.save(tmp_path / "r.npy", np.eye(3) + 0.3)
    module = CovarianceDataModule(str(tmp_path / "r.npy"), 40)
    [first] = list(module.train_dataloader())
    module.trainer = type("Rank1", (), {"global_rank": 1})()
    [other] = list(module.train_dataloader())
    assert first.count.item() == 40 and other.count.item() == 0
    assert torch.equal(first.covariance, other.covariance)
