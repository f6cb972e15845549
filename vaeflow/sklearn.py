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
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch import Tensor
from torch.utils.data import DataLoader

from vaeflow.analysis import FitStatistics, Moments, check_covariance, rotate, summarize
from vaeflow.analysis.scores import factor_scores
from vaeflow.models import FactorAnalysis as EMFactorAnalysis
from vaeflow.models.fa_blas import SMALL_WORK, single_thread_if
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
            log-likelihood (:class:`vaeflow.analysis.FitStatistics`), with N the number of rows
            (``n_obs`` for :meth:`fit_covariance`); None where the covariance is singular
            (a constant or collinear feature) or the fit streams (D above
            ``moments_max_dim``).
        log_likelihood_: the fit's mean log-likelihood per row (nats), of the observed values
            for ``fiml``; of data with the matrix as covariance for :meth:`fit_covariance`.
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
        rows = torch.from_numpy(x)
        # a data set of the size psychometrics fits is many small matrix operations, on one
        # thread: on two busy cores a second one made a FIML fit of 2000 x 12 values 2-10x
        # slower, each thread waiting for the other
        with single_thread_if(x.size * (dim + (self.n_components + 1) ** 2) < SMALL_WORK):
            # the rows as one batch, as they are: a DataLoader over the rows would index and
            # stack them one by one (0.18 s of a 0.25 s FIML fit of 2000 rows)
            self._fit_em(dim, DataLoader([rows], batch_size=None), self.missing == "fiml")
            self._set_solution(rows)
        return self

    def fit_covariance(
        self,
        cov: Any,
        n_obs: int,
        *,
        mean: Any = None,
        feature_names: Any = None,
    ) -> FactorAnalysis:
        """Fit the factor model to a covariance or correlation matrix of ``n_obs`` examples,
        as R's ``psych::fa(r, n.obs = )``: the same EM and the same attributes as :meth:`fit`
        of the data whose matrix it is, ``fit_statistics_`` with N = ``n_obs``. A correlation
        matrix gives the standardised solution (``components_`` and ``noise_variance_`` on the
        correlation scale). :meth:`transform` and :meth:`score_samples` then take data on the
        matrix's scale (standardised, for a correlation matrix), about ``mean``.

        Args:
            cov: the D x D matrix (an array, or a DataFrame whose columns name the features).
            n_obs: the number of examples it was computed from, above D.
            mean: the features' means (D), when known; 0 otherwise.
            feature_names: the features' names (D strings), which ``feature_names_in_`` keeps;
                a DataFrame's columns otherwise.

        Raises:
            ValueError: the matrix is not square, symmetric and positive definite, ``n_obs``
                is not above D, or ``mean`` or ``feature_names`` are not of length D.
        """
        if feature_names is None and hasattr(cov, "columns"):
            feature_names = cov.columns
        matrix = torch.tensor(check_array(cov, dtype=np.float64, ensure_min_features=2))
        matrix = check_covariance(matrix, n_obs, "cov")
        dim = len(matrix)
        centre = torch.zeros(dim, dtype=F64)
        if mean is not None:
            centre = torch.tensor(check_array(mean, dtype=np.float64, ensure_2d=False))
            if centre.shape != (dim,):
                raise ValueError(f"mean must hold D = {dim} values, got {tuple(centre.shape)}")
        names = None if feature_names is None else np.asarray(feature_names, dtype=object)
        if names is not None and (
            names.shape != (dim,) or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(f"feature_names must be D = {dim} strings, got {feature_names!r}")
        moments = Moments(torch.tensor(float(n_obs), dtype=F64), centre, matrix)
        self._fit_em(dim, DataLoader([moments], batch_size=None), fiml=False)
        self.n_features_in_ = dim
        if names is not None:
            self.feature_names_in_ = names
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self._set_solution(None)
        return self

    def _fit_em(self, dim: int, data: DataLoader, fiml: bool) -> None:
        """EM of a model of ``dim`` features on ``data`` (rows, or a matrix's moments)."""
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
            missing="fiml" if fiml else "refuse",
            seed=self.random_state,
        )
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

    def _set_solution(self, x: Tensor | None) -> None:
        """The attributes of the fitted model; ``x``: the rows it was fitted to (None: a
        matrix)."""
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
        statistics = model.fit_statistics
        self.fit_statistics_ = FitStatistics(**statistics) if statistics else None
        self.log_likelihood_ = (
            statistics["log_likelihood"] if x is None else model.log_likelihood(x).mean().item()
        )
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
