"""vaeflow's factor analysis as a scikit-learn estimator, for pipelines and grid searches.

The fit is vaeflow's exact EM (:class:`vaeflow.models.FactorAnalysis`, float64, on the CPU or a
GPU), and the analysis that practitioners report comes from :mod:`vaeflow.analysis`:
rotations, standardised loadings, communalities, factor scores and fit statistics.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Trainer
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from vaeflow.analysis import (
    FitStatistics,
    fit_statistics,
    rotate,
    summarize,
)
from vaeflow.analysis.scores import factor_scores
from vaeflow.models import FactorAnalysis as EMFactorAnalysis
from vaeflow.models.fa_missing import observed_regression_scores

F64 = torch.float64


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up lines and the warnings about the loops an estimator does not use
    (no validation, one batch), for the duration of one fit only."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        logger.setLevel(level)


class FactorAnalysis(TransformerMixin, BaseEstimator):
    """Maximum-likelihood factor analysis by vaeflow's exact EM, with rotations, factor scores
    and fit statistics, in scikit-learn's conventions.

    Args:
        n_components: number of factors M (at most D - 1).
        rotation: a rotation of :data:`vaeflow.analysis.ROTATIONS` (``varimax``,
            ``quartimax``, ``equamax``, ``promax``, ``oblimin``, ``quartimin``, ``geomin``),
            or None. The likelihood does not change under rotation.
        scores: the default method of :meth:`transform`: ``regression`` (Thurstone),
            ``bartlett`` or ``ten_berge``.
        missing: what NaN means: ``refuse`` (an error that names the alternatives), ``fiml``
            (a missing value: full-information maximum likelihood, EM on each row's observed
            values, :mod:`vaeflow.models.fa_missing`) or ``complete_cases`` (rows with a NaN
            are dropped).
        noise: ``diagonal`` (factor analysis) or ``isotropic`` (probabilistic PCA).
        tol: EM stops when the log-likelihood is estimated to be within this many nats per
            example of its limit (:class:`vaeflow.models.stopping.StoppingRule`).
        max_iter: most EM iterations.
        device: where EM runs (``cpu``, ``cuda``, ...).
        random_state: seed of the PPCA start's randomised eigensolver.

    Attributes:
        components_: the (rotated) loadings in the data's units, M x D (scikit-learn's
            layout); for an oblique rotation, the pattern.
        noise_variance_: the noise variances Psi (D).
        mean_: the feature means (D).
        loadings_: the (rotated) pattern on the correlation scale, D x M.
        phi_: the factor correlations (M x M; the identity unless the rotation is oblique).
        communalities_: diag(P Phi P^T) on the correlation scale (D).
        uniquenesses_: 1 - communalities_ (D).
        rotation_matrix_: T, with pattern = A T^(-T) and Phi = T^T T for the unrotated A.
        fit_statistics_: chi-square with Bartlett's correction, RMSEA, TLI, BIC, SRMR and the
            log-likelihood (:class:`vaeflow.analysis.FitStatistics`); None for ``fiml`` fits
            of data with missing values, whose chi-square needs the saturated model's FIML fit.
        log_likelihood_: the fit's mean log-likelihood per row (nats), of the observed values
            for ``fiml``.
        n_iter_: EM iterations taken; ``stop_reason_``: why EM stopped.
        n_features_in_, feature_names_in_: as scikit-learn sets them.
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        rotation: str | None = None,
        scores: Literal["regression", "bartlett", "ten_berge"] = "regression",
        missing: Literal["refuse", "fiml", "complete_cases"] = "refuse",
        noise: Literal["diagonal", "isotropic"] = "diagonal",
        tol: float = 1e-6,
        max_iter: int = 1000,
        device: str = "cpu",
        random_state: int = 0,
    ) -> None:
        self.n_components = n_components
        self.rotation = rotation
        self.scores = scores
        self.missing = missing
        self.noise = noise
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> FactorAnalysis:
        """Fit the factor model to X (N x D: an array or a DataFrame) by EM."""
        x = self._rows(validate_data(self, X, dtype=np.float64, ensure_all_finite=False))
        num_obs, dim = x.shape
        if num_obs < 2:
            raise ValueError(
                f"n_samples={num_obs}: factor analysis needs at least 2 samples to have a "
                "covariance to model"
            )
        if not 1 <= self.n_components < dim:
            raise ValueError(
                f"n_components must be between 1 and n_features - 1 = {dim - 1} for data with "
                f"{dim} feature(s), got {self.n_components}"
            )
        model = EMFactorAnalysis(
            (dim,),
            latent_dim=self.n_components,
            noise=self.noise,
            tol=self.tol,
            max_iter=self.max_iter,
            missing="fiml" if self.missing == "fiml" else "refuse",
            seed=self.random_state,
        )
        data = torch.utils.data.DataLoader(torch.from_numpy(x), batch_size=num_obs)
        with quiet_lightning():
            Trainer(
                accelerator=self.device,
                devices=1,
                max_epochs=-1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            ).fit(model, train_dataloaders=data)
        self._model = model.cpu()
        self._set_solution(torch.from_numpy(x), num_obs)
        return self

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """The rows to fit or score, after the ``missing`` policy."""
        if self.missing not in ("refuse", "fiml", "complete_cases"):
            raise ValueError(
                f"missing must be 'refuse', 'fiml' or 'complete_cases', got {self.missing!r}"
            )
        if np.isinf(x).any():
            raise ValueError("Input X contains infinity: factor analysis needs finite values")
        incomplete = np.isnan(x).any(axis=1)
        if self.missing == "fiml" and np.isnan(x).all(axis=0).any():
            raise ValueError("Input X has a feature without any value: drop it")
        if incomplete.any() and self.missing != "fiml":
            if self.missing == "refuse":
                raise ValueError(
                    f"Input X contains NaN in {int(incomplete.sum())} of {len(x)} rows: set "
                    "missing='fiml' to fit every observed value (full-information maximum "
                    "likelihood), missing='complete_cases' to fit the complete rows only, or "
                    "impute them"
                )
            x = x[~incomplete]
            if len(x) == 0:
                raise ValueError("Input X has no row without NaN: nothing to fit")
        # torch warns about tensors over read-only memory (which the fit never writes)
        return x if x.flags.writeable else x.copy()

    def _set_solution(self, x: Tensor, num_obs: int) -> None:
        model = self._model
        unrotated = model.loadings.detach()
        psi = model.noise_variance.detach()
        if self.rotation is None:
            eye = torch.eye(self.n_components, dtype=F64)
            pattern, phi, rotation = unrotated, eye, eye
        else:
            pattern, phi, rotation = rotate(unrotated, self.rotation)
        summary = summarize(pattern, psi, phi)
        self.components_ = pattern.T.numpy()
        self.noise_variance_ = psi.numpy()
        self.mean_ = model.mean.detach().numpy()
        self.loadings_ = summary.pattern.numpy()
        self.phi_ = phi.numpy()
        self.communalities_ = summary.communalities.numpy()
        self.uniquenesses_ = summary.uniquenesses.numpy()
        self.rotation_matrix_ = rotation.numpy()
        self.log_likelihood_ = model.log_likelihood(x).mean().item()
        self.fit_statistics_: FitStatistics | None = None
        if not torch.isnan(x).any():
            centred = x - model.mean.detach()
            cov = centred.T @ centred / num_obs
            self.fit_statistics_ = fit_statistics(cov, unrotated, psi, num_obs)
        self.n_iter_ = int(model.n_iter)
        self.stop_reason_ = model.stop_reason

    def _checked(self, X: Any, allow_nan: bool = False) -> Tensor:
        check_is_fitted(self)
        finite = "allow-nan" if allow_nan and self.missing == "fiml" else True
        x = validate_data(self, X, dtype=np.float64, reset=False, ensure_all_finite=finite)
        return torch.from_numpy(x if x.flags.writeable else x.copy())

    def transform(self, X: Any, method: str | None = None) -> np.ndarray:
        """Factor scores (N x M) of X by ``method`` (default: ``scores``). With
        ``missing='fiml'``, X may hold NaN: regression scores are then E[f | observed values]
        (the other methods have no missing-value form and refuse NaN)."""
        x = self._checked(X, allow_nan=True)
        method = method or self.scores
        if torch.isnan(x).any():
            if method != "regression":
                raise ValueError(
                    f"Input X contains NaN: {method} scores need every value; regression "
                    "scores (method='regression') take each row's observed values"
                )
            model = self._model
            parameters = (model.loadings, model.noise_variance, model.mean)
            return observed_regression_scores(
                x, *(p.detach() for p in parameters), torch.from_numpy(self.rotation_matrix_)
            ).numpy()
        return factor_scores(
            x,
            torch.from_numpy(self.mean_),
            torch.from_numpy(self.components_.T),
            torch.from_numpy(self.noise_variance_),
            method,
            torch.from_numpy(self.phi_),
        ).numpy()

    def score_samples(self, X: Any) -> np.ndarray:
        """The exact log-likelihood of each row of X (nats); with ``missing='fiml'``, of each
        row's observed values (NaN: missing)."""
        return self._model.log_likelihood(self._checked(X, allow_nan=True)).numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """The mean log-likelihood per row of X (nats): higher is better, for model selection."""
        return float(self.score_samples(X).mean())

    def get_covariance(self) -> np.ndarray:
        """The model's covariance W W^T + Psi (D x D), in the data's units."""
        check_is_fitted(self)
        w = self._model.loadings.detach().numpy()
        return w @ w.T + np.diag(self.noise_variance_)

    def get_precision(self) -> np.ndarray:
        """The inverse of :meth:`get_covariance`."""
        return np.linalg.inv(self.get_covariance())

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self.missing in ("fiml", "complete_cases")
        return tags
