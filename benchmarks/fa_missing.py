"""Factor analysis of data with missing values: vaeflow's FIML against the FIML fits of semopy
(Python) and lavaan (R), and against imputation followed by scikit-learn, in one run.

Data: N rows from a known factor model (D features, M factors, heteroscedastic noise), with a
fraction of the cells missing at random (MAR: a value is missing more often where the first
feature, always observed, is high). The same model is fitted by

- **vaeflow**: ``vaeflow.sklearn.FactorAnalysis(M, missing="fiml")`` (EM on each row's observed
  values, the whole Lightning fit);
- **semopy** 2.3 (PyPI): ``ModelMeans`` with ``obj="ML"``, which is its per-pattern FIML
  objective, run only where semopy is installed;
- **lavaan** (R, from the distribution's ``r-cran-lavaan``): ``cfa(..., missing = "ml")``, the
  reference implementation of FIML in SEM software, timed inside R (R's start and reading the
  file excluded), run only where ``Rscript`` with lavaan is installed;

both peers with the exploratory model written as a confirmatory one in echelon form (loading j
of factor k fixed to 0 for j < k, factor variances 1): the same likelihood as exploratory ML
factor analysis, identified. A different model is timed beside them: **mean imputation** then
scikit-learn's ``FactorAnalysis`` (factor_analyzer's estimator does not run on scikit-learn 1.8,
and it only drops or imputes missing values too).

Every fit is scored by one evaluator: the mean observed-data log-likelihood per row (nats),
per pattern of observed values from the fit's implied mean and covariance (scipy, float64),
printed to 1e-9 so that the FIML fits' distance from one another shows. The FIML fits reach
the same maximum; imputation does not. Times are the best of ``--repeats``
(semopy's, which take minutes, of one fit).

    python benchmarks/fa_missing.py --rows 2000 --features 12 --factors 3 --fraction 0.2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import multivariate_normal
from sklearn.decomposition import FactorAnalysis as SklearnFA
from sklearn.impute import SimpleImputer

from vaeflow.sklearn import FactorAnalysis

Fit = tuple[np.ndarray, np.ndarray]  # implied mean (D) and covariance (D x D)


def make_data(rows: int, dim: int, latent: int, fraction: float, seed: int) -> np.ndarray:
    """Rows of a factor model with NaN in about ``fraction`` of the cells, missing at random."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(dim, latent))
    noise = np.geomspace(0.2, 1.0, dim)
    x = rng.normal(size=(rows, latent)) @ loadings.T + rng.normal(size=(rows, dim)) * np.sqrt(noise)
    x += rng.normal(size=dim) * 3
    anchor = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std()
    weight = 1 / (1 + np.exp(-1.5 * anchor))
    probability = np.minimum(weight / weight.mean() * fraction * dim / (dim - 1), 0.95)
    holed = x.copy()
    holed[:, 1:][rng.random((rows, dim - 1)) < probability[:, None]] = np.nan
    return holed


def observed_log_likelihood(x: np.ndarray, fit: Fit) -> float:
    """Mean log p(x_O) per row, pattern by pattern, from the implied mean and covariance."""
    mean, cov = fit
    observed = ~np.isnan(x)
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    total = 0.0
    for index, pattern in enumerate(patterns):
        rows = x[inverse.ravel() == index][:, pattern]
        mvn = multivariate_normal(mean[pattern], cov[np.ix_(pattern, pattern)])
        total += np.sum(mvn.logpdf(rows))
    return total / len(x)


def fit_vaeflow(x: np.ndarray, latent: int) -> Fit:
    estimator = FactorAnalysis(latent, missing="fiml").fit(x)
    return estimator.mean_, estimator.get_covariance()


def echelon_model(dim: int, latent: int) -> str:
    """The exploratory model as a confirmatory one, identified in echelon form (lavaan's and
    semopy's syntax): factor k loads on features k.. (k from 0); factor variances 1."""
    lines = [f"f{k} =~ " + " + ".join(f"x{j}" for j in range(k, dim)) for k in range(latent)]
    lines += [f"f{k} ~~ 1*f{k}" for k in range(latent)]
    lines += [f"f{k} ~~ 0*f{other}" for k in range(latent) for other in range(k + 1, latent)]
    return "\n".join(lines)


def fit_semopy(x: np.ndarray, latent: int) -> Fit:
    import semopy

    frame = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])])
    model = semopy.ModelMeans(echelon_model(x.shape[1], latent))
    model.fit(frame, obj="ML")  # ModelMeans's ML is its FIML objective
    sigma, (m, _) = model.calc_sigma()
    mean = model.calc_mean(m).ravel()
    order = [model.vars["observed"].index(f"x{j}") for j in range(x.shape[1])]
    return mean[order], sigma[np.ix_(order, order)]


LAVAAN = """
suppressMessages(library(lavaan))
d <- read.csv("{data}")
best <- Inf
for (i in seq_len({repeats})) {{
  start <- proc.time()[["elapsed"]]
  fit <- cfa("{model}", data = d, missing = "ml", std.lv = TRUE)
  best <- min(best, proc.time()[["elapsed"]] - start)
}}
implied <- fitted(fit)
write.table(implied$cov[names(d), names(d)], "{out}_cov.csv", sep = ",", row.names = FALSE,
            col.names = FALSE)
write.table(implied$mean[names(d)], "{out}_mean.csv", sep = ",", row.names = FALSE,
            col.names = FALSE)
cat(best, as.character(packageVersion("lavaan")), "\\n")
"""


def run_lavaan(x: np.ndarray, latent: int, repeats: int) -> tuple[float, Fit, str] | None:
    """lavaan's best time of ``repeats`` fits, measured in R, its fit and version; None where
    Rscript or lavaan is missing."""
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data.csv"
        pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])]).to_csv(
            data, index=False, na_rep="NA"
        )
        script = LAVAAN.format(
            data=data,
            repeats=repeats,
            model=echelon_model(x.shape[1], latent).replace("\n", "; "),
            out=Path(folder) / "fit",
        )
        done = subprocess.run(
            ["Rscript", "-e", script], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(f"lavaan: not run ({done.stderr.strip().splitlines()[-1:]})")
            return None
        seconds, version = done.stdout.split()
        cov = np.loadtxt(Path(folder) / "fit_cov.csv", delimiter=",")
        mean = np.loadtxt(Path(folder) / "fit_mean.csv", delimiter=",")
        return float(seconds), (mean, cov), version


def fit_imputed(x: np.ndarray, latent: int) -> Fit:
    filled = SimpleImputer().fit_transform(x)
    model = SklearnFA(latent, random_state=0).fit(filled)
    return model.mean_, model.get_covariance()


def best_time(fit: Callable[[np.ndarray, int], Fit], x, latent, repeats) -> tuple[float, Fit]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fit(x, latent)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--features", type=int, default=12)
    parser.add_argument("--factors", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x = make_data(args.rows, args.features, args.factors, args.fraction, args.seed)
    print(
        f"{args.rows} rows x {args.features} features, {args.factors} factors, "
        f"{np.isnan(x).mean():.1%} of cells missing at random, "
        f"{np.isnan(x).any(axis=1).mean():.1%} of rows incomplete; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; best of {args.repeats}"
    )
    results: list[tuple[str, float, Fit]] = []
    seconds, fit = best_time(fit_vaeflow, x, args.factors, args.repeats)
    results.append(("vaeflow FIML (EM)", seconds, fit))
    if importlib.util.find_spec("semopy") is None:
        print("semopy: not run (not installed: pip install semopy)")
    else:
        seconds, fit = best_time(fit_semopy, x, args.factors, 1)  # minutes a fit: timed once
        results.append(("semopy FIML (ModelMeans, once)", seconds, fit))
    lavaan = run_lavaan(x, args.factors, args.repeats)
    if lavaan is not None:
        results.append((f"lavaan {lavaan[2]} FIML (missing='ml')", lavaan[0], lavaan[1]))
    seconds, fit = best_time(fit_imputed, x, args.factors, args.repeats)
    results.append(("mean imputation + scikit-learn FA", seconds, fit))
    ours = results[0][1]
    print(f"{'fit':<36} {'seconds':>9} {'x vaeflow':>10} {'observed-data LL/row':>22}")
    for name, seconds, fit in results:
        ll = observed_log_likelihood(x, fit)
        print(f"{name:<36} {seconds:>9.3f} {seconds / ours:>10.1f} {ll:>22.9f}")


if __name__ == "__main__":
    main()
