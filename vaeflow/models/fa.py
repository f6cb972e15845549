"""Factor analysis and probabilistic PCA fitted by exact EM, as Lightning manual optimisation.

The model: z ~ N(0, I_M), x | z ~ N(W z + mu, Psi), so x ~ N(mu, C) with C = W W^T + Psi;
``noise="isotropic"`` ties Psi = sigma^2 I (PPCA). Every EM statistic is a sum over examples,
accumulated batch by batch in float64, summed across processes, and the closed-form M-step is
taken once per pass. Two ways to fit:

- ``moments`` (D up to a few thousand): one pass accumulates n, sum x and sum x x^T, then EM
  iterates on the covariance S without touching the data again. EM on S is over-relaxed
  (Salakhutdinov & Roweis, 2003): a step longer than EM's is kept only if the exact
  log-likelihood does not drop, else the plain EM step is taken, so the log-likelihood never
  decreases.
- ``streaming`` (large D, where D x D does not fit): one plain EM iteration per epoch; the
  statistics are D x M and M x M.

Everything is written in terms of S, V = Psi^-1 W and G = (I + W^T V)^-1, never a D x D inverse:
log det C = log det Psi - log det G (determinant lemma) and
tr(C^-1 S) = tr(Psi^-1 S) - tr(G V^T S V) (Woodbury), so one EM iteration costs O(D^2 M) on S,
or O(N D M) per pass when streaming, and the exact log-likelihood comes free with the E-step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from scipy.linalg.blas import dsyrk
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from vaeflow.errors import ConfigError, DataError

LOG_2PI = math.log(2 * math.pi)

#: Flops per EM iteration under which EM on the covariance runs on one thread.
SMALL_WORK = 1e8

#: File that ``vaeflow predict`` writes into the run folder (see :class:`LatentCodeWriter`).
LATENTS_FILE = "latents.pt"


class Moments(NamedTuple):
    """Second-order E-step statistics at the parameters (W, Psi), normalised by n.

    ``sv`` = S V (D x M), ``vsv`` = V^T S V (M x M) and ``var`` = diag S (D), with S the
    covariance of the data about the fitted mean and V = Psi^-1 W.
    """

    sv: Tensor
    vsv: Tensor
    var: Tensor


def _gram(x: Tensor) -> Tensor:
    """Upper triangle of x^T x in float64.

    On the CPU, OpenBLAS's syrk (through SciPy) halves the flops by symmetry and runs about 4x
    faster than torch's MKL matmul on AMD processors; elsewhere a plain matmul.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(dsyrk(1.0, x.numpy().T, trans=0))
    return (x.T @ x).triu()


@contextmanager
def _single_thread_if(small: bool) -> Iterator[None]:
    """One intra-op thread for small matrix work. An EM iteration on MNIST's covariance is a few
    milliseconds of tiny operations; with two OpenMP threads each waits at a barrier for the
    other, which costs ~10x when other processes share the cores."""
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _symmetrise(upper: Tensor) -> Tensor:
    return upper.triu() + upper.triu(1).T


def _cholesky_of_precision(loadings: Tensor, noise_variance: Tensor) -> tuple[Tensor, Tensor]:
    """V = Psi^-1 W and the Cholesky factor L of I + W^T V = G^-1 (M x M)."""
    v = loadings / noise_variance[:, None]
    eye = torch.eye(loadings.shape[1], dtype=loadings.dtype, device=loadings.device)
    return v, torch.linalg.cholesky(eye + loadings.T @ v)


def log_likelihood_from_moments(
    loadings: Tensor, noise_variance: Tensor, chol: Tensor, moments: Moments
) -> Tensor:
    """Exact mean log-likelihood per example, -1/2 [D log 2pi + log det C + tr(C^-1 S)]."""
    dim = noise_variance.numel()
    log_det = noise_variance.log().sum() + 2 * chol.diagonal().log().sum()
    trace = (moments.var / noise_variance).sum() - (
        torch.cholesky_inverse(chol) * moments.vsv
    ).sum()
    return -0.5 * (dim * LOG_2PI + log_det + trace)


def elbo_from_moments(
    loadings: Tensor, noise_variance: Tensor, posterior_chol: Tensor, moments: Moments
) -> Tensor:
    """Mean ELBO per example, E_q[log p(x, z)] + H[q], with q the posterior under the parameters
    at which ``moments`` were taken (``posterior_chol``) and p under (loadings, noise_variance).

    Written as the expected complete-data log-likelihood, independently of the Woodbury form, so
    that ELBO = log-likelihood right after an E-step is a real check.
    """
    dim, latent = loadings.shape
    cov = torch.cholesky_inverse(posterior_chol)  # G of q
    s_beta = moments.sv @ cov  # S beta^T, beta = G V^T: mean of x E[z]^T
    second = cov + cov @ moments.vsv @ cov  # mean of E[z z^T]
    w_scaled = loadings / noise_variance[:, None]
    eye = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    expected = (
        dim * LOG_2PI
        + noise_variance.log().sum()
        + (moments.var / noise_variance).sum()
        - 2 * (s_beta * w_scaled).sum()
        + ((eye + loadings.T @ w_scaled) * second).sum()
    )
    log_det_cov = -2 * posterior_chol.diagonal().log().sum()
    return -0.5 * (expected - latent - log_det_cov)


def m_step(moments: Moments, chol: Tensor, floor: float, isotropic: bool) -> tuple[Tensor, Tensor]:
    """Closed-form M-step from the E-step statistics: W = (S beta^T) E[zz^T]^-1 and
    Psi = max(diag(S - W beta S), floor), the exact maximiser under the floor constraint."""
    cov = torch.cholesky_inverse(chol)
    s_beta = moments.sv @ cov
    second = cov + cov @ moments.vsv @ cov
    loadings = torch.linalg.solve(second, s_beta.T).T
    residual = moments.var - (loadings * s_beta).sum(1)
    if isotropic:
        residual = residual.mean().expand_as(residual)
    return loadings, residual.clamp_min(floor)


def ppca_solution(
    eigenvalues: Tensor, eigenvectors: Tensor, latent_dim: int, trace: Tensor, dim: int
) -> tuple[Tensor, Tensor]:
    """Closed-form PPCA from the leading eigenpairs (descending) of S: sigma^2 is the mean of
    the discarded eigenvalues, W = U_M (L_M - sigma^2 I)^(1/2)."""
    top = eigenvalues[:latent_dim]
    sigma2 = (trace - top.sum()) / (dim - latent_dim)
    loadings = eigenvectors[:, :latent_dim] * (top - sigma2).clamp_min(0).sqrt()
    return loadings, sigma2.expand(dim)


def leading_eigenpairs(
    cov: Tensor, k: int, seed: int, iterations: int = 10
) -> tuple[Tensor, Tensor]:
    """About the k leading eigenpairs (descending) of a symmetric D x D matrix by randomised
    subspace iteration with Rayleigh-Ritz: O(D^2 k) per iteration against O(D^3) for a full
    eigh. It only starts EM (which refines it), and it is exact when k >= D."""
    k = min(k, cov.shape[0])
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(cov.shape[0], k, generator=generator, dtype=cov.dtype).to(cov.device)
    for _ in range(iterations):
        basis = torch.linalg.qr(cov @ basis).Q
    eigenvalues, vectors = torch.linalg.eigh(basis.T @ cov @ basis)
    return eigenvalues.flip(0), basis @ vectors.flip(1)


def varimax(loadings: Tensor, tol: float = 1e-6, max_iter: int = 100) -> Tensor:
    """Varimax rotation of D x M loadings (Kaiser, 1958; the same iteration as scikit-learn's).

    It maximises the variance of the squared loadings in each column, so each factor loads on
    few features; the model's covariance, and so its likelihood, is unchanged.
    """
    dim, latent = loadings.shape
    rotation = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    criterion = 0.0
    for _ in range(max_iter):
        rotated = loadings @ rotation
        target = rotated**3 - rotated * (rotated**2).sum(0) / dim
        u, s, vh = torch.linalg.svd(loadings.T @ target)
        rotation = u @ vh
        new = s.sum().item()
        if criterion != 0 and new < criterion * (1 + tol):
            break
        criterion = new
    return loadings @ rotation


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
    loggers as ``train/log_likelihood`` and ``train/elbo``, one row per EM iteration.

    The mean is the sample mean (its exact maximum-likelihood value). Parameters are float64
    ``nn.Parameter`` objects, so checkpoints carry them and DDP can wrap the module; EM writes
    them in place, no gradient is ever taken. ``vaeflow predict`` writes the posterior means to
    ``latents.pt`` in the run folder (:class:`LatentCodeWriter`).

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
            example.
        noise_floor: lower bound of every noise variance, relative to the mean feature variance
            (the floor is ``noise_floor * mean(diag S)``). It keeps constant features, such as
            MNIST's border pixels, from driving a variance to zero and the likelihood to
            infinity; the M-step with the floor is still the exact constrained maximiser.
        accelerate: over-relax the EM steps of the ``moments`` method (safeguarded: the
            log-likelihood still never decreases).
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
        v, chol = _cholesky_of_precision(self.loadings, self.noise_variance)
        proj = torch.linalg.solve_triangular(chol, (xc @ v).T, upper=False)
        quad = (xc**2 / self.noise_variance).sum(1) - (proj**2).sum(0)
        log_det = self.noise_variance.log().sum() + 2 * chol.diagonal().log().sum()
        return -0.5 * (self.dim * LOG_2PI + log_det + quad)

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior p(z|x): means (N x M), G W^T Psi^-1 (x - mu), and the covariance G (M x M),
        the same for every example."""
        v, chol = _cholesky_of_precision(self.loadings, self.noise_variance)
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
        return [LatentCodeWriter()]

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
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        ll = self.log_likelihood(batch).mean()
        self.log("val/log_likelihood", ll.float(), batch_size=len(batch), sync_dist=True)

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        ll = self.log_likelihood(batch).mean()
        self.log("test/log_likelihood", ll.float(), batch_size=len(batch), sync_dist=True)

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.posterior(batch)[0]

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
        xs = x.to(torch.float64, copy=True).sub_(self._sums["shift"])
        self._add("sum", xs.sum(0))
        if not self.streaming:
            self._add("gram", _gram(xs))
            return
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
        self._sums = {}

    def _first_pass_done(self, n: Tensor) -> None:
        centre = self._sums["sum"] / n
        self.mean.copy_(self._sums["shift"] + centre)
        if not self.streaming:
            cov = _symmetrise(self._sums["gram"]) / n - torch.outer(centre, centre)
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
        _, chol = _cholesky_of_precision(self.loadings, self.noise_variance)
        ll = log_likelihood_from_moments(self.loadings, self.noise_variance, chol, moments)
        self._record(ll, elbo_from_moments(self.loadings, self.noise_variance, chol, moments))
        stalled = ll.item() - self._last_ll < self.hparams.tol
        self._last_ll = ll.item()
        if stalled or int(self.n_iter) >= self.hparams.max_iter:
            self.trainer.should_stop = True
            return
        self._set(*m_step(moments, chol, self._floor, self.isotropic))
        self.n_iter += 1

    def _evaluate(
        self, cov: Tensor, loadings: Tensor, noise: Tensor
    ) -> tuple[Moments, Tensor, Tensor]:
        """E-step on the covariance: statistics, Cholesky factor and exact log-likelihood."""
        v, chol = _cholesky_of_precision(loadings, noise)
        sv = cov @ v
        moments = Moments(sv, v.T @ sv, cov.diagonal())
        return moments, chol, log_likelihood_from_moments(loadings, noise, chol, moments)

    def _fit_moments(self, cov: Tensor) -> None:
        """Start (closed-form PPCA or random), then EM on the covariance S."""
        var = cov.diagonal()
        self._floor = self.hparams.noise_floor * var.mean().item()
        with _single_thread_if(2 * self.dim**2 * self.latent_dim < SMALL_WORK):
            if self.hparams.init == "ppca":
                self._start_from_ppca(
                    *leading_eigenpairs(cov, 2 * self.latent_dim, self.hparams.seed), var
                )
            else:
                self._init_random(var)
            w, psi = self.loadings.detach().clone(), self.noise_variance.detach().clone()
            self._em_on_covariance(cov, w, psi)

    def _em_on_covariance(self, cov: Tensor, w: Tensor, psi: Tensor) -> None:
        """EM until the log-likelihood stalls, over-relaxed with a safeguard: an extrapolated
        step (W along the EM step, Psi geometrically) is kept only if the log-likelihood does
        not drop, else the plain EM step, which never lowers it, is taken."""
        moments, chol, ll = self._evaluate(cov, w, psi)
        self._record(ll, elbo_from_moments(w, psi, chol, moments))
        step, growth = 1.0, 1.5
        for _ in range(self.hparams.max_iter):
            w_em, psi_em = m_step(moments, chol, self._floor, self.isotropic)
            accepted = False
            if step > 1:
                w_try = w + step * (w_em - w)
                psi_try = (psi * (psi_em / psi) ** step).clamp_min(self._floor)
                trial = self._evaluate(cov, w_try, psi_try)
                accepted = trial[2] >= ll
                if accepted:
                    w, psi = w_try, psi_try
                    step *= growth
            if not accepted:
                w, psi = w_em, psi_em
                trial = self._evaluate(cov, w, psi)
                step = growth if self.hparams.accelerate else 1.0
            gain = (trial[2] - ll).item()
            moments, chol, ll = trial
            self.n_iter += 1
            self._record(ll, elbo_from_moments(w, psi, chol, moments))
            if gain < self.hparams.tol:
                break
        self._set(w, psi)


class LatentCodeWriter(BasePredictionWriter):
    """Writes the posterior means of ``vaeflow predict`` to ``latents.pt`` in the run folder.

    The file holds a dict: ``latents`` (N x M float64, in the order of the predict data loader,
    by default the data module's test split) and ``covariance`` (M x M, the posterior covariance
    shared by every example). Under DDP each rank writes ``latents_rank<r>.pt`` with the
    ``indices`` of its examples in the data set.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    @override
    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _, chol = _cholesky_of_precision(pl_module.loadings, pl_module.noise_variance)
        record = {
            "latents": torch.cat(predictions),
            "covariance": torch.cholesky_inverse(chol).detach(),
        }
        name = LATENTS_FILE
        if trainer.world_size > 1:
            record["indices"] = torch.tensor([i for batch in batch_indices[0] for i in batch])
            name = f"latents_rank{trainer.global_rank}.pt"
        torch.save(record, folder / name)
