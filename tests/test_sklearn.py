"""vaeflow.sklearn.FactorAnalysis: scikit-learn's estimator checks, pipelines and grid
searches, and the same fit as vaeflow's model with the analysis of vaeflow.analysis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.decomposition import FactorAnalysis as SklearnFA
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from vaeflow.sklearn import FactorAnalysis


def factor_data(n: int = 1500, dim: int = 10, latent: int = 3, seed: int = 0) -> np.ndarray:
    """Rows from a factor model with heteroscedastic noise, in mixed units."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, latent))
    noise = np.sqrt(np.geomspace(0.1, 1.0, dim))
    x = rng.normal(size=(n, latent)) @ w.T + rng.normal(size=(n, dim)) * noise
    return x * np.geomspace(0.01, 100, dim) + 5


@parametrize_with_checks(
    [
        FactorAnalysis(),
        FactorAnalysis(rotation="oblimin", scores="ten_berge"),
        FactorAnalysis(missing="fiml"),
    ]
)
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    """Every check of scikit-learn's ``check_estimator`` (check_array_api_input skips itself
    unless SCIPY_ARRAY_API is set)."""
    check(estimator)


def test_the_fit_is_at_least_scikit_learns_and_scores_exactly() -> None:
    x = factor_data()
    ours = FactorAnalysis(3).fit(x)
    reference = SklearnFA(3, random_state=0).fit(x)
    assert ours.score(x) >= reference.score(x) - 1e-6
    assert ours.stop_reason_ in ("aitken", "round-off")
    reference.components_, reference.noise_variance_, reference.mean_ = (
        ours.components_,
        ours.noise_variance_,
        ours.mean_,
    )  # unrotated: scikit-learn scores our parameters as we do
    assert ours.score(x) == pytest.approx(reference.score(x), rel=1e-9)
    np.testing.assert_allclose(ours.get_covariance(), reference.get_covariance(), rtol=1e-9)


@pytest.mark.parametrize("rotation", ["varimax", "promax", "oblimin", "geomin"])
def test_rotations_keep_the_likelihood_and_report_on_the_correlation_scale(rotation) -> None:
    """Pattern, Phi and Psi imply the unrotated model's covariance; standardised loadings,
    communalities and uniquenesses are on the correlation scale."""
    x = factor_data()
    plain, rotated = FactorAnalysis(3).fit(x), FactorAnalysis(3, rotation=rotation).fit(x)
    pattern = rotated.components_.T
    implied = pattern @ rotated.phi_ @ pattern.T + np.diag(rotated.noise_variance_)
    np.testing.assert_allclose(implied, plain.get_covariance(), rtol=1e-8, atol=1e-12)
    assert rotated.score(x) == pytest.approx(plain.score(x), rel=1e-12)
    np.testing.assert_allclose(np.diag(rotated.phi_), 1.0, rtol=1e-12)
    std = np.sqrt(np.diag(implied))
    np.testing.assert_allclose(rotated.loadings_, pattern / std[:, None], rtol=1e-10)
    np.testing.assert_allclose(rotated.communalities_ + rotated.uniquenesses_, 1.0, rtol=1e-12)


def test_regression_scores_are_the_posterior_means() -> None:
    x = factor_data()
    estimator = FactorAnalysis(3).fit(x)
    mean, _ = estimator._model.posterior(torch.from_numpy(x))
    np.testing.assert_allclose(estimator.transform(x), mean.numpy(), rtol=1e-9, atol=1e-10)
    bartlett = estimator.transform(x, method="bartlett")
    assert bartlett.shape == (len(x), 3) and not np.allclose(bartlett, mean.numpy())


def test_a_pipeline_with_a_grid_search_finds_the_number_of_factors() -> None:
    """StandardScaler then FactorAnalysis; GridSearchCV on held-out log-likelihood picks the
    true M = 3 among 1..5."""
    x = factor_data(n=2000)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), FactorAnalysis()),
        {"factoranalysis__n_components": [1, 2, 3, 4, 5]},
        cv=3,
    ).fit(x)
    assert search.best_params_ == {"factoranalysis__n_components": 3}


def test_a_dataframe_keeps_its_column_names() -> None:
    frame = pd.DataFrame(factor_data(n=300, dim=5, latent=1), columns=list("abcde"))
    estimator = FactorAnalysis(1).fit(frame)
    assert list(estimator.feature_names_in_) == list("abcde")
    assert estimator.transform(frame).shape == (300, 1)


def test_missing_values_are_refused_with_the_alternative_or_dropped() -> None:
    x = factor_data(n=400, dim=6, latent=2)
    holed = x.copy()
    holed[::10, 2] = np.nan
    with pytest.raises(
        ValueError, match=r"NaN in 40 of 400 rows: set missing='fiml' .* missing='complete_cases'"
    ):
        FactorAnalysis(2).fit(holed)
    dropped = FactorAnalysis(2, missing="complete_cases").fit(holed)
    complete = FactorAnalysis(2).fit(holed[~np.isnan(holed).any(axis=1)])
    np.testing.assert_allclose(dropped.get_covariance(), complete.get_covariance(), rtol=1e-12)


def test_fiml_in_a_pipeline_scores_the_observed_values() -> None:
    """missing='fiml' behind a StandardScaler (which passes NaN through): every row is fitted,
    score_samples of a row with NaN is its observed-data log-likelihood (the dense marginal),
    the fit has FIML statistics, and without NaN the fit is the complete-data one."""
    x = factor_data(n=600, dim=6, latent=2)
    holed = x.copy()
    holed[np.random.default_rng(1).random(x.shape) < 0.2] = np.nan
    pipeline = make_pipeline(StandardScaler(), FactorAnalysis(2, missing="fiml", tol=1e-9))
    pipeline.fit(holed)
    scaled = pipeline[0].transform(holed)
    estimator = pipeline[-1]
    assert estimator.log_likelihood_ == pytest.approx(pipeline.score_samples(holed).mean())
    # FIML fit statistics (tests/test_fa_missing.py checks them against lavaan)
    statistics = estimator.fit_statistics_
    assert statistics.dof == 4 and statistics.chi_square >= 0
    assert statistics.log_likelihood == pytest.approx(estimator.log_likelihood_, abs=1e-12)
    row = scaled[np.isnan(scaled).any(axis=1)][0]
    seen = ~np.isnan(row)
    cov = estimator.get_covariance()[np.ix_(seen, seen)]
    dense = multivariate_normal(estimator.mean_[seen], cov).logpdf(row[seen])
    assert estimator.score_samples(row[None])[0] == pytest.approx(dense, abs=1e-10)
    # regression scores of the observed values; of a complete row, the complete-data ones
    scores = pipeline.transform(holed)
    assert np.isfinite(scores).all()
    full = ~np.isnan(holed).any(axis=1)
    np.testing.assert_allclose(scores[full], estimator.transform(scaled[full]), atol=1e-10)
    with pytest.raises(ValueError, match="bartlett scores need every value"):
        estimator.transform(scaled, method="bartlett")
    complete = FactorAnalysis(2, missing="fiml", tol=1e-9).fit(x)
    assert complete.score(x) == pytest.approx(FactorAnalysis(2, tol=1e-9).fit(x).score(x), abs=1e-6)


def test_fit_statistics_of_a_true_model_do_not_reject_it() -> None:
    """At the true M the chi-square test does not reject (p > 0.01) and RMSEA is small; with
    too few factors it rejects."""
    x = factor_data(n=1000)
    right, wrong = FactorAnalysis(3).fit(x), FactorAnalysis(1).fit(x)
    assert right.fit_statistics_.p_value > 0.01 and right.fit_statistics_.rmsea < 0.05
    assert wrong.fit_statistics_.p_value < 1e-6


def test_a_fit_writes_no_file_and_prints_nothing(tmp_path, monkeypatch, capsys) -> None:
    """An estimator has no run folder: no loadings.csv or summary.txt in the working folder,
    no report on the console (Lightning's start-up lines included)."""
    monkeypatch.chdir(tmp_path)
    FactorAnalysis(2, rotation="oblimin").fit(factor_data(n=200, dim=6, latent=2))
    assert list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert captured.out == ""
