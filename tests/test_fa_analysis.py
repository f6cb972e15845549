"""vaeflow.analysis against published output and reference implementations.

References:
- R's ``factanal`` on ``Harman74.cor`` (24 psychological tests, n.obs = 145): the correlation
  matrix is ``src/library/datasets/data/Harman74.cor.R`` of R's sources (wch/r-source), copied
  to ``tests/data/harman74.csv``; the printed output is R's saved example run
  ``tests/Examples/datasets-Ex.Rout.save`` (``factanal(factors = m, covmat = Harman74.cor)``,
  m = 1..5, varimax), so every number below is R's to its printed digits.
- psych::fa's printed fit statistics for three models of one data set (p = 10, n.obs = 178) in
  udialter/SPSSattitudes, ``ATSPSSOpenCode.md`` (EFA 1, 2 and 3 factors).
- factor_analyzer 0.5.1 (``Rotator``, ``calculate_kmo``, ``calculate_bartlett_sphericity``).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factor_analyzer import Rotator, calculate_bartlett_sphericity, calculate_kmo
from PIL import Image
from torch import Tensor

from vaeflow.analysis import (
    ROTATIONS,
    bartlett_sphericity,
    chi_square_test,
    correlation,
    explained_variance,
    factor_score_weights,
    factor_scores,
    fit_covariance,
    fit_statistics,
    kmo,
    max_latent_dim,
    model_std,
    parallel_analysis,
    rotate,
    select_by_bic,
    summarize,
)
from vaeflow.analysis.rotation import Geomin
from vaeflow.analysis.selection import random_eigenvalues
from vaeflow.analysis.statistics import bartlett_factor, degrees_of_freedom
from vaeflow.callbacks import plots
from vaeflow.errors import ConfigError
from vaeflow.models import FactorAnalysis

F64 = torch.float64
HARMAN74 = Path(__file__).parent / "data" / "harman74.csv"
HARMAN74_N = 145

#: factanal on Harman74.cor: factors -> (chi-square, degrees of freedom, p-value), as printed.
FACTANAL_TESTS = {
    1: (622.91, 252, 2.28e-33),
    2: (420.24, 229, 2.01e-13),
    3: (295.59, 207, 5.12e-05),
    4: (226.68, 186, 0.0224),
    5: (186.82, 166, 0.128),
}
#: factanal, 4 factors: the uniquenesses of the 24 tests (printed to 3 decimals).
FACTANAL_UNIQUENESSES_4 = [
    0.438, 0.780, 0.644, 0.651, 0.352, 0.312, 0.283, 0.485, 0.257, 0.240, 0.551, 0.435,
    0.491, 0.646, 0.696, 0.549, 0.598, 0.593, 0.762, 0.592, 0.583, 0.601, 0.497, 0.500,
]  # fmt: skip
#: factanal, 4 factors, varimax: the rows printed in full (factanal blanks |loading| < 0.1).
FACTANAL_VARIMAX_4 = {
    0: [0.160, 0.689, 0.187, 0.160],  # VisualPerception
    4: [0.739, 0.185, 0.213, 0.150],  # GeneralInformation
    7: [0.569, 0.339, 0.242, 0.132],  # WordClassification
    9: [0.167, -0.118, 0.831, 0.166],  # Addition
    10: [0.180, 0.120, 0.512, 0.374],  # Code
    19: [0.378, 0.402, 0.118, 0.301],  # Deduction
    22: [0.369, 0.500, 0.244, 0.239],  # SeriesCompletion
    23: [0.370, 0.158, 0.496, 0.304],  # ArithmeticProblems
}
FACTANAL_SS_LOADINGS_4 = [3.647, 2.872, 2.657, 2.290]
FACTANAL_PROPORTION_4 = [0.152, 0.120, 0.111, 0.095]
FACTANAL_CUMULATIVE_4 = [0.152, 0.272, 0.382, 0.478]

#: psych::fa, p = 10, n.obs = 178, null model chi-square 1272.53 on 45 df; per number of
#: factors: (chi-square, p-value, TLI, RMSEA, lower, upper, BIC), as printed.
PSYCH_NULL_CHI_SQUARE = 1272.53
PSYCH_FITS = {
    1: (234.19, 2.6e-31, 0.791, 0.179, 0.158, 0.201, 52.83),
    2: (87.0, 1.7e-08, 0.913, 0.115, 0.089, 0.142, -47.72),
    3: (53.87, 1.9e-05, 0.926, 0.106, 0.074, 0.139, -39.4),
}

#: Rotations both implement: (ours, options, factor_analyzer's method, its options, normalize).
#: factor_analyzer normalises only varimax and promax, and its oblimin is only right for
#: gamma = 0 (its gamma != 0 branch multiplies by a zero matrix); equamax is its
#: Crawford-Ferguson criterion, whose kappa defaults to 0 (quartimax), so kappa is passed.
SHARED_ROTATIONS = [
    ("varimax", {}, "varimax", {}, True),
    ("quartimax", {}, "quartimax", {}, False),
    ("equamax", {}, "equamax", {"kappa": 4 / (2 * 24)}, False),
    ("oblimin", {"gamma": 0.0}, "oblimin", {}, False),
    ("quartimin", {}, "quartimin", {}, False),
    ("geomin", {"epsilon": 0.01}, "geomin_obl", {"delta": 0.01}, False),
    ("promax", {"power": 4}, "promax", {"power": 4}, True),
]


@pytest.fixture(scope="module")
def harman74() -> Tensor:
    return torch.tensor(np.loadtxt(HARMAN74, delimiter=",", skiprows=1), dtype=F64)


@pytest.fixture(scope="module")
def harman74_fits(harman74: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Maximum-likelihood (loadings, noise variances) of Harman74 for 1..5 factors."""
    return {m: fit_covariance(harman74, m) for m in FACTANAL_TESTS}


def oblique_model(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(pattern P (9 x 3), noise variances Psi, factor correlations Phi): a simple structure of
    three correlated factors, each feature's variance 1."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.zeros(9, 3, dtype=F64)
    for d in range(9):
        pattern[d, d % 3] = 0.6 + 0.2 * torch.rand((), generator=generator, dtype=F64)
    pattern += 0.05 * torch.randn(9, 3, generator=generator, dtype=F64)
    phi = torch.tensor([[1.0, 0.4, 0.2], [0.4, 1.0, 0.3], [0.2, 0.3, 1.0]], dtype=F64)
    noise = 1 - ((pattern @ phi) * pattern).sum(1)
    return pattern, noise, phi


def sample(pattern: Tensor, noise: Tensor, phi: Tensor, n: int, seed: int) -> tuple[Tensor, ...]:
    """(factors f (n x M), data x (n x D)) drawn from the model with mean 0."""
    generator = torch.Generator().manual_seed(seed)
    f = torch.randn(n, len(phi), generator=generator, dtype=F64) @ torch.linalg.cholesky(phi).T
    e = torch.randn(n, len(noise), generator=generator, dtype=F64) * noise.sqrt()
    return f, f @ pattern.T + e


def aligned_error(
    ours: Tensor, phi: Tensor, theirs: np.ndarray, their_phi: np.ndarray
) -> tuple[float, float]:
    """Largest differences of loadings and of Phi after the best column permutation and signs
    of ``theirs`` (factor_analyzer neither orders nor signs its factors)."""
    best = (math.inf, math.inf)
    for order in itertools.permutations(range(ours.shape[1])):
        columns = theirs[:, order]
        signs = np.where(columns.sum(0) < 0, -1.0, 1.0)
        error = np.abs(columns * signs - ours.numpy()).max()
        if error < best[0]:
            phi_error = np.abs(
                their_phi[np.ix_(order, order)] * np.outer(signs, signs) - phi.numpy()
            ).max()
            best = (error, phi_error)
    return best


# -- fit statistics against published output ---------------------------------------------------


@pytest.mark.parametrize("factors", sorted(FACTANAL_TESTS))
def test_chi_square_test_reproduces_factanal_on_harman74(
    harman74: Tensor, harman74_fits: dict, factors: int
) -> None:
    chi, dof, p_value = FACTANAL_TESTS[factors]
    stats = fit_statistics(harman74, *harman74_fits[factors], HARMAN74_N)
    assert stats.chi_square == pytest.approx(chi, abs=0.005)
    assert stats.dof == dof
    assert stats.p_value == pytest.approx(p_value, rel=5e-3)  # 3 significant digits
    assert stats.bic == pytest.approx(stats.chi_square - dof * math.log(HARMAN74_N), abs=1e-9)


def test_varimax_summary_reproduces_factanal_on_harman74(harman74_fits: dict) -> None:
    """Uniquenesses, varimax loadings and variance explained of the 4-factor model, to the
    printed 3 decimals (5e-4, plus 1e-4 for stats::varimax's looser stopping rule)."""
    loadings, noise = harman74_fits[4]
    # at the ML fit the model reproduces the sample variances (1 for a correlation matrix), so
    # the model's and the data's standard deviations standardise alike
    torch.testing.assert_close(
        model_std(loadings, noise), torch.ones(24, dtype=F64), atol=1e-6, rtol=0
    )
    rotation = rotate(loadings, "varimax")
    summary = summarize(rotation.loadings, noise, rotation.phi)
    tolerance = 6e-4
    expected = torch.tensor(FACTANAL_UNIQUENESSES_4, dtype=F64)
    torch.testing.assert_close(summary.uniquenesses, expected, atol=tolerance, rtol=0)
    rows = torch.tensor(list(FACTANAL_VARIMAX_4.values()), dtype=F64)
    printed = summary.pattern[list(FACTANAL_VARIMAX_4)]
    torch.testing.assert_close(printed, rows, atol=tolerance, rtol=0)
    for value, published in (
        (summary.variance, FACTANAL_SS_LOADINGS_4),
        (summary.proportion_variance, FACTANAL_PROPORTION_4),
        (summary.cumulative_variance, FACTANAL_CUMULATIVE_4),
    ):
        torch.testing.assert_close(
            value, torch.tensor(published, dtype=F64), atol=tolerance, rtol=0
        )


@pytest.mark.parametrize("factors", sorted(PSYCH_FITS))
def test_chi_square_test_reproduces_psych(factors: int) -> None:
    """psych prints chi-square to 2 decimals; F and F0 are recovered from them, so the derived
    indices carry that rounding (BIC to 0.01), the rest is to their printed digits."""
    n, p = 178, 10
    chi, p_value, tli, rmsea, lower, upper, bic = PSYCH_FITS[factors]
    test = chi_square_test(
        chi / bartlett_factor(n, p, factors),
        PSYCH_NULL_CHI_SQUARE / bartlett_factor(n, p, 0),
        p,
        factors,
        n,
    )
    assert test.null_chi_square == pytest.approx(PSYCH_NULL_CHI_SQUARE)
    assert (test.dof, test.null_dof) == (degrees_of_freedom(p, factors), 45)
    assert test.p_value == pytest.approx(p_value, rel=0.04)  # 2 significant digits
    assert test.tli == pytest.approx(tli, abs=5e-4)
    for value, printed in (
        (test.rmsea, rmsea),
        (test.rmsea_lower, lower),
        (test.rmsea_upper, upper),
    ):
        assert value == pytest.approx(printed, abs=5e-4)
    assert test.bic == pytest.approx(bic, abs=0.01)


def test_fit_statistics_against_direct_formulas() -> None:
    """On data: F and the mean log-likelihood from the dense D x D formulas and
    torch.distributions, invariance of F (not of the log-likelihood) to rescaling features, and
    a model equal to S leaves no residual."""
    pattern, noise, phi = oblique_model()
    _, x = sample(pattern, noise, phi, 400, seed=1)
    x = x * torch.linspace(0.5, 3.0, 9, dtype=F64) + 2.0
    cov = torch.cov(x.T, correction=0)
    loadings, psi = fit_covariance(cov, 3)
    stats = fit_statistics(cov, loadings, psi, len(x))
    model = loadings @ loadings.T + torch.diag(psi)
    direct = (
        torch.logdet(model) - torch.logdet(cov) + torch.trace(torch.linalg.solve(model, cov)) - 9
    )
    assert stats.discrepancy == pytest.approx(direct.item(), rel=1e-9)
    normal = torch.distributions.MultivariateNormal(x.mean(0), model)
    assert stats.log_likelihood == pytest.approx(normal.log_prob(x).mean().item(), rel=1e-12)
    std = cov.diagonal().sqrt()
    on_correlation = fit_statistics(
        cov / torch.outer(std, std), loadings / std[:, None], psi / std**2, len(x)
    )
    assert on_correlation.discrepancy == pytest.approx(stats.discrepancy, rel=1e-9)
    assert on_correlation.srmr == pytest.approx(stats.srmr, rel=1e-9)
    exact = fit_statistics(model, loadings, psi, len(x))
    assert exact.discrepancy == pytest.approx(0, abs=1e-12)
    assert exact.srmr == pytest.approx(0, abs=1e-12)
    assert exact.chi_square == pytest.approx(0, abs=1e-9)


def test_kmo_and_sphericity_match_factor_analyzer() -> None:
    pattern, noise, phi = oblique_model()
    _, x = sample(pattern, noise, phi, 300, seed=2)
    per_feature, overall = calculate_kmo(x.numpy())
    ours = kmo(correlation(x))
    assert ours.overall == pytest.approx(overall, rel=1e-10)
    np.testing.assert_allclose(ours.per_feature.numpy(), per_feature, rtol=1e-10)
    chi, p_value = calculate_bartlett_sphericity(x.numpy())
    test = bartlett_sphericity(correlation(x), len(x))
    assert test.chi_square == pytest.approx(chi, rel=1e-10)
    assert test.p_value == pytest.approx(p_value, rel=1e-8, abs=1e-300)
    assert test.dof == 36


# -- rotations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "theirs", "their_options", "normalize"), SHARED_ROTATIONS
)
def test_rotation_matches_factor_analyzer(
    harman74_fits: dict, name: str, options: dict, theirs: str, their_options: dict, normalize: bool
) -> None:
    """The same unrotated ML loadings of Harman74 (4 factors) rotated by both, to 1e-4 up to
    the order and signs of the factors (both run with tol 1e-6)."""
    loadings = harman74_fits[4][0]
    rotation = rotate(loadings, name, normalize=normalize, **options)
    rotator = Rotator(method=theirs, normalize=normalize, tol=1e-6, **their_options)
    their_loadings = rotator.fit_transform(loadings.numpy())
    their_phi = rotator.phi_ if rotator.phi_ is not None else np.eye(4)
    loading_error, phi_error = aligned_error(
        rotation.loadings, rotation.phi, their_loadings, their_phi
    )
    assert loading_error < 1e-4
    assert phi_error < 1e-4


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", ROTATIONS.names())
def test_every_rotation_keeps_the_model(harman74_fits: dict, name: str, normalize: bool) -> None:
    """For every registered rotation: the implied covariance P Phi P^T + Psi and so the
    likelihood are unchanged, Phi is a correlation matrix (the identity when orthogonal),
    P = A T^-T and Phi = T^T T, and the factors are ordered and signed."""
    loadings, noise = harman74_fits[4]
    rotation = rotate(loadings, name, normalize=normalize)
    pattern, phi, t = rotation
    torch.testing.assert_close(pattern @ phi @ pattern.T, loadings @ loadings.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(phi.diagonal(), torch.ones(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(pattern @ t.T, loadings, atol=1e-10, rtol=0)
    torch.testing.assert_close(t.T @ t, phi, atol=1e-10, rtol=0)
    if not ROTATIONS.get(name).oblique:
        assert torch.equal(phi, torch.eye(4, dtype=F64))
    variance = explained_variance(pattern, phi)
    assert (variance[:-1] >= variance[1:]).all()
    assert (pattern.sum(0) > 0).all()
    harman = torch.tensor(np.loadtxt(HARMAN74, delimiter=",", skiprows=1), dtype=F64)
    before = fit_statistics(harman, loadings, noise, HARMAN74_N)
    after = fit_statistics(harman, pattern, noise, HARMAN74_N, phi)
    assert after.log_likelihood == pytest.approx(before.log_likelihood, abs=1e-10)


def test_oblimin_gamma_and_its_effect() -> None:
    """On a model with correlated factors and a simple pattern, quartimin (gamma = 0) finds the
    pattern to 0.05 and Phi to 0.15 (the cross-loadings are not exactly zero), and in direct
    oblimin a larger gamma gives more correlated factors, a negative one less."""
    pattern, _, phi = oblique_model()
    unrotated = pattern @ torch.linalg.cholesky(phi)
    quartimin = rotate(unrotated, "oblimin", gamma=0.0)
    loading_error, phi_error = aligned_error(
        quartimin.loadings, quartimin.phi, pattern.numpy(), phi.numpy()
    )
    assert loading_error < 0.05
    assert phi_error < 0.15
    off = ~torch.eye(3, dtype=torch.bool)
    correlations = [
        rotate(unrotated, "oblimin", gamma=gamma).phi[off].abs().sum() for gamma in (-0.5, 0, 0.5)
    ]
    assert correlations[0] < correlations[1] < correlations[2]


def test_rotation_errors_and_edge_cases(harman74_fits: dict) -> None:
    with pytest.raises(ConfigError, match=r"unknown rotation 'obliminn'.*Available: .*geomin"):
        rotate(harman74_fits[4][0], "obliminn")
    loadings = harman74_fits[4][0]
    by_instance = rotate(loadings, Geomin(epsilon=0.02))
    by_name = rotate(loadings, "geomin", epsilon=0.02)
    torch.testing.assert_close(by_instance.loadings, by_name.loadings)
    with pytest.warns(RuntimeWarning, match="did not converge in 1 iterations"):
        rotate(harman74_fits[4][0], "quartimin", max_iter=1)
    one = -harman74_fits[1][0]
    single = rotate(one, "varimax")
    torch.testing.assert_close(single.loadings, -one)
    assert torch.equal(single.phi, torch.ones(1, 1, dtype=F64))


# -- summaries --------------------------------------------------------------------------------


def test_summary_of_an_oblique_solution() -> None:
    """On data units: standardised pattern, structure = pattern Phi, communalities +
    uniquenesses = 1, and the oblique variances add up to the total communality."""
    pattern, noise, phi = oblique_model()
    scale = torch.linspace(1.0, 5.0, 9, dtype=F64)
    summary = summarize(pattern * scale[:, None], noise * scale**2, phi)
    torch.testing.assert_close(summary.pattern, pattern, atol=1e-12, rtol=0)
    torch.testing.assert_close(summary.structure, pattern @ phi, atol=1e-12, rtol=0)
    torch.testing.assert_close(summary.uniquenesses, noise, atol=1e-12, rtol=0)
    assert summary.variance.sum() == pytest.approx(summary.communalities.sum().item(), rel=1e-12)
    assert summary.cumulative_proportion[-1] == pytest.approx(1.0)
    assert summary.cumulative_variance[-1] == pytest.approx(summary.communalities.mean().item())


# -- factor scores ----------------------------------------------------------------------------


def test_regression_scores_are_the_posterior_means() -> None:
    """Unrotated: FactorAnalysis.posterior's means; rotated: the same times T (f = T^T z)."""
    pattern, noise, phi = oblique_model()
    loadings = pattern @ torch.linalg.cholesky(phi)
    model = FactorAnalysis(input_shape=(9,), latent_dim=3)
    mean = torch.linspace(-1, 1, 9, dtype=F64)
    with torch.no_grad():
        model.loadings.copy_(loadings)
        model.noise_variance.copy_(noise)
        model.mean.copy_(mean)
    _, x = sample(pattern, noise, phi, 50, seed=3)
    x = x + mean
    posterior = model.posterior(x)[0]
    scores = factor_scores(x, mean, loadings, noise, "regression")
    torch.testing.assert_close(scores, posterior, atol=1e-12, rtol=0)
    rotation = rotate(loadings, "oblimin")
    rotated = factor_scores(x, mean, rotation.loadings, noise, "regression", rotation.phi)
    torch.testing.assert_close(rotated, posterior @ rotation.rotation, atol=1e-12, rtol=0)


def test_bartlett_scores_are_conditionally_unbiased() -> None:
    """W^T P = I, so E[f_hat | f] = f; on 20,000 draws the regression of the scores on the
    true factors has slope I within 0.02 (standard error ~ 0.005)."""
    pattern, noise, phi = oblique_model()
    weights = factor_score_weights(pattern, noise, "bartlett", phi)
    torch.testing.assert_close(weights.T @ pattern, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    f, x = sample(pattern, noise, phi, 20_000, seed=4)
    scores = factor_scores(x, torch.zeros(9, dtype=F64), pattern, noise, "bartlett", phi)
    slope = torch.linalg.lstsq(f, scores).solution
    torch.testing.assert_close(slope, torch.eye(3, dtype=F64), atol=0.02, rtol=0)


@pytest.mark.parametrize("oblique", [True, False])
def test_ten_berge_scores_are_correlated_as_phi(oblique: bool) -> None:
    """W^T C W = Phi exactly; on 20,000 draws the scores' correlations are Phi within 0.02."""
    pattern, noise, phi = oblique_model()
    if not oblique:
        pattern, phi = pattern @ torch.linalg.cholesky(phi), torch.eye(3, dtype=F64)
    weights = factor_score_weights(pattern, noise, "ten_berge", phi)
    cov = pattern @ phi @ pattern.T + torch.diag(noise)
    torch.testing.assert_close(weights.T @ cov @ weights, phi, atol=1e-12, rtol=0)
    _, x = sample(pattern, noise, phi, 20_000, seed=5)
    scores = factor_scores(x, torch.zeros(9, dtype=F64), pattern, noise, "ten_berge", phi)
    torch.testing.assert_close(correlation(scores), phi, atol=0.02, rtol=0)


def test_unknown_score_method() -> None:
    pattern, noise, phi = oblique_model()
    message = r"'anderson'\. Available: regression, bartlett, ten_berge"
    with pytest.raises(ConfigError, match=message):
        factor_score_weights(pattern, noise, "anderson", phi)


# -- how many factors -------------------------------------------------------------------------


def test_parallel_analysis_and_bic_find_the_true_number_of_factors() -> None:
    """Synthetic data from 3 correlated factors, 500 examples: both suggest 3; the random
    thresholds are a function of the seed."""
    pattern, noise, phi = oblique_model()
    _, x = sample(pattern, noise, phi, 500, seed=6)
    corr = correlation(x)
    analysis = parallel_analysis(corr, len(x), num_simulations=50, seed=7)
    assert analysis.num_factors == 3
    assert (analysis.eigenvalues[:3] > analysis.thresholds[:3]).all()
    again = parallel_analysis(corr, len(x), num_simulations=50, seed=7)
    assert torch.equal(again.thresholds, analysis.thresholds)
    selection = select_by_bic(corr, len(x), range(1, 5))
    assert selection.num_factors == 3
    assert list(selection.bic) == [1, 2, 3, 4]


@pytest.mark.parametrize(("num_obs", "dim"), [(40, 5), (4, 5)])
def test_random_eigenvalues_are_those_of_random_data(num_obs: int, dim: int) -> None:
    """The Wishart draws (Bartlett's decomposition; G G^T when N - 1 < D) have the
    distribution of the eigenvalues of the correlation matrix of N x D standard normal data,
    drawn directly here: means and 95th percentiles of 4000 draws each agree within Monte Carlo
    error (measured: means at most 0.010 apart, percentiles 0.009)."""
    rng = np.random.default_rng(0)
    ours = np.stack([random_eigenvalues(dim, num_obs, rng) for _ in range(4000)])
    direct = np.stack(
        [
            np.linalg.eigvalsh(np.corrcoef(rng.standard_normal((num_obs, dim)).T))[::-1]
            for _ in range(4000)
        ]
    )
    np.testing.assert_allclose(ours.sum(1), dim)  # the trace of a correlation matrix
    np.testing.assert_allclose(ours.mean(0), direct.mean(0), atol=0.03)
    np.testing.assert_allclose(
        np.quantile(ours, 0.95, axis=0), np.quantile(direct, 0.95, axis=0), atol=0.05
    )


def test_the_scree_picture_plots_the_eigenvalues_against_the_thresholds(tmp_path: Path) -> None:
    """Every point of each curve is a dot of its colour where the plot's axes put it (the
    thresholds drawn last; an eigenvalue's dot where no threshold's covers it); the PNG
    written is the picture returned."""
    pattern, noise, phi = oblique_model()
    _, x = sample(pattern, noise, phi, 300, seed=3)
    analysis = parallel_analysis(correlation(x), len(x), num_simulations=30)
    image = analysis.picture(tmp_path / "scree.png")
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "scree.png")), pixels)
    ranks = np.arange(1.0, len(analysis.eigenvalues) + 1)
    heights = np.concatenate([analysis.eigenvalues.numpy(), analysis.thresholds.numpy()])
    px = plots._to_pixels(ranks, *plots._span(ranks))
    y_range = plots._span(heights)
    threshold_y = plots._to_pixels(analysis.thresholds.numpy(), *y_range, flip=True)
    eigen_y = plots._to_pixels(analysis.eigenvalues.numpy(), *y_range, flip=True)
    for a, b in zip(px, threshold_y, strict=True):
        assert tuple(pixels[round(b), round(a)]) == plots.PALETTE[1]
    covered = np.abs(eigen_y - threshold_y) < 8
    assert (~covered).sum() >= 4
    for a, b in zip(px[~covered], eigen_y[~covered], strict=True):
        assert tuple(pixels[round(b), round(a)]) == plots.PALETTE[0]


def test_ledermann_bound() -> None:
    """The most factors with positive degrees of freedom: 5 for 10 features (6 leaves 0)."""
    assert max_latent_dim(10) == 5
    assert degrees_of_freedom(10, 6) == 0
    assert max_latent_dim(24) == 17
