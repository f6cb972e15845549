"""Factor analysis and probabilistic PCA fitted by exact EM, as Lightning manual optimisation.

The model: z ~ N(0, I_M), x | z ~ N(W z + mu, Psi), so x ~ N(mu, C) with C = W W^T + Psi;
``noise="isotropic"`` ties Psi = sigma^2 I (PPCA). Every EM statistic is a sum over examples,
accumulated batch by batch in float64, summed across processes, and the closed-form M-step is
taken once per pass. Two ways to fit:

- ``moments`` (D up to a few thousand): one pass accumulates n, sum x and sum x x^T (float64,
  a few thousand rows per syrk), then EM iterates on the covariance S without touching the data
  again. EM on S is accelerated by SQUAREM (Varadhan & Roland, 2008): an extrapolated step is
  kept only if its exact log-likelihood is at least that of a plain EM step, else two plain EM
  steps are taken, so the log-likelihood never decreases.
- ``streaming`` (large D, where D x D does not fit): one plain EM iteration per epoch; the
  statistics are D x M and M x M.

The linear algebra (never a D x D inverse) is in :mod:`vaeflow.models.fa_math`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from vaeflow.callbacks import prediction_callbacks
from vaeflow.errors import ConfigError, DataError
from vaeflow.models.fa_math import (
    CHUNK_ROWS,
    LOG_2PI,
    SMALL_WORK,
    Moments,
    add_moments_,
    cholesky_of_precision,
    elbo_from_moments,
    em_on_covariance,
    leading_eigenpairs,
    log_likelihood_from_moments,
    m_step,
    ppca_solution,
    single_thread_if,
    symmetric_from_lower,
    varimax,
)


class EMStepCounter(Optimizer):
    """The optimiser of an EM model: its step changes nothing (the M-step has already updated
    the parameters) but Lightning counts it, so ``global_step`` counts EM passes and
    checkpointing, which skips a step it has already saved, works."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, {})

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        return None


class FactorAnalysis(LightningModule):
    """Factor analysis (diagonal noise) or probabilistic PCA (isotropic noise), fitted by EM.

    Each training pass over the data is exact EM: the E-step statistics are summed in float64
    outside autocast, reduced across processes through the Lightning strategy, and the M-step
    runs once at the end of the pass. Training stops by itself once the log-likelihood gains
    less than ``tol`` nats per example (or after ``max_iter`` EM iterations): leave the Trainer's
    ``max_epochs`` at -1. The per-iteration log-likelihood and ELBO (nats per example) go to the
    loggers as ``train/log_likelihood`` and ``train/elbo``, one row per EM iteration, with the
    iteration as the step; ``val/log_likelihood`` takes the step of the iteration it scores.

    The mean is the sample mean (its exact maximum-likelihood value). Parameters are float64
    ``nn.Parameter`` objects, so checkpoints carry them and DDP can wrap the module; EM writes
    them in place, no gradient is ever taken. ``vaeflow predict`` writes the posterior means to
    ``latents.pt`` in the run folder (:class:`LatentCodeWriter`).

    EM's sums do not depend on the order of the examples: give the data module ``shuffle:
    false``, so that its batches are views of the stored tensor rather than gathered copies.

    Args:
        input_shape: shape of one example; the CLI links it from the data module's ``dims``.
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
        tol: stop when an iteration raises the log-likelihood by less than this many nats per
            example. The default 1e-6 stops MNIST (D = 784, M = 32) within 1e-7 nats of the
            fully converged log-likelihood.
        noise_floor: lower bound of every noise variance, relative to the mean feature variance
            (the floor is ``noise_floor * mean(diag S)``). It keeps constant features, such as
            MNIST's border pixels, from driving a variance to zero and the likelihood to
            infinity; the M-step with the floor is still the exact constrained maximiser.
        accelerate: SQUAREM cycles instead of single EM steps in the ``moments`` method
            (safeguarded: the log-likelihood still never decreases); an iteration is then one
            cycle.
        rotation: ``varimax`` rotates the fitted loadings (the likelihood is unchanged).
        seed: seed of the random initialisation and of the streaming PPCA sketch.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 10,
        noise: Literal["diagonal", "isotropic"] = "diagonal",
        method: Literal["auto", "moments", "streaming"] = "auto",
        moments_max_dim: int = 4096,
        init: Literal["ppca", "random"] = "ppca",
        max_iter: int = 1000,
        tol: float = 1e-6,
        noise_floor: float = 1e-6,
        accelerate: bool = True,
        rotation: Literal["none", "varimax"] = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.input_shape = tuple(input_shape)
        dim = math.prod(self.input_shape)
        if not 1 <= latent_dim < dim:
            raise ConfigError(
                f"FactorAnalysis: latent_dim must be between 1 and D - 1 = {dim - 1} for data of "
                f"dimension D = {dim}, got {latent_dim} (with M >= D the model is not identified)"
            )
        for name, value in (("max_iter", max_iter), ("moments_max_dim", moments_max_dim)):
            if value < 1:
                raise ConfigError(f"FactorAnalysis: {name} must be positive, got {value}")
        if tol < 0 or noise_floor <= 0:
            raise ConfigError("FactorAnalysis: tol must be >= 0 and noise_floor > 0")
        self.dim, self.latent_dim = dim, latent_dim
        self.isotropic = noise == "isotropic"
        self.streaming = method == "streaming" or (method == "auto" and dim > moments_max_dim)
        f64 = torch.float64
        self.loadings = nn.Parameter(torch.zeros(dim, latent_dim, dtype=f64))
        self.noise_variance = nn.Parameter(torch.ones(dim, dtype=f64))
        self.mean = nn.Parameter(torch.zeros(dim, dtype=f64))
        self.register_buffer("n_iter", torch.zeros((), dtype=torch.long))
        #: One dict per EM iteration: ``train/log_likelihood`` and ``train/elbo`` (nats/example).
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, Tensor] = {}  # E-step sums of the current pass
        self._var: Tensor | None = None  # diag S (streaming; the moments path has all of S)
        self._omega: Tensor | None = None  # random test matrix of the streaming PPCA sketch
        self._basis: Tensor | None = None  # sketched range Q, for the Rayleigh-Ritz pass
        self._chunk: Tensor | None = None  # float64 rows of the moment pass (add_moments_)
        self._val_sums = torch.zeros(2, dtype=f64)  # validation: sum of log p(x), examples
        self._floor = 0.0
        self._pass = 0
        self._last_ll = -math.inf

    # -- inference under the current parameters ---------------------------------------------

    def _centred(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1).to(self.mean) - self.mean

    @torch.no_grad()
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log p(x) of each example (N,), in O(N D M) through Woodbury and the
        determinant lemma."""
        xc = self._centred(x)
        v, chol = cholesky_of_precision(self.loadings, self.noise_variance)
        proj = torch.linalg.solve_triangular(chol, (xc @ v).T, upper=False)
        quad = (xc**2 / self.noise_variance).sum(1) - (proj**2).sum(0)
        log_det = self.noise_variance.log().sum() + 2 * chol.diagonal().log().sum()
        return -0.5 * (self.dim * LOG_2PI + log_det + quad)

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior p(z|x): means (N x M), G W^T Psi^-1 (x - mu), and the covariance G (M x M),
        the same for every example."""
        v, chol = cholesky_of_precision(self.loadings, self.noise_variance)
        cov = torch.cholesky_inverse(chol)
        return self._centred(x) @ v @ cov, cov

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n draws from the model, shaped (n, *input_shape)."""
        z = torch.randn(n, self.latent_dim, dtype=self.mean.dtype, device=self.mean.device)
        eps = torch.randn(n, self.dim, dtype=self.mean.dtype, device=self.mean.device)
        x = self.mean + z @ self.loadings.T + eps * self.noise_variance.sqrt()
        return x.reshape(n, *self.input_shape)

    # -- Lightning hooks -------------------------------------------------------------------

    @override
    def configure_optimizers(self) -> Optimizer:
        return EMStepCounter(self.parameters())

    @override
    def configure_callbacks(self) -> list[Callback]:
        """``vaeflow predict`` writes the latent codes (posterior means) to ``latents.pt``."""
        return prediction_callbacks(self.trainer)

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        x = batch.reshape(len(batch), -1)
        if x.shape[1] != self.dim:
            raise DataError(
                f"FactorAnalysis: examples have {x.shape[1]} values, expected {self.dim}"
            )
        if self._pass > 0 and not self.streaming:
            return  # fitted after the first pass; only a Trainer's min_epochs gets here
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            self._accumulate(x)
        # The M-step runs at the last batch, not in on_train_epoch_end, because Lightning
        # validates before on_train_epoch_end: validation must see this pass's parameters.
        if self.trainer.is_last_batch:
            self._end_pass()
            self.optimizers().step()

    @override
    def on_train_epoch_end(self) -> None:
        self._end_pass()  # no-op unless the loader hid its last batch (iterable data sets)

    @override
    def on_fit_start(self) -> None:
        self.history, self._sums, self._basis = [], {}, None
        self._pass, self._last_ll = 0, -math.inf
        self.n_iter.zero_()

    @override
    def on_fit_end(self) -> None:
        if self._pass == 0:
            raise DataError("FactorAnalysis: the training data set is empty; nothing was fitted")

    @override
    @override
    def on_validation_epoch_start(self) -> None:
        self._val_sums = self.mean.new_zeros(2)  # sum of log-likelihoods, examples

    @override
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        ll = self.log_likelihood(batch)
        self._val_sums += torch.stack([ll.sum(), ll.new_tensor(len(ll))])

    @override
    def on_validation_epoch_end(self) -> None:
        """``val/log_likelihood`` goes to the loggers on the EM-iteration axis (step = EM
        iteration of the parameters it scores), like the training rows: logged through
        Lightning, it took Lightning's batch count as its step, which collided with an EM
        iteration's row (two rows of one step in metrics.csv)."""
        total, count = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        value = (total / count).item()
        self.log("val/log_likelihood", value, logger=False)  # callbacks and progress bar
        if not self.trainer.sanity_checking:
            row = {"val/log_likelihood": value, "em_iteration": int(self.n_iter)}
            for logger in self.loggers:
                logger.log_metrics(row, step=int(self.n_iter))

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        ll = self.log_likelihood(batch).mean()
        self.log("test/log_likelihood", ll.float(), batch_size=len(batch), sync_dist=True)

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.posterior(batch)[0]

    def prediction_extras(self) -> dict[str, Tensor]:
        """What ``latents.pt`` holds beside the posterior means: the posterior covariance G
        (M x M), the same for every example."""
        _, chol = cholesky_of_precision(self.loadings, self.noise_variance)
        return {"covariance": torch.cholesky_inverse(chol).detach().cpu()}

    # -- the E-step, batch by batch --------------------------------------------------------

    def _add(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def _accumulate(self, x: Tensor) -> None:
        """Add one batch's E-step sums, all in float64."""
        self._add("n", torch.tensor(float(len(x)), dtype=torch.float64, device=x.device))
        if self._pass > 0:
            xc = x.to(torch.float64, copy=True).sub_(self.mean)
            xv = xc @ (self._basis if self._basis is not None else self._precision_loadings())
            self._add("xxv", xc.T @ xv)
            self._add("vxxv", xv.T @ xv)
            return
        # First pass: raw moments about a shift (rank 0's first batch mean), which avoids the
        # cancellation in E[xx^T] - mu mu^T when the mean is large against the spread.
        if "shift" not in self._sums:
            shift = x.mean(0, dtype=torch.float64)
            self._sums["shift"] = self.trainer.strategy.broadcast(shift, src=0)
        shift = self._sums["shift"]
        if not self.streaming:
            if "gram" not in self._sums:
                self._sums["sum"] = torch.zeros_like(shift)
                self._sums["gram"] = shift.new_zeros(self.dim, self.dim)
                self._chunk = shift.new_empty(CHUNK_ROWS, self.dim)
            add_moments_(self._sums["sum"], self._sums["gram"], x, shift, self._chunk)
            return
        xs = x.to(torch.float64, copy=True).sub_(shift)
        self._add("sum", xs.sum(0))
        self._add("sq", (xs**2).sum(0))
        if self.hparams.init == "ppca":
            self._add("sketch", xs.T @ (xs @ self._probe(xs)))

    def _probe(self, like: Tensor) -> Tensor:
        """Random D x K test matrix of the streaming PPCA sketch (the same on every rank)."""
        if self._omega is None:
            generator = torch.Generator().manual_seed(self.hparams.seed)
            k = min(self.dim, 2 * self.latent_dim + 10)
            omega = torch.randn(self.dim, k, generator=generator, dtype=like.dtype)
            self._omega = omega.to(like.device)
        return self._omega

    def _precision_loadings(self) -> Tensor:
        return self.loadings / self.noise_variance[:, None]

    # -- the M-step, once per pass -----------------------------------------------------------

    @torch.no_grad()
    def _end_pass(self) -> None:
        if "n" not in self._sums:
            return
        # Sum over processes, once per pass: the strategy's all-reduce works in place.
        reduce = self.trainer.strategy.reduce
        self._sums = {
            k: v if k == "shift" else reduce(v, reduce_op="sum") for k, v in self._sums.items()
        }
        with torch.autocast(self.mean.device.type, enabled=False):
            n = self._sums["n"]
            if n.item() == 0:
                raise DataError("FactorAnalysis: the training data set is empty")
            # NaN and infinities propagate into the sums: one check per pass, not per batch.
            if not all(torch.isfinite(total).all() for total in self._sums.values()):
                raise DataError(
                    "FactorAnalysis: the training data contain NaN or infinite values (or values "
                    "too large for float64 sums); clean or impute them before fitting"
                )
            if self._pass == 0:
                self._first_pass_done(n)
            elif self._basis is not None:
                self._sketch_pass_done(n)
            else:
                moments = Moments(self._sums["xxv"] / n, self._sums["vxxv"] / n, self._var)
                self._streaming_em_step(moments)
            if self.hparams.rotation == "varimax":
                self.loadings.copy_(varimax(self.loadings))
        self._pass += 1
        self._sums, self._chunk = {}, None

    def _first_pass_done(self, n: Tensor) -> None:
        centre = self._sums["sum"] / n
        self.mean.copy_(self._sums["shift"] + centre)
        if not self.streaming:
            cov = symmetric_from_lower(self._sums["gram"]) / n - torch.outer(centre, centre)
            self._fit_moments(cov)
            self.trainer.should_stop = True
            return
        self._var = (self._sums["sq"] / n - centre**2).clamp_min(0)
        self._floor = self.hparams.noise_floor * self._var.mean().item()
        if self.hparams.init == "ppca":
            omega = self._probe(centre)
            sketch = self._sums["sketch"] / n - torch.outer(centre, centre @ omega)
            self._basis = torch.linalg.qr(sketch).Q
        else:
            self._init_random(self._var)

    def _sketch_pass_done(self, n: Tensor) -> None:
        """Rayleigh-Ritz on the sketched range Q: eigenpairs of Q^T S Q give the PPCA start."""
        basis, self._basis = self._basis, None
        eigenvalues, vectors = torch.linalg.eigh(basis.T @ self._sums["xxv"] / n)
        self._start_from_ppca(eigenvalues.flip(0), basis @ vectors.flip(1), self._var)

    def _start_from_ppca(self, eigenvalues: Tensor, vectors: Tensor, var: Tensor) -> None:
        """PPCA's closed form; factor analysis starts from its residual variances
        diag(S - W W^T) (floored) rather than one sigma^2 for every feature."""
        loadings, sigma2 = ppca_solution(eigenvalues, vectors, self.latent_dim, var.sum(), self.dim)
        self._set(loadings, sigma2 if self.isotropic else var - (loadings**2).sum(1))

    def _init_random(self, var: Tensor) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        scale = math.sqrt(var.mean().item() / self.latent_dim)
        loadings = torch.randn(self.dim, self.latent_dim, generator=generator, dtype=var.dtype)
        self._set(loadings.to(var.device) * scale, var)

    def _set(self, loadings: Tensor, noise_variance: Tensor) -> None:
        self.loadings.copy_(loadings)
        self.noise_variance.copy_(noise_variance.clamp_min(self._floor))

    def _record(self, ll: Tensor, elbo: Tensor) -> None:
        """One row per EM iteration: log-likelihood and ELBO at the current parameters."""
        row = {"train/log_likelihood": ll.item(), "train/elbo": elbo.item()}
        self.history.append(row)
        for logger in self.loggers:
            logger.log_metrics({**row, "em_iteration": int(self.n_iter)}, step=int(self.n_iter))

    def _streaming_em_step(self, moments: Moments) -> None:
        """One EM iteration from one pass's statistics; stop when the log-likelihood stalls."""
        _, chol = cholesky_of_precision(self.loadings, self.noise_variance)
        ll = log_likelihood_from_moments(self.loadings, self.noise_variance, chol, moments)
        self._record(ll, elbo_from_moments(self.loadings, self.noise_variance, chol, moments))
        stalled = ll.item() - self._last_ll < self.hparams.tol
        self._last_ll = ll.item()
        if stalled or int(self.n_iter) >= self.hparams.max_iter:
            self.trainer.should_stop = True
            return
        self._set(*m_step(moments, chol, self._floor, self.isotropic))
        self.n_iter += 1

    def _fit_moments(self, cov: Tensor) -> None:
        """Start (closed-form PPCA or random), then EM on the covariance S."""
        var = cov.diagonal()
        self._floor = self.hparams.noise_floor * var.mean().item()
        with single_thread_if(2 * self.dim**2 * self.latent_dim < SMALL_WORK):
            if self.hparams.init == "ppca":
                self._start_from_ppca(
                    *leading_eigenpairs(cov, 2 * self.latent_dim, self.hparams.seed), var
                )
            else:
                self._init_random(var)
            w, psi = em_on_covariance(
                cov,
                self.loadings.detach().clone(),
                self.noise_variance.detach().clone(),
                floor=self._floor,
                isotropic=self.isotropic,
                tol=self.hparams.tol,
                max_iter=self.hparams.max_iter,
                accelerate=self.hparams.accelerate,
                record=self._record_iteration,
            )
        self._set(w, psi)

    def _record_iteration(self, iteration: int, ll: Tensor, elbo: Tensor) -> None:
        self.n_iter.fill_(iteration)
        self._record(ll, elbo)
