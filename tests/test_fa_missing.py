"""Factor analysis with missing values by full-information maximum likelihood (FIML): the
observed-data log-likelihood against a dense per-pattern float64 computation, EM's guarantees,
the fit against complete-case factor analysis on values missing at random, DDP, the data
modules, the CLI and the scikit-learn estimator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm
from torch.utils.data import DataLoader

from vaeflow.analysis.saturated import (
    fit_saturated,
    independence_log_likelihood,
    saturated_e_step,
)
from vaeflow.cli import main
from vaeflow.data import ArrayDataModule
from vaeflow.errors import DataError
from vaeflow.models import FactorAnalysis, fa_math
from vaeflow.models.fa_missing import (
    add_sums_,
    m_step,
    observed_log_likelihood,
    patterns,
    posterior,
    zero_sums,
)
from vaeflow.sklearn import FactorAnalysis as SklearnFA

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: a second thread only adds synchronisation on the shared cores."""


def factor_model(dim: int = 8, latent: int = 2, seed: int = 0):
    """Random (W, Psi, mu) in float64."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.randn(dim, latent, generator=g, dtype=F64)
    noise = 0.2 + torch.rand(dim, generator=g, dtype=F64)
    mean = torch.randn(dim, generator=g, dtype=F64)
    return loadings, noise, mean


def draw(n: int, loadings, noise, mean, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, loadings.shape[1], generator=g, dtype=F64)
    eps = torch.randn(n, len(noise), generator=g, dtype=F64) * noise.sqrt()
    return mean + z @ loadings.T + eps


def missing_at_random(x: torch.Tensor, fraction: float, seed: int = 2) -> torch.Tensor:
    """NaN in about ``fraction`` of the cells, missing at random (MAR, not MCAR): the first
    feature is always observed, and each other value is missing with a probability that grows
    with the first feature's value (a logistic in it, scaled to the fraction asked for)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = x.shape
    anchor = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std()
    weight = torch.sigmoid(1.5 * anchor)[:, None].expand(n, dim - 1)
    probability = (weight * fraction * dim / (dim - 1) / weight.mean()).clamp(max=0.95)
    drop = torch.rand(n, dim - 1, generator=g, dtype=F64) < probability
    out = x.clone()
    out[:, 1:][drop] = torch.nan
    return out


def dense_observed_log_likelihood(x: torch.Tensor, loadings, noise, mean) -> np.ndarray:
    """log p(x_O) row by row, from the dense covariance C_OO = W_O W_O^T + Psi_O."""
    return dense_normal_log_likelihood(x, mean, loadings @ loadings.T + torch.diag(noise))


def dense_normal_log_likelihood(x: torch.Tensor, mean, cov) -> np.ndarray:
    """log p(x_O) row by row under N(mean, cov), grouped by pattern of observed coordinates,
    by scipy in float64."""
    cov = cov.numpy()
    values = x.numpy()
    observed = ~np.isnan(values)
    out = np.zeros(len(values))
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse.ravel() == index)
        if pattern.any():
            mvn = multivariate_normal(mean.numpy()[pattern], cov[np.ix_(pattern, pattern)])
            out[rows] = np.atleast_1d(mvn.logpdf(values[np.ix_(rows, pattern)]))
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_observed_log_likelihood_is_the_dense_per_pattern_value(fraction: float) -> None:
    loadings, noise, mean = factor_model()
    x = missing_at_random(draw(2000, loadings, noise, mean), fraction)
    assert torch.isnan(x).double().mean().item() == pytest.approx(fraction, abs=0.02)
    exact = dense_observed_log_likelihood(x, loadings, noise, mean)
    ours = observed_log_likelihood(x, loadings, noise, mean).numpy()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-8)
    assert abs(ours.mean() - exact.mean()) < 1e-8


@pytest.mark.parametrize("dim", [12, 70, 130])
def test_patterns_group_the_rows_as_numpy_unique_does(dim: int) -> None:
    """Rows grouped by their pattern of observed values (packed in one, two and three 63-bit
    words): the same groups as np.unique over rows, each mask that of its rows."""
    g = torch.Generator().manual_seed(3)
    # few distinct rows, so that patterns repeat, in random order
    distinct = torch.rand(40, dim, generator=g) < 0.8
    observed = distinct[torch.randint(0, 40, (500,), generator=g)]
    groups = patterns(observed)
    torch.testing.assert_close(groups.mask[groups.index], observed)
    assert int(groups.counts.sum()) == 500
    assert groups.counts.tolist() == torch.bincount(groups.index).tolist()
    reference, inverse = np.unique(observed.numpy(), axis=0, return_inverse=True)
    assert len(groups.mask) == len(reference)
    # the same partition of the rows: each group of ours is one of numpy's
    pairs = set(zip(groups.index.tolist(), inverse.ravel().tolist(), strict=True))
    assert len(pairs) == len(reference)


def test_complete_rows_give_the_complete_data_likelihood_and_posterior() -> None:
    loadings, noise, mean = factor_model(seed=3)
    x = draw(300, loadings, noise, mean)
    factors = fa_math.factorise(loadings, noise)
    post = posterior(x, loadings, noise, mean)
    torch.testing.assert_close(
        post.log_likelihood, fa_math.log_likelihood(x - mean, factors), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        post.mean, fa_math.posterior_mean(x - mean, factors), rtol=0, atol=1e-10
    )


def test_a_row_that_observes_nothing_has_the_prior_and_likelihood_zero() -> None:
    loadings, noise, mean = factor_model()
    x = torch.full((1, len(noise)), torch.nan, dtype=F64)
    post = posterior(x, loadings, noise, mean)
    assert post.log_likelihood.item() == 0
    assert torch.equal(post.mean, torch.zeros(1, 2, dtype=F64))


def em_step(x: torch.Tensor, loadings, noise, mean, batches: int = 1):
    """One FIML EM step over ``x`` cut into ``batches``: the mean log-likelihood at the
    parameters and the new parameters."""
    sums = zero_sums(*loadings.shape, x)
    for batch in x.tensor_split(batches):
        add_sums_(sums, batch, loadings, noise, mean)
    assert sums.rows.item() == (~torch.isnan(x)).any(1).sum().item()
    w, psi, step = m_step(sums, torch.full_like(noise, 1e-8), isotropic=False)
    return sums.log_likelihood / sums.rows, (w, psi, mean + step)


def test_with_complete_data_at_the_sample_mean_the_m_step_is_complete_data_em() -> None:
    """At mu = the sample mean, the joint update of (W, mu, Psi) keeps the mean and gives the
    complete-data M-step of :mod:`vaeflow.models.fa_math`."""
    loadings, noise, mean = factor_model(seed=4)
    x = draw(500, loadings, noise, mean)
    centre = x.mean(0)
    start = (0.5 * loadings, noise + 0.3)
    _, (w, psi, mu) = em_step(x, *start, centre)
    xc = x - centre
    factors = fa_math.factorise(*start)
    moments = fa_math.moments_at(xc.T @ xc / len(x), factors)
    w_ref, psi_ref = fa_math.m_step(factors, moments, torch.full_like(noise, 1e-8), False)
    torch.testing.assert_close(mu, centre, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(psi, psi_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_em_is_monotone_and_ends_at_a_stationary_point(fraction: float) -> None:
    """Every step raises the observed-data log-likelihood (to round-off), batches sum to the
    one-batch step, and after the fit the dense log-likelihood's gradient in (W, mu, log Psi),
    by autograd in float64, vanishes."""
    truth = factor_model(seed=5)
    x = missing_at_random(draw(1000, *truth), fraction)
    mean = torch.nanmean(x, 0)
    observed = ~torch.isnan(x)
    noise = torch.where(observed, x - mean, 0).pow(2).sum(0) / observed.sum(0)
    loadings = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    history = []
    for step in range(400):
        ll, update = em_step(x, loadings, noise, mean)
        if step == 0:
            _, batched = em_step(x, loadings, noise, mean, batches=7)
            for a, b in zip(update, batched, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
        history.append(ll.item())
        loadings, noise, mean = update
    gains = np.diff(history)
    assert gains.min() > -1e-12, gains.min()
    assert history[-1] - history[0] > 0.1

    params = [p.clone().requires_grad_() for p in (loadings, mean, noise.log())]
    torch_observed_log_likelihood(x, *params).backward()
    for p in params:
        assert p.grad.abs().max().item() < 1e-6


def torch_observed_log_likelihood(x: torch.Tensor, loadings, mean, log_noise) -> torch.Tensor:
    """The mean observed-data log-likelihood per row from the dense covariance, pattern by
    pattern by torch.distributions, differentiable in the parameters."""
    observed = ~torch.isnan(x)
    cov = loadings @ loadings.T + torch.diag(log_noise.exp())
    total = 0
    for pattern in observed.unique(dim=0):
        rows = (observed == pattern).all(1)
        sub = x[rows][:, pattern]
        mvn = torch.distributions.MultivariateNormal(mean[pattern], cov[pattern][:, pattern])
        total = total + mvn.log_prob(sub).sum()
    return total / len(x)


# -- the model: FactorAnalysis(missing=...) through Lightning ------------------------------------


def fit_model(trainer, x: torch.Tensor, latent: int = 2, batch_size: int = 400, **kwargs):
    """A FactorAnalysis fitted to the rows x (N x D) through Lightning."""
    model = FactorAnalysis((x.shape[1],), latent_dim=latent, **kwargs)
    trainer().fit(model, train_dataloaders=DataLoader(x, batch_size=batch_size))
    return model


def missing_cells_log_likelihood(model: FactorAnalysis, full: torch.Tensor, holed) -> float:
    """Held-out log-likelihood of the missing cells given the observed ones, sum over rows of
    log p(x_M | x_O) = log p(x) - log p(x_O), per row with a missing value."""
    rows = torch.isnan(holed).any(1)
    joint = model.log_likelihood(full[rows])
    return (joint - model.log_likelihood(holed[rows])).mean().item()


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_fiml_predicts_held_out_missing_cells_better_than_complete_cases(
    em_trainer, fraction: float
) -> None:
    """Values missing at random (MAR: more often where the first feature is high): the FIML fit
    is monotone and reports the observed-data log-likelihood, and on new rows with values
    missing the same way it predicts the missing cells from the observed ones better than
    complete-case factor analysis (which, under MAR, fits fewer and unrepresentative rows).
    Measured: FIML ahead by 6e-4 nats per row at 10%, 0.069 at 30%."""
    truth = factor_model(dim=8, latent=2, seed=6)
    holed = missing_at_random(draw(1500, *truth, seed=7), fraction, seed=8)
    test = draw(2000, *truth, seed=17)
    test_holed = missing_at_random(test, fraction, seed=18)
    fiml = fit_model(em_trainer, holed, missing="fiml")
    complete = fit_model(em_trainer, holed, missing="complete_cases")
    lls = [row["train/log_likelihood"] for row in fiml.history]
    assert np.diff(lls).min() > -1e-12
    assert fiml.stop_reason in ("aitken", "round-off")
    assert lls[-1] == pytest.approx(fiml.log_likelihood(holed).mean().item(), abs=1e-12)
    assert complete.incomplete_rows == int(torch.isnan(holed).any(1).sum())
    ours = missing_cells_log_likelihood(fiml, test, test_holed)
    theirs = missing_cells_log_likelihood(complete, test, test_holed)
    assert ours > theirs, (ours, theirs)


def test_complete_cases_is_the_fit_of_the_complete_rows(em_trainer) -> None:
    truth = factor_model(seed=9)
    holed = missing_at_random(draw(1000, *truth), 0.05)
    dropped = fit_model(em_trainer, holed, missing="complete_cases")
    kept = fit_model(em_trainer, holed[~torch.isnan(holed).any(1)])
    torch.testing.assert_close(dropped.mean, kept.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        dropped.log_likelihood(holed), kept.log_likelihood(holed), rtol=0, atol=1e-10
    )


def test_without_missing_values_fiml_reaches_the_complete_data_fit(em_trainer) -> None:
    truth = factor_model(seed=10)
    x = draw(800, *truth)
    fiml = fit_model(em_trainer, x, missing="fiml", tol=1e-10)
    exact = fit_model(em_trainer, x, tol=1e-10)
    assert fiml.history[-1]["train/log_likelihood"] == pytest.approx(
        exact.history[-1]["train/log_likelihood"], abs=1e-7
    )
    torch.testing.assert_close(fiml.mean, exact.mean, rtol=0, atol=1e-5)


def test_nan_is_refused_by_default_with_both_alternatives(em_trainer) -> None:
    holed = missing_at_random(draw(200, *factor_model()), 0.1)
    with pytest.raises(DataError, match=r"missing: fiml .* missing: complete_cases"):
        fit_model(em_trainer, holed)


def test_em_in_memory_takes_the_steps_of_em_by_passes(em_trainer) -> None:
    """Unless streaming, EM iterates on the batches the first pass kept: without SQUAREM, the
    same iterates as one EM iteration per pass over the data."""
    holed = missing_at_random(draw(900, *factor_model(seed=12)), 0.2)
    kwargs = dict(missing="fiml", max_iter=15, tol=0.0, batch_size=200, accelerate=False)
    memory = fit_model(em_trainer, holed, **kwargs)
    streaming = fit_model(em_trainer, holed, method="streaming", **kwargs)
    assert len(memory.history) == len(streaming.history) == 16
    for a, b in zip(memory.history, streaming.history, strict=True):
        assert a["train/log_likelihood"] == pytest.approx(b["train/log_likelihood"], abs=1e-12)
    torch.testing.assert_close(memory.loadings, streaming.loadings, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_squarem_in_memory_reaches_plain_em_s_maximum_in_fewer_iterations(
    em_trainer, fraction: float
) -> None:
    """SQUAREM cycles on the kept batches: the logged observed-data log-likelihood never
    decreases, the fit ends at plain EM's maximum (both at tol 1e-10; measured 1e-10 apart,
    SQUAREM's the higher), where the dense per-pattern log-likelihood's gradient vanishes, in
    far fewer iterations (measured 15 and 21 cycles, of about three E-steps each, against 196
    and 277 EM steps)."""
    holed = missing_at_random(draw(1000, *factor_model(seed=13)), fraction, seed=14)
    fast = fit_model(em_trainer, holed, missing="fiml", tol=1e-10, batch_size=300)
    plain = fit_model(em_trainer, holed, missing="fiml", tol=1e-10, accelerate=False)
    lls = [row["train/log_likelihood"] for row in fast.history]
    assert np.diff(lls).min() > -1e-12  # EM's guarantee, to round-off
    assert lls[-1] == pytest.approx(plain.history[-1]["train/log_likelihood"], abs=1e-9)
    fitted = (p.detach() for p in (fast.loadings, fast.noise_variance, fast.mean))
    assert dense_observed_log_likelihood(holed, *fitted).mean() == pytest.approx(lls[-1], abs=1e-10)
    assert int(fast.n_iter) < int(plain.n_iter) / 4, (int(fast.n_iter), int(plain.n_iter))
    params = [p.detach().clone().requires_grad_() for p in (fast.loadings, fast.mean)]
    log_psi = fast.noise_variance.detach().log().requires_grad_()
    total = torch_observed_log_likelihood(holed, *params, log_psi)
    total.backward()
    for p in (*params, log_psi):
        assert p.grad.abs().max().item() < 1e-5


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["auto", "streaming"])
def test_two_processes_fit_what_one_process_fits(
    em_trainer, ddp_spawn, tmp_path: Path, method: str
) -> None:
    """FIML's sums are added across processes once per iteration (in memory) or per pass
    (streaming): 2 processes (gloo) fit what one does, the first pass's shift broadcast from
    rank 0; the data module lets NaN through."""
    holed = missing_at_random(draw(1200, *factor_model(seed=11)), 0.3)
    np.save(tmp_path / "holed.npy", holed.numpy())
    data = ArrayDataModule(str(tmp_path / "holed.npy"))
    kwargs = dict(missing="fiml", max_iter=6, tol=0.0, method=method)
    single = FactorAnalysis((8,), latent_dim=2, **kwargs)
    em_trainer().fit(single, datamodule=data)
    double = FactorAnalysis((8,), latent_dim=2, **kwargs)
    em_trainer(strategy=ddp_spawn, devices=2).fit(double, datamodule=data)
    assert int(single.n_iter) == 6
    for name in ("loadings", "noise_variance"):
        torch.testing.assert_close(
            getattr(double, name), getattr(single, name), rtol=1e-9, atol=1e-10
        )
    torch.testing.assert_close(double.mean, single.mean, rtol=1e-10, atol=1e-12)


def test_factor_scores_of_rows_with_missing_values(em_trainer) -> None:
    """Regression scores of a row with NaN are E[f | observed values] of the rotated factors:
    the complete-data scores for a complete row, the rotated posterior mean of the observed
    values otherwise; Bartlett's need every value."""
    holed = missing_at_random(draw(600, *factor_model(seed=13)), 0.2)
    model = fit_model(em_trainer, holed, missing="fiml", rotation="oblimin")
    rotation = model.rotated()
    scores = model.factor_scores(holed, rotation=rotation)
    complete = ~torch.isnan(holed).any(1)
    torch.testing.assert_close(
        scores[complete], model.factor_scores(holed[complete]), rtol=0, atol=1e-10
    )
    row = holed[~complete][:1]
    seen = ~torch.isnan(row[0])
    w, psi = model.loadings.detach()[seen], model.noise_variance.detach()[seen]
    cov = w @ w.T + torch.diag(psi)
    z = w.T @ torch.linalg.solve(cov, row[0, seen] - model.mean.detach()[seen])  # E[z | x_O]
    torch.testing.assert_close(scores[~complete][0], z @ rotation.rotation, rtol=0, atol=1e-10)
    with pytest.raises(DataError, match="bartlett factor scores need every value"):
        model.factor_scores(holed, method="bartlett")


# -- fit statistics of FIML fits: the saturated and independence models -------------------------


def test_the_saturated_em_ends_at_the_maximum_of_the_dense_observed_likelihood() -> None:
    """The saturated model's log-likelihood equals the dense per-pattern value at its estimate
    (1e-10 per row); run to round-off (tol 0: 42 iterations from the diagonal start), the
    estimate is stationary (one more EM step moves nothing by 1e-7; at the default tol 1e-10
    nats per row, 1e-6: parameters converge as the square root of the likelihood); it fits at
    least as well as the true factor model; batches give the same sums."""
    truth = factor_model(seed=14)
    holed = missing_at_random(draw(1200, *truth), 0.3)
    mean, var = torch.nanmean(holed, 0), torch.from_numpy(np.nanvar(holed.numpy(), 0))
    fit = fit_saturated([holed], mean, torch.diag(var), tol=0.0)
    dense = dense_normal_log_likelihood(holed, fit.mean, fit.covariance)
    assert fit.log_likelihood == pytest.approx(dense.mean(), abs=1e-10)
    assert fit.num_rows == len(holed)
    n, first, second, _ = saturated_e_step([holed], fit.mean, fit.covariance)
    step = first / n
    torch.testing.assert_close(step, torch.zeros_like(step), rtol=0, atol=1e-7)
    torch.testing.assert_close(
        second / n - torch.outer(step, step), fit.covariance, rtol=0, atol=1e-7
    )
    assert fit.log_likelihood > dense_observed_log_likelihood(holed, *truth).mean()
    batched = saturated_e_step(list(holed.tensor_split(5)), fit.mean, fit.covariance)
    for a, b in zip(batched, (n, first, second, _), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


def test_the_independence_model_is_each_features_observed_normal() -> None:
    holed = missing_at_random(draw(500, *factor_model(seed=15)), 0.2)
    ours = independence_log_likelihood(holed.tensor_split(3), torch.zeros(8, dtype=F64))
    values = holed.numpy()
    dense = sum(
        norm(np.nanmean(column), np.nanstd(column)).logpdf(column[~np.isnan(column)]).sum()
        for column in values.T
    ) / len(values)
    assert ours == pytest.approx(dense, abs=1e-10)


def test_a_just_identified_model_fits_like_the_saturated_one() -> None:
    """One factor of three features has 0 degrees of freedom: it reproduces any covariance
    (without a Heywood case), so its FIML fit reaches the saturated likelihood: F = 0."""
    truth = factor_model(dim=3, latent=1, seed=16)
    holed = missing_at_random(draw(800, *truth), 0.2).numpy()
    fa = SklearnFA(1, missing="fiml", tol=1e-12, max_iter=20000).fit(holed)
    statistics = fa.fit_statistics_
    assert statistics.dof == 0 and np.isnan(statistics.p_value)
    assert abs(statistics.discrepancy) < 1e-8 and statistics.chi_square < 1e-5


def test_without_missing_values_fiml_statistics_are_the_complete_data_ones() -> None:
    """Measured: chi-square 3e-8 relative apart, SRMR 1.5e-7 (the two fits' tolerance)."""
    x = draw(1500, *factor_model(seed=6)).numpy()
    fiml = SklearnFA(2, missing="fiml", tol=1e-10).fit(x).fit_statistics_
    complete = SklearnFA(2, tol=1e-10).fit(x).fit_statistics_
    for name in ("chi_square", "dof", "p_value", "tli", "bic", "null_chi_square"):
        assert getattr(fiml, name) == pytest.approx(getattr(complete, name), rel=1e-6), name
    assert fiml.log_likelihood == pytest.approx(complete.log_likelihood, abs=1e-9)
    assert fiml.srmr == pytest.approx(complete.srmr, abs=1e-5)


LAVAAN = """suppressMessages(library(lavaan))
d <- read.csv("holed.csv")
fit <- cfa("f =~ NA*x1 + x2 + x3 + x4 + x5 + x6\nf ~~ 1*f", d, missing = "ml")
cat(sprintf("%.10f", fitMeasures(fit, c("logl", "unrestricted.logl", "chisq", "baseline.chisq"))))
"""


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R is not installed")
def test_fiml_statistics_reproduce_lavaan(tmp_path: Path) -> None:
    """lavaan 0.6.14's ``cfa(missing = "ml")`` of one factor (an exploratory model: M = 1 has
    no rotation) on 500 rows with 20% of values missing at random: the model's and the
    saturated model's log-likelihoods and lavaan's chi-square n F and baseline chi-square
    n F0. Measured: 1e-11 relative apart, the chi-square 2e-8 (a difference of the two)."""
    holed = missing_at_random(draw(500, *factor_model(dim=6, latent=1, seed=4), seed=5), 0.2)
    header = "x1,x2,x3,x4,x5,x6"
    np.savetxt(tmp_path / "holed.csv", holed.numpy(), delimiter=",", header=header, comments="")
    run = subprocess.run(
        ["Rscript", "-e", LAVAAN], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        pytest.skip(f"lavaan is not installed: {run.stderr[-200:]}")
    logl, unrestricted, chisq, baseline = map(float, run.stdout.split())
    s = SklearnFA(1, missing="fiml", tol=1e-12).fit(holed.numpy()).fit_statistics_
    n = len(holed)
    assert n * s.log_likelihood == pytest.approx(logl, rel=1e-7)
    assert n * (s.log_likelihood + s.discrepancy / 2) == pytest.approx(unrestricted, rel=1e-7)
    assert n * s.discrepancy == pytest.approx(chisq, rel=1e-6)
    assert n * s.null_discrepancy == pytest.approx(baseline, rel=1e-7)


# -- empty CSV cells ------------------------------------------------------------------------------


def write_holed_csv(path: Path, holed: torch.Tensor) -> None:
    """A CSV with a header whose missing values are empty cells (``1,,3``)."""
    lines = [",".join(f"x{d + 1}" for d in range(holed.shape[1]))]
    lines += [",".join("" if np.isnan(v) else f"{v:.17g}" for v in row) for row in holed.tolist()]
    path.write_text("\n".join(lines) + "\n")


def test_empty_csv_cells_are_missing_values_to_fiml_and_complete_cases(
    em_trainer, tmp_path: Path
) -> None:
    """An empty cell reads as NaN: FIML fits what it fits of the same values given as NaN,
    complete cases leave those rows out, and the default refuses with both options, naming
    the line."""
    holed = missing_at_random(draw(400, *factor_model(seed=17)), 0.1)
    write_holed_csv(tmp_path / "holed.csv", holed)
    data = ArrayDataModule(str(tmp_path / "holed.csv"))
    assert data.feature_names == [f"x{d + 1}" for d in range(8)]
    fiml = FactorAnalysis(latent_dim=2, missing="fiml", max_iter=5)
    em_trainer().fit(fiml, datamodule=data)
    direct = fit_model(em_trainer, holed, missing="fiml", max_iter=5)
    torch.testing.assert_close(fiml.loadings, direct.loadings, rtol=1e-10, atol=1e-12)
    dropped = FactorAnalysis(latent_dim=2, missing="complete_cases")
    em_trainer().fit(dropped, datamodule=ArrayDataModule(str(tmp_path / "holed.csv")))
    assert dropped.incomplete_rows == int(torch.isnan(holed).any(1).sum())
    first = 2 + int(torch.isnan(holed).any(1).nonzero()[0])  # the header is line 1
    refused = FactorAnalysis(latent_dim=2)
    message = rf"line {first} of .* has an empty cell: .* missing: fiml .* missing: complete_cases"
    with pytest.raises(DataError, match=message):
        em_trainer().fit(refused, datamodule=ArrayDataModule(str(tmp_path / "holed.csv")))


def test_the_command_line_reports_fiml_statistics_of_a_csv_with_empty_cells(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    """``missing: fiml`` on a CSV with empty cells: summary.txt has the fit statistics (against
    the saturated model) and the scree picture of its correlation matrix."""
    monkeypatch.chdir(tmp_path)
    holed = missing_at_random(draw(600, *factor_model(seed=18)), 0.2)
    write_holed_csv(tmp_path / "survey.csv", holed)
    Path("fa.yaml").write_text(
        "data:\n  class_path: vaeflow.data.ArrayDataModule\n  init_args:\n"
        "    path: survey.csv\n"
        "model:\n  class_path: vaeflow.models.FactorAnalysis\n  init_args:\n"
        "    latent_dim: 2\n    missing: fiml\n"
    )
    main(["fit", "--config", "fa.yaml", "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    run = tmp_path / "runs" / "fa" / "version_0"
    summary = (run / "summary.txt").read_text()
    expected = SklearnFA(2, missing="fiml").fit(holed.numpy()).fit_statistics_
    line = f"on {expected.dof:g} degrees of freedom"
    assert line in printed and line in summary and "RMSEA" in summary
    chi = float(summary.split("Chi-square (Bartlett's correction): ")[1].split()[0])
    assert chi == pytest.approx(expected.chi_square, abs=0.01)
    assert "Parallel analysis" in summary and (run / "scree.png").is_file()
