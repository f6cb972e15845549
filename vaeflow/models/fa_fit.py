"""The two ways :class:`~vaeflow.models.fa.FactorAnalysis` is fitted, each an explicit object.

Each is an :class:`~vaeflow.models.em_base.EMFit` whose passes
(:class:`~vaeflow.models.em_base.Pass`) hold factor analysis's statistics and updates:

- :class:`MomentsFitter`: one pass sums n, sum x and sum x x^T, then EM iterates on the D x D
  covariance without touching the data again.
- :class:`StreamingFitter`: a first pass for the mean and the feature variances (and a
  randomised sketch for the PPCA start), then one plain EM iteration per pass, with only
  D x M and M x M statistics.

A fitter's :meth:`Fitter.state_dict` goes into checkpoints, so that a resumed fit continues
from the checkpoint's iteration and parameters instead of starting over.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from vaeflow.analysis.moments import Moments
from vaeflow.analysis.statistics import fit_statistics
from vaeflow.errors import DataError
from vaeflow.models.em_base import F64, EMFit, Pass, common_shift
from vaeflow.models.fa_blas import (
    CHUNK_ROWS,
    SMALL_WORK,
    add_moments_,
    single_thread_if,
    symmetric_from_lower,
)
from vaeflow.models.fa_math import (
    EStep,
    Iterate,
    elbo_from_moments,
    em_on_covariance,
    factorise,
    leading_eigenpairs,
    log_likelihood_from_moments,
    m_step,
    moments_from,
    ppca_solution,
    roundoff_scale,
)

if TYPE_CHECKING:
    from vaeflow.models.fa import FactorAnalysis


class FitterPass(Pass):
    """A pass of a :class:`Fitter`."""

    def __init__(self, fitter: Fitter) -> None:
        super().__init__()
        self.fitter = fitter


class FirstPass(FitterPass):
    """Sums about :func:`~vaeflow.models.em_base.common_shift`."""

    shift: Tensor

    def start(self, x: Tensor) -> list[Tensor]:
        self.shift = common_shift(self.fitter.model, x)
        return self.zeros(self.shift)

    @abstractmethod
    def zeros(self, shift: Tensor) -> list[Tensor]:
        """The zero sums beside the count."""

    def mean_and_variances(self, n: Tensor, total: Tensor, squares: Tensor) -> None:
        """Set the mean (its exact maximum-likelihood value) and the feature variances from
        the sums of (x - shift) and of its squares."""
        centre = total / n
        self.fitter.model.mean.copy_(self.shift + centre)
        self.fitter.set_variances((squares / n - centre**2).clamp_min(0))


class Fitter(EMFit):
    """How a :class:`FactorAnalysis` is fitted: one object per fit, chosen once from ``method``.

    Args:
        model: the model whose parameters the fit writes.
        state: :meth:`state_dict` of a checkpoint to resume from, or None for a fresh fit.
    """

    model: FactorAnalysis

    def __init__(self, model: FactorAnalysis, state: dict[str, Any] | None = None) -> None:
        self.var: Tensor | None = None  # diag S, the feature variances
        self.floor: Tensor | None = None  # per-feature lower bound of the noise variances
        self.started = False  # whether the parameters hold an EM iterate
        super().__init__(model, state)

    def set_variances(self, var: Tensor) -> None:
        """Keep the feature variances and the noise floor they imply (see FactorAnalysis)."""
        if not (var > 0).any():
            raise DataError(
                "FactorAnalysis: every feature of the training data is constant (or there is "
                "a single example): there is no covariance to model; fit at least two distinct "
                "examples"
            )
        hparams = self.model.hparams
        if self.model.isotropic:
            floor = (hparams.noise_floor * var.mean()).expand_as(var)
        else:
            floor = torch.where(
                var > 0, hparams.noise_floor * var, hparams.constant_feature_variance
            )
        self.var, self.floor = var, floor

    @property
    def units(self) -> Tensor:
        """Per-feature scale of the PPCA start: for factor analysis the features' standard
        deviations (1 for constant ones), so the start is PPCA of the correlation matrix and
        the fit is equivariant to rescaling a feature, as the model is. PPCA of S itself
        started raw breast-cancer features (variances 4e-6 to 3e5) near saddle points, where
        EM crawls for hundreds of iterations (0.55 nats per example below the maximum) before
        it escapes. Probabilistic PCA is not scale-equivariant and keeps S (ones)."""
        if self.model.isotropic:
            return torch.ones_like(self.var)
        return torch.where(self.var > 0, self.var.sqrt(), 1.0)

    def start(self, eigenpairs: tuple[Tensor, Tensor] | None) -> None:
        """Set the starting parameters: closed-form PPCA from the leading eigenpairs of S scaled
        to :attr:`units` (factor analysis takes its residual variances diag(S - W W^T) rather
        than one sigma^2), or random loadings drawn with ``seed`` when ``eigenpairs`` is None."""
        model, var = self.model, self.var
        if eigenpairs is None:
            generator = torch.Generator().manual_seed(model.hparams.seed)
            scale = math.sqrt(var.mean().item() / model.latent_dim)
            loadings = torch.randn(model.dim, model.latent_dim, generator=generator, dtype=F64)
            # in the model's family: one variance for probabilistic PCA (with the features'
            # own, EM's first step lowered the likelihood)
            noise = var.mean().expand_as(var) if model.isotropic else var
            self.set(loadings.to(var.device) * scale, noise)
        else:
            units = self.units
            trace = (var / units**2).sum()
            loadings, sigma2 = ppca_solution(*eigenpairs, model.latent_dim, trace, model.dim)
            loadings = loadings * units[:, None]
            self.set(loadings, sigma2 if model.isotropic else var - (loadings**2).sum(1))
        self.started = True

    def set(self, loadings: Tensor, noise_variance: Tensor) -> None:
        self.model.loadings.copy_(loadings)
        self.model.noise_variance.copy_(torch.maximum(noise_variance, self.floor))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "started": self.started, "var": self.var}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.started = state["started"]
        if state["var"] is not None:
            self.set_variances(state["var"].to(self.model.mean))


class MomentsFitter(Fitter):
    """One pass for n, sum x and sum x x^T (float64, a few thousand rows per syrk), then EM on
    the covariance S, accelerated by SQUAREM unless ``accelerate`` is off. A resumed fit
    accumulates S again and continues EM from the checkpoint's parameters and iteration."""

    def first_pass(self) -> Pass:
        return CovariancePass(self)

    def fit(self, cov: Tensor, num_obs: int) -> None:
        """Start (unless resumed), then EM on the covariance S of ``num_obs`` examples; the
        fit statistics of S when no feature is constant (log det S is finite)."""
        model = self.model
        with single_thread_if(2 * model.dim**2 * model.latent_dim < SMALL_WORK):
            if not self.started:
                pairs = None
                if model.hparams.init == "ppca":
                    units = self.units
                    scaled = cov / units[:, None] / units
                    pairs = leading_eigenpairs(scaled, 2 * model.latent_dim, model.hparams.seed)
                self.start(pairs)
                first = 1
            else:
                first = int(model.n_iter) + 1
            w, psi = em_on_covariance(
                cov,
                model.loadings.detach().clone(),
                model.noise_variance.detach().clone(),
                floor=self.floor,
                isotropic=model.isotropic,
                stopping=self.stopping,
                iterations=range(first, model.hparams.max_iter + 1),
                accelerate=model.hparams.accelerate,
                record=model.record,
            )
        self.set(w, psi)
        w, psi = model.loadings.detach(), model.noise_variance.detach()
        model.fitted_covariance = (cov, num_obs)
        try:
            model.fit_statistics = asdict(fit_statistics(cov, w, psi, num_obs))
        except torch.linalg.LinAlgError:  # S singular (constant or collinear features)
            model.fit_statistics = None


class CovariancePass(FirstPass):
    """n, sum x and sum x x^T of the rows (lower triangle), or of a matrix's
    :class:`~vaeflow.analysis.Moments`; then :meth:`MomentsFitter.fit`."""

    fitter: MomentsFitter

    @override
    def add(self, x: Tensor | Moments) -> None:
        """Add a batch of rows, or :class:`~vaeflow.analysis.Moments` (n examples of mean m
        and covariance S add n (m - shift) and n (S + (m - shift)(m - shift)^T), the shift
        their mean broadcast from rank 0)."""
        if not isinstance(x, Moments):
            super().add(x)
            return
        if not self.sums:
            shift = x.mean.to(F64)
            self.shift = self.fitter.model.trainer.strategy.broadcast(shift, src=0)
            dim = len(shift)
            self.sums = [shift.new_zeros(()), shift.new_zeros(dim), shift.new_zeros(dim, dim)]
        count, total, gram = self.sums
        centre = x.mean.to(F64) - self.shift
        count += x.count
        total += x.count * centre
        gram += x.count * (x.covariance.to(F64) + torch.outer(centre, centre))

    def zeros(self, shift: Tensor) -> list[Tensor]:
        dim = len(shift)
        self.buffer = shift.new_empty(CHUNK_ROWS, dim)  # float64 rows for add_moments_
        return [torch.zeros_like(shift), shift.new_zeros(dim, dim)]

    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        add_moments_(*sums, x, self.shift, self.buffer)

    def finish(self, n: Tensor, *sums: Tensor) -> None:
        total, gram = sums
        self.mean_and_variances(n, total, gram.diagonal())
        centre = total / n
        self.fitter.fit(symmetric_from_lower(gram) / n - torch.outer(centre, centre), int(n))
        return None


class StreamingFitter(Fitter):
    """A first pass for the mean and variances, then one plain EM iteration per pass: the
    statistics are D x M and M x M, for D too large for a D x D covariance."""

    def first_pass(self) -> Pass:
        return EMPass(self) if self.started else VariancePass(self)

    def probe(self, like: Tensor) -> Tensor:
        """Random D x K test matrix of the PPCA sketch (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.model.hparams.seed)
        k = min(self.model.dim, 2 * self.model.latent_dim + 10)
        return torch.randn(self.model.dim, k, generator=generator, dtype=F64).to(like.device)


class VariancePass(FirstPass):
    """n, sum x and sum x^2; then the PPCA start's two passes, or the random start."""

    fitter: StreamingFitter

    def zeros(self, shift: Tensor) -> list[Tensor]:
        return [torch.zeros_like(shift), torch.zeros_like(shift)]

    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        xs = x.to(F64, copy=True).sub_(self.shift)
        sums[0].add_(xs.sum(0))
        sums[1].add_((xs**2).sum(0))

    def finish(self, n: Tensor, *sums: Tensor) -> Pass:
        self.mean_and_variances(n, *sums)
        if self.fitter.model.hparams.init == "ppca":
            return RangePass(self.fitter, self.fitter.probe(n) / self.fitter.units[:, None])
        self.fitter.start(None)
        return EMPass(self.fitter)


class CentredPass(FitterPass):
    """Sums of (x - mu)^T (x - mu) P for a D x K matrix P, about the fitted mean."""

    def __init__(self, fitter: Fitter, probe: Tensor) -> None:
        super().__init__(fitter)
        self.probe = probe

    def start(self, x: Tensor) -> list[Tensor]:
        return [self.probe.new_zeros(self.probe.shape)]

    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        xc = x.to(F64, copy=True).sub_(self.fitter.model.mean)
        sums[0].add_(xc.T @ (xc @ self.probe))


class RangePass(CentredPass):
    """The randomised range of the scaled covariance S~ = U^-1 S U^-1 (U the start's
    :attr:`~Fitter.units`): an orthonormal basis Q of S~ Omega, from S (U^-1 Omega)."""

    def finish(self, n: Tensor, *sums: Tensor) -> Pass:
        units = self.fitter.units[:, None]
        basis = torch.linalg.qr(sums[0] / n / units).Q
        return SketchPass(self.fitter, basis / units)


class SketchPass(CentredPass):
    """Rayleigh-Ritz on the sketched range Q: the eigenpairs of Q^T S~ Q, from S (U^-1 Q),
    give the PPCA start."""

    def finish(self, n: Tensor, *sums: Tensor) -> Pass:
        units = self.fitter.units[:, None]
        eigenvalues, vectors = torch.linalg.eigh(self.probe.T @ sums[0] / n)
        basis = self.probe * units
        self.fitter.start((eigenvalues.flip(0), basis @ vectors.flip(1)))
        return EMPass(self.fitter)


class EMPass(CentredPass):
    """One EM iteration: the E-step statistics at the current parameters, the exact
    log-likelihood there, then the M-step unless the fit has converged."""

    fitter: StreamingFitter

    def __init__(self, fitter: StreamingFitter) -> None:
        model = fitter.model
        self.factors = factorise(model.loadings.detach(), model.noise_variance.detach())
        super().__init__(fitter, self.factors.probe)

    def finish(self, n: Tensor, *sums: Tensor) -> Pass | None:
        fitter, model = self.fitter, self.fitter.model
        moments = moments_from(sums[0] / n, self.probe, fitter.var)
        w, psi = model.loadings.detach(), model.noise_variance.detach()
        ll = log_likelihood_from_moments(self.factors, moments)
        model.record(
            Iterate(int(model.n_iter), w, psi, ll, elbo_from_moments(w, psi, self.factors, moments))
        )
        converged = fitter.stopping.converged(
            ll.item(), roundoff_scale(EStep(self.factors, moments, ll))
        )
        if converged or int(model.n_iter) >= model.hparams.max_iter:
            return None
        fitter.set(*m_step(self.factors, moments, fitter.floor, model.isotropic))
        model.n_iter += 1
        return EMPass(fitter)
