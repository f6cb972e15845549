"""Factor analysis and probabilistic PCA fitted by exact EM, as Lightning manual optimisation.

The model: z ~ N(0, I_M), x | z ~ N(W z + mu, Psi), so x ~ N(mu, C) with C = W W^T + Psi;
``noise="isotropic"`` ties Psi = sigma^2 I (PPCA). Every EM statistic is a sum over examples,
accumulated batch by batch in float64, summed across processes, and the closed-form M-step is
taken once per pass. The two ways to fit (``moments``, ``streaming``) are objects of
:mod:`vaeflow.models.fa_fit`; the formulas are in :mod:`vaeflow.models.fa_math`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from vaeflow.analysis.moments import Moments
from vaeflow.analysis.rotation import ROTATIONS, Rotation, rotate
from vaeflow.analysis.scores import factor_score_weights
from vaeflow.callbacks.factor_report import SCORES_FILE, FactorReport, write_scores
from vaeflow.errors import ConfigError, DataError
from vaeflow.models.em_base import F64, EMFit, EMModel, check_latent_dim
from vaeflow.models.fa_fit import MomentsFitter, StreamingFitter
from vaeflow.models.fa_math import (
    Iterate,
    factorise,
    log_likelihood,
    posterior_covariance,
    posterior_mean,
)
from vaeflow.models.fa_missing import observed_log_likelihood, observed_regression_scores
from vaeflow.models.fa_missing_fit import MissingFitter
from vaeflow.models.inputs import as_examples

#: Smallest ``noise_floor``: the rounding of the covariance S (relative ~1e-16 times the growth
#: of its sums) is divided by the floor in the log-likelihood. Measured on 500 examples with a
#: feature on the floor: 1e-7 nats per example off the dense float64 value at 1e-8, 1e-6 at
#: 1e-9, 1e-5 at 1e-10 (tests/test_fa.py).
MIN_NOISE_FLOOR = 1e-9

#: Key of the training data's fit statistics in a checkpoint.
STATISTICS_KEY = "factor_analysis_statistics"


#: The training fit's statistics that ``vaeflow test`` reports beside the test likelihood.
FIT_STATISTICS = ("chi_square", "dof", "p_value", "rmsea", "tli", "bic", "srmr")


class FactorAnalysis(EMModel):
    """Factor analysis (diagonal noise) or probabilistic PCA (isotropic noise), fitted by EM.

    Each training pass over the data is exact EM: the E-step statistics are summed in float64
    outside autocast, reduced across processes through the Lightning strategy, and the M-step
    runs once at the end of the pass. Training stops by itself once the log-likelihood is
    estimated to be within ``tol`` nats per example of its limit (or after ``max_iter`` EM
    iterations): leave the Trainer's ``max_epochs`` at -1. The per-iteration log-likelihood,
    ELBO (nats per example) and bits per dimension go to the loggers as ``train/log_likelihood``,
    ``train/elbo`` and ``train/bits_per_dim``, one row per EM iteration, with the iteration as
    the step; ``val/...`` rows take the step of the iteration they score.

    The mean is the sample mean (its exact maximum-likelihood value). Parameters are float64
    ``nn.Parameter`` objects, in the data's own units, so checkpoints carry them and DDP can
    wrap the module; EM writes them in place, no gradient is ever taken. ``vaeflow predict``
    writes the posterior means to ``latents.pt`` in the run folder. A fit resumed from a
    checkpoint (``--ckpt_path``) continues from its EM iteration and parameters.

    Args:
        input_shape: shape of one example; the CLI links it from the data module's ``dims``,
            and without it the model takes ``dims`` from the Trainer's data module at setup.
        latent_dim: number of factors M; must be smaller than the data dimension D.
        noise: ``diagonal`` (factor analysis) or ``isotropic`` (probabilistic PCA).
        method: ``moments`` iterates EM on the D x D covariance after one pass over the data;
            ``streaming`` takes one EM iteration per pass and never forms a D x D matrix;
            ``auto`` picks ``moments`` when D <= ``moments_max_dim``.
        moments_max_dim: largest D for which ``auto`` picks ``moments``.
        init: ``ppca`` starts from the closed-form PPCA solution, from the leading eigenpairs
            of the covariance (randomised subspace iteration on S, or a randomised sketch and
            one more pass when streaming); ``random`` from random loadings drawn with ``seed``.
        max_iter: most EM iterations.
        tol: stop when the log-likelihood is estimated to be within this many nats per example
            of its limit: the Aitken estimate from the gains of two successive EM steps
            (:mod:`vaeflow.models.stopping`), which tells a slow approach to a maximum from
            one. A fit also stops when both gains are at the round-off of the log-likelihood,
            so a ``tol`` below round-off ends where float64 can resolve no more progress.
        noise_floor: lower bound of each noise variance relative to its feature's variance
            (Psi_d >= noise_floor * S_dd), so the fit is equivariant to rescaling a feature.
            It keeps a feature that others predict exactly (collinear columns) from driving
            its variance to zero and the likelihood to infinity; the M-step with the floor is
            still the exact constrained maximiser. At least 1e-9: below it float64 stops
            resolving the likelihood. For ``isotropic`` noise the floor is relative to the
            mean feature variance.
        constant_feature_variance: noise variance of features that are constant in the
            training data (MNIST's border pixels), which have no scale of their own; each adds
            -1/2 log(2 pi constant_feature_variance) to the log-likelihood (scikit-learn's
            floor is the same 1e-12).
        accelerate: SQUAREM cycles instead of single EM steps in the ``moments`` method and
            in a ``missing: fiml`` fit in memory (safeguarded: the log-likelihood still never
            decreases); an iteration is then one cycle.
        rotation: the rotation that the reports use (``loadings.csv``, ``summary.txt``, the
            loadings pictures; :meth:`rotated`): a name of :data:`vaeflow.analysis.ROTATIONS`
            (orthogonal ``varimax``, ``quartimax``, ``equamax``; oblique ``promax``,
            ``oblimin``, ``quartimin``, ``geomin``) or ``none``. The likelihood does not change
            under rotation, and ``loadings`` keep the unrotated maximum-likelihood solution.
        missing: what NaN in the data means. ``refuse``: an error, which names the other two;
            ``fiml``: a missing value, and the fit is full-information maximum likelihood, EM
            on each row's observed values (:mod:`vaeflow.models.fa_missing`; in memory on the
            first pass's batches, or with ``streaming`` one EM iteration per pass; the mean is
            fitted too, and ``log_likelihood`` is the observed-data one); ``complete_cases``:
            rows with a NaN are left out of the fit.
        scores: the factor scores of :meth:`factor_scores`, which ``vaeflow predict`` writes
            to ``scores.csv`` (:mod:`vaeflow.analysis.scores`): ``regression`` (Thurstone, the
            posterior means of the rotated factors), ``bartlett`` or ``ten_berge``.
        seed: seed of the random initialisation and of the streaming PPCA sketch.
        data_log_scale: log of the factor the data module divided the data by (linked by the
            CLI from the data module's ``log_scale``), for bits per dimension on the data's
            original grid.
    """

    checkpoint_key: ClassVar[str] = "factor_analysis_fit"
    #: A data module without an explicit ``val_fraction`` gives factor analysis every row: the
    #: maximum-likelihood fit is of all the data, and a validation split is a check to ask for.
    default_val_fraction: ClassVar[float] = 0.0
    #: What the data modules' message about NaN in the data adds.
    missing_values_advice: ClassVar[str] = (
        ", or set the model's missing: fiml (full-information maximum likelihood: every "
        "observed value counts) or missing: complete_cases (rows with a NaN are left out)"
    )

    def __init__(
        self,
        input_shape: tuple[int, ...] | None = None,
        latent_dim: int = 10,
        noise: Literal["diagonal", "isotropic"] = "diagonal",
        method: Literal["auto", "moments", "streaming"] = "auto",
        moments_max_dim: int = 4096,
        init: Literal["ppca", "random"] = "ppca",
        max_iter: int = 1000,
        tol: float = 1e-6,
        noise_floor: float = 1e-8,
        constant_feature_variance: float = 1e-12,
        accelerate: bool = True,
        rotation: str = "none",
        missing: Literal["refuse", "fiml", "complete_cases"] = "refuse",
        scores: Literal["regression", "bartlett", "ten_berge"] = "regression",
        seed: int = 0,
        data_log_scale: float = 0.0,
    ) -> None:
        if moments_max_dim < 1:
            raise ConfigError(
                f"FactorAnalysis: moments_max_dim must be positive, got {moments_max_dim}"
            )
        if not MIN_NOISE_FLOOR <= noise_floor < 1:
            raise ConfigError(
                f"FactorAnalysis: noise_floor must be in [{MIN_NOISE_FLOOR:g}, 1), got "
                f"{noise_floor:g}: it is relative to each feature's variance, and below "
                f"{MIN_NOISE_FLOOR:g} float64 cannot resolve the log-likelihood of the noise "
                "variances that sit on it"
            )
        if rotation != "none":
            ROTATIONS.get(rotation)  # an unknown name is a ConfigError listing the known ones
        if not constant_feature_variance > 0:
            raise ConfigError(
                "FactorAnalysis: constant_feature_variance must be positive, got "
                f"{constant_feature_variance:g}"
            )
        self.latent_dim = latent_dim
        self.isotropic = noise == "isotropic"
        #: Rows left out of the last fit for a missing value (``missing: complete_cases``).
        self.incomplete_rows = 0
        #: Goodness of fit of the training data (:class:`vaeflow.analysis.FitStatistics` as a
        #: dict: chi-square, RMSEA, TLI, BIC, SRMR, ...) when fitted by ``moments`` on data
        #: without constant features; None otherwise.
        self.fit_statistics: dict[str, float] | None = None
        #: The covariance of the training data that the fit statistics compare the model with
        #: (``missing: fiml``: the saturated model's estimate) and the number of examples, from
        #: the last fit; None when it formed none (``streaming``). The report's parallel
        #: analysis reads it.
        self.fitted_covariance: tuple[Tensor, int] | None = None
        super().__init__(input_shape)

    @override
    def build(self) -> None:
        """Check the sizes, choose the method and create the parameters."""
        dim = self.dim
        check_latent_dim("FactorAnalysis", self.latent_dim, dim)
        hp = self.hparams
        self.streaming = hp.method == "streaming" or (
            hp.method == "auto" and dim > hp.moments_max_dim
        )
        self.loadings = nn.Parameter(torch.zeros(dim, self.latent_dim, dtype=F64))
        self.noise_variance = nn.Parameter(torch.ones(dim, dtype=F64))
        self.mean = nn.Parameter(torch.zeros(dim, dtype=F64))

    # -- inference under the current parameters ---------------------------------------------

    def _centred(self, x: Tensor | np.ndarray) -> Tensor:
        """x (N x ...) minus the mean, as a float64 tensor on the model's device: users hold
        tensors of any float type and NumPy arrays."""
        x = as_examples(x, self.input_shape, "FactorAnalysis")
        return x.reshape(len(x), -1).to(self.mean) - self.mean

    @property
    def missing_values(self) -> str | None:
        """None when NaN in the data is an error; else what NaN means, for messages."""
        return None if self.hparams.missing == "refuse" else f"missing: {self.hparams.missing}"

    @torch.no_grad()
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log p(x) of each example (N,), in O(N D M), accurate to float64 round-off
        even when noise variances are tiny (see :mod:`vaeflow.models.fa_math`). A row with
        NaN gets the log-likelihood of its observed values, the others integrated out."""
        centred = self._centred(x)
        factors = factorise(self.loadings, self.noise_variance)
        incomplete = torch.isnan(centred).any(1)
        if not incomplete.any():
            return log_likelihood(centred, factors)
        out = log_likelihood(centred.nan_to_num(), factors)
        out[incomplete] = observed_log_likelihood(
            centred[incomplete], self.loadings, self.noise_variance, torch.zeros_like(self.mean)
        )
        return out

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior p(z|x): means (N x M), G W^T Psi^-1 (x - mu), and the covariance G (M x M),
        the same for every example."""
        factors = factorise(self.loadings, self.noise_variance)
        return posterior_mean(self._centred(x), factors), posterior_covariance(factors)

    @torch.no_grad()
    def rotated(self) -> Rotation:
        """The loadings rotated by ``rotation`` (the pattern in the data's units, the factor
        correlations Phi and the rotation T: pattern = W T^(-T), Phi = T^T T), factors ordered
        by variance explained and signed to positive sums (:func:`vaeflow.analysis.rotate`)."""
        if self.hparams.rotation == "none":
            eye = torch.eye(self.latent_dim, dtype=self.loadings.dtype, device=self.mean.device)
            return Rotation(self.loadings.detach(), eye, eye)
        return rotate(self.loadings.detach(), self.hparams.rotation)

    @torch.no_grad()
    def factor_scores(
        self, x: Tensor, method: str | None = None, rotation: Rotation | None = None
    ) -> Tensor:
        """Factor scores (N x M) of the rotated factors by ``method`` (default: ``scores``).
        Rows with NaN get regression scores of their observed values (the other methods need
        every value).

        Args:
            x: examples (N x ...), a tensor or an array.
            method: ``regression``, ``bartlett`` or ``ten_berge``.
            rotation: :meth:`rotated`, when the caller has it (it iterates).
        """
        method = method or self.hparams.scores
        rotation = rotation or self.rotated()
        centred = self._centred(x)
        if torch.isnan(centred).any():
            if method != "regression":
                raise DataError(
                    f"FactorAnalysis: {method} factor scores need every value, and the data "
                    "hold NaN; regression scores (scores: regression) take each row's "
                    "observed values"
                )
            zero = torch.zeros_like(self.mean)
            return observed_regression_scores(
                centred, self.loadings, self.noise_variance, zero, rotation.rotation
            )
        weights = factor_score_weights(rotation.loadings, self.noise_variance, method, rotation.phi)
        return centred @ weights

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n draws from the model, shaped (n, *input_shape)."""
        z = torch.randn(n, self.latent_dim, dtype=self.mean.dtype, device=self.mean.device)
        eps = torch.randn(n, self.dim, dtype=self.mean.dtype, device=self.mean.device)
        x = self.mean + z @ self.loadings.T + eps * self.noise_variance.sqrt()
        return x.reshape(n, *self.input_shape)

    # -- Lightning -------------------------------------------------------------------------

    @override
    def make_fit(self, state: dict[str, Any] | None) -> EMFit:
        self.incomplete_rows = 0
        if self.hparams.missing == "fiml":
            return MissingFitter(self, state)
        return (StreamingFitter if self.streaming else MomentsFitter)(self, state)

    @override
    def examples(self, batch: Tensor | Moments) -> Tensor | Moments:
        """The batch's rows, without those with NaN under ``missing: complete_cases``; or a
        covariance matrix's :class:`~vaeflow.analysis.Moments`
        (:class:`~vaeflow.data.CovarianceDataModule`), which the ``moments`` method fits."""
        if isinstance(batch, Moments):
            if self.streaming or self.hparams.missing == "fiml":
                raise ConfigError(
                    "FactorAnalysis: a covariance matrix is fitted by method: moments (auto "
                    f"picks it up to moments_max_dim = {self.hparams.moments_max_dim} features) "
                    "and has no missing values: leave method at auto or moments and missing at "
                    "refuse"
                )
            if batch.covariance.shape != (self.dim, self.dim):
                raise DataError(
                    f"FactorAnalysis: the covariance matrix is {tuple(batch.covariance.shape)}, "
                    f"but the model has D = {self.dim} features"
                )
            return batch
        x = self.flat(batch)
        if self.hparams.missing == "complete_cases":
            complete = ~torch.isnan(x).any(1)
            self.incomplete_rows += len(x) - int(complete.sum())
            x = x[complete]
        return x

    @override
    def on_fit_end(self) -> None:
        """Say how many rows ``complete_cases`` left out, over every process."""
        super().on_fit_end()
        if self.hparams.missing == "complete_cases":
            left_out = torch.tensor(float(self.incomplete_rows), device=self.mean.device)
            self.incomplete_rows = int(self.trainer.strategy.reduce(left_out, reduce_op="sum"))
            rank_zero_info(
                f"FactorAnalysis: {self.incomplete_rows} rows with a missing value were left "
                "out of the fit (missing: complete_cases)"
            )

    @override
    def configure_callbacks(self) -> list[Callback]:
        """``vaeflow predict`` writes the latent codes (posterior means) to ``latents.pt``; a
        fit writes ``loadings.csv`` and ``summary.txt`` (:class:`FactorReport`)."""
        return [*super().configure_callbacks(), FactorReport()]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATISTICS_KEY] = self.fit_statistics

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.fit_statistics = checkpoint.get(STATISTICS_KEY)

    @override
    def fit_report(self) -> dict[str, float]:
        """The training fit's statistics (``fit/chi_square``, ...), where there are some."""
        if not self.fit_statistics:
            return {}
        return {f"fit/{name}": self.fit_statistics[name] for name in FIT_STATISTICS}

    def record(self, iterate: Iterate) -> None:
        """One row per EM iteration: log-likelihood, ELBO and bits/dim at the iterate."""
        ll = iterate.log_likelihood.item()
        row = {
            "train/log_likelihood": ll,
            "train/elbo": iterate.elbo.item(),
            "train/bits_per_dim": self.bits_per_dim(ll),
        }
        self.record_row(iterate.iteration, row)

    @override
    def on_predict_start(self) -> None:
        self._rotation = self.rotated()

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """The posterior means (``latents``) and the factor scores (``scores``)."""
        return {
            "latents": self.posterior(batch)[0],
            "scores": self.factor_scores(batch, rotation=self._rotation),
        }

    def write_prediction_tables(self, trainer: Trainer, folder: Path, columns: dict) -> None:
        """``scores.csv`` in the run folder (:func:`write_scores`)."""
        write_scores(trainer, folder / SCORES_FILE, columns["scores"])

    def prediction_extras(self) -> dict[str, Tensor]:
        """What ``latents.pt`` holds beside the posterior means: the posterior covariance G
        (M x M), the same for every example."""
        factors = factorise(self.loadings.detach(), self.noise_variance.detach())
        return {"covariance": posterior_covariance(factors).cpu()}
