"""How :class:`~vaeflow.models.fa.FactorAnalysis` with ``missing: fiml`` is fitted: passes over
data whose NaN values are missing, the formulas of :mod:`vaeflow.models.fa_missing`.

- :class:`ObservedMomentsPass`: each feature's observed count, mean and variance, and for the
  PPCA start the covariance of each pair of features over the rows that observe both
  (pairwise deletion: not a fit, a start that EM refines).
- :class:`FIMLPass`: one EM iteration per pass: the E-step sums and the observed-data
  log-likelihood at the current parameters, then the M-step unless the fit has converged.

Unless the fit streams (``method: streaming``, or ``auto`` above ``moments_max_dim``), the
passes keep the batches they see (views of an in-memory data module's tensor: no copy) and EM
iterates on them at the end of the first pass, the sums still added across processes once per
iteration: no Lightning epoch per iteration (about 50 ms each on two busy cores, 8x the E-step
of 2000 rows x 12 features).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vaeflow.analysis.saturated import fit_saturated, independence_log_likelihood
from vaeflow.analysis.statistics import fiml_fit_statistics
from vaeflow.errors import DataError
from vaeflow.models.em_base import F64, Pass, common_shift
from vaeflow.models.fa_blas import SMALL_WORK, single_thread_if
from vaeflow.models.fa_fit import Fitter, FitterPass
from vaeflow.models.fa_math import Iterate, leading_eigenpairs
from vaeflow.models.fa_missing import MissingSums, add_sums_, m_step, zero_sums
from vaeflow.models.squarem import EMMap, Parameters, squarem_step

if TYPE_CHECKING:
    from vaeflow.models.fa import FactorAnalysis


class FIMLState(NamedTuple):
    """An E-step of FIML: the parameters (W, Psi, mu) and their E-step sums over every
    process."""

    parameters: Parameters
    sums: MissingSums

    @property
    def log_likelihood(self) -> Tensor:
        """The exact observed-data log-likelihood, mean per row that observes a value."""
        return self.sums.log_likelihood / self.sums.rows


class MissingFitter(Fitter):
    """Full-information maximum likelihood: a first pass for the observed moments and the
    start, then EM (:meth:`run`), on the batches kept in memory accelerated by SQUAREM unless
    ``accelerate`` is off. The statistics are D x (M + 1)^2 and the M-step solves D systems of
    size M + 1, so an iteration costs O(N D M^2)."""

    model: FactorAnalysis

    def first_pass(self) -> Pass:
        #: The batches of this process, kept for EM in memory (empty when streaming).
        self.kept: list[Tensor] = []
        return FIMLPass(self) if self.started else ObservedMomentsPass(self)

    def keep(self, x: Tensor) -> None:
        if not self.model.streaming:
            self.kept.append(x)

    def run(self, state: FIMLState | None) -> Pass | None:
        """EM from the current parameters, given their E-step (None: to be computed). Returns
        the pass that takes the next iteration when streaming, None once fitted.

        A fit of a few thousand rows is many small factorisations: on one thread, as threads
        only wait for each other (on two busy cores a second thread made the saturated model's
        EM 40x slower, 2.4 s against 0.05 s for 2000 rows x 12 features)."""
        model = self.model
        if state is None and not self.kept:
            return FIMLPass(self)
        rows, k = sum(len(x) for x in self.kept), model.latent_dim + 1
        em = self.em()
        with single_thread_if(model.dim * k**2 * (rows + k) < SMALL_WORK):
            if state is None:
                state = em.e_step(self.parameters())
            remaining = 0.0
            while self.goes_on(state, remaining):
                if not self.kept:  # streaming: the M-step; the next pass takes the E-step
                    self.set_parameters(em.m_step(state))
                    return FIMLPass(self)
                if model.hparams.accelerate:
                    parameters, state, remaining = squarem_step(em, state.parameters, state)
                else:
                    parameters = em.m_step(state)
                    state = em.e_step(parameters)
                self.set_parameters(parameters)
        with single_thread_if(rows * model.dim**2 * (model.dim + 1) < SMALL_WORK):
            self.fit_statistics(state)
        return None

    def em(self) -> EMMap[FIMLState]:
        """FIML's EM as :func:`~vaeflow.models.squarem.squarem_step` takes it: W and mu in units
        of each feature's observed standard deviation, log Psi."""
        units = torch.where(self.var > 0, self.var.sqrt(), 1.0)
        floor, isotropic = self.floor, self.model.isotropic

        def maximise(state: FIMLState) -> Parameters:
            w, psi, step = m_step(state.sums, floor, isotropic)
            return w, psi, state.parameters[2] + step

        return EMMap(
            e_step=lambda p: FIMLState(p, self.sums_of_kept(p)),
            m_step=maximise,
            log_likelihood=lambda state: state.log_likelihood,
            chart=lambda p: (p[0] / units[:, None], p[1].log(), p[2] / units),
            point=lambda t: (t[0] * units[:, None], torch.maximum(t[1].exp(), floor), t[2] * units),
        )

    def parameters(self) -> Parameters:
        """A copy of the model's current (W, Psi, mu)."""
        model = self.model
        return tuple(p.detach().clone() for p in (model.loadings, model.noise_variance, model.mean))

    def goes_on(self, state: FIMLState, remaining: float = 0.0) -> bool:
        """Record the iterate whose E-step ``state`` is; whether EM goes on (the stopping rule,
        given a SQUAREM cycle's ``remaining``, has not stopped it, nor ``max_iter``)."""
        model = self.model
        w, psi, _ = state.parameters
        ll = state.log_likelihood
        model.record(Iterate(int(model.n_iter), w, psi, ll, ll))  # the ELBO after an E-step
        trace = (state.sums.squares / psi).sum() / state.sums.rows
        converged = self.stopping.converged(ll.item(), (trace + ll.abs()).item(), remaining)
        return not converged and int(model.n_iter) < model.hparams.max_iter

    def set_parameters(self, parameters: Parameters) -> None:
        """Write the next iterate's (W, Psi, mu) into the model."""
        w, psi, mean = parameters
        self.set(w, psi)
        self.model.mean.copy_(mean)
        self.model.n_iter += 1

    def fit_statistics(self, state: FIMLState) -> None:
        """The fitted model's statistics against the saturated and independence models fitted
        by FIML to the kept batches (:mod:`vaeflow.analysis.saturated`), sums over every
        process; none when streaming (the data are not kept) or when the saturated covariance
        is singular (a feature constant or collinear)."""
        model = self.model
        model.fit_statistics = model.fitted_covariance = None
        if model.streaming:
            return
        loadings, noise, mean = state.parameters
        strategy = model.trainer.strategy

        def reduce(total: Tensor) -> Tensor:
            return strategy.reduce(total, reduce_op="sum")

        start = loadings @ loadings.T + torch.diag(noise)
        try:
            saturated = fit_saturated(self.kept, mean, start, reduce=reduce)
            model.fit_statistics = asdict(
                fiml_fit_statistics(
                    saturated,
                    independence_log_likelihood(self.kept, mean, reduce),
                    state.log_likelihood.item(),
                    loadings,
                    noise,
                )
            )
        except torch.linalg.LinAlgError:
            return
        model.fitted_covariance = (saturated.covariance, saturated.num_rows)

    def sums_of_kept(self, parameters: Parameters) -> MissingSums:
        """The E-step sums of the kept batches at ``parameters``, over every process."""
        sums = zero_sums(self.model.dim, self.model.latent_dim, parameters[0])
        for x in self.kept:
            add_sums_(sums, x, *parameters)
        reduce = self.model.trainer.strategy.reduce
        return MissingSums(*(reduce(total, reduce_op="sum") for total in sums))


def add_sums(sums: MissingSums, x: Tensor, parameters: Parameters) -> None:
    """:func:`add_sums_` of one batch of a pass; a batch is many M x M factorisations, so on
    one thread unless it is large (a second thread made a pass of 3000 x 10 values 30x slower
    on two busy cores)."""
    latent = parameters[0].shape[1]
    with single_thread_if(x.numel() * (latent + 1) ** 2 < SMALL_WORK):
        add_sums_(sums, x, *parameters)


def _observed(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """(x - shift with 0 where missing, the mask of observed values as float64)."""
    xs = x.to(F64) - shift
    observed = ~torch.isnan(xs)
    return torch.where(observed, xs, 0.0), observed.to(F64)


class ObservedMomentsPass(FitterPass):
    """Per feature: observed count, sum and sum of squares about a shift shared by every
    process; with the PPCA start, the pairwise sums over rows observing both features."""

    fitter: MissingFitter

    def start(self, x: Tensor) -> list[Tensor]:
        self.shift = common_shift(self.fitter.model, x)
        dim = x.shape[1]
        pairwise = [x.new_zeros(dim, dim, dtype=F64) for _ in range(3)] if self.pairwise else []
        return [x.new_zeros(dim, dtype=F64) for _ in range(3)] + pairwise

    @property
    def pairwise(self) -> bool:
        return self.fitter.model.hparams.init == "ppca"

    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        self.fitter.keep(x)
        with single_thread_if(x.numel() * x.shape[1] < SMALL_WORK):
            self.add_moments(x, *sums)

    def add_moments(self, x: Tensor, *sums: Tensor) -> None:
        """Add the batch's observed counts, sums and sums of squares (and pairwise sums)."""
        values, observed = _observed(x, self.shift)
        sums[0].add_(observed.sum(0))
        sums[1].add_(values.sum(0))
        sums[2].add_((values**2).sum(0))
        if self.pairwise:  # both observed: counts, sums of the row feature, of products
            sums[3].add_(observed.T @ observed)
            sums[4].add_(values.T @ observed)
            sums[5].add_(values.T @ values)

    def finish(self, n: Tensor, *sums: Tensor) -> Pass:
        fitter, model = self.fitter, self.fitter.model
        count, total, squares = sums[:3]
        if (count == 0).any():
            empty = (count == 0).nonzero()[:, 0].tolist()
            raise DataError(
                f"FactorAnalysis: feature(s) {', '.join(str(d) for d in empty[:10])} (counting "
                "from 0) have no observed value in the training data: drop them"
            )
        centre = total / count
        model.mean.copy_(self.shift + centre)
        fitter.set_variances((squares / count - centre**2).clamp_min(0))
        if not self.pairwise:
            fitter.start(None)
            return fitter.run(None)
        pairs, first, products = sums[3:]
        # sum over rows observing j and k of (x_j - m_j)(x_k - m_k), m the observed means
        cov = (products - centre[:, None] * first.T - first * centre[None, :]) / pairs.clamp_min(
            1
        ) + centre[:, None] * centre[None, :] * (pairs > 0)
        units = fitter.units
        scaled = cov / units[:, None] / units
        with single_thread_if(2 * model.dim**2 * model.latent_dim < SMALL_WORK):
            eigenpairs = leading_eigenpairs(scaled, 2 * model.latent_dim, model.hparams.seed)
        fitter.start(eigenpairs)
        return fitter.run(None)


class FIMLPass(FitterPass):
    """One EM iteration's E-step sums and observed-data log-likelihood at the current
    parameters (values taken about the current mean), then :meth:`MissingFitter.run`."""

    fitter: MissingFitter

    def __init__(self, fitter: MissingFitter) -> None:
        super().__init__(fitter)
        self.parameters = fitter.parameters()

    def start(self, x: Tensor) -> list[Tensor]:
        return list(zero_sums(*self.parameters[0].shape, x))

    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        self.fitter.keep(x)
        add_sums(MissingSums(*sums), x, self.parameters)

    def finish(self, n: Tensor, *sums: Tensor) -> Pass | None:
        return self.fitter.run(FIMLState(self.parameters, MissingSums(*sums)))
