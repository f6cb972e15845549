"""Mixtures of factor analysers fitted by exact EM (Ghahramani & Hinton, 1996; with isotropic
noise, mixtures of probabilistic PCA: Tipping & Bishop, 1999).

The model: k ~ Categorical(pi), z ~ N(0, I_M), x | z, k ~ N(W_k z + mu_k, Psi_k), so
x ~ sum_k pi_k N(mu_k, W_k W_k^T + Psi_k). Each pass over the data is one EM iteration: the
E-step's responsibilities r_nk (in log space) and posterior moments E[z | x, k] are summed per
component in float64, reduced across processes once, and the M-step is closed form:
[W_k, mu_k] = (sum_n r_nk x_n E[z~]^T)(sum_n r_nk E[z~ z~^T])^-1 with z~ = [z; 1] (loadings and
mean jointly, as Ghahramani & Hinton do), Psi_k = diag(sum_n r_nk x_n (x_n - [W_k, mu_k] E[z~])^T)
/ sum_n r_nk, pooled over components for ``shared`` noise and over features for ``isotropic``;
pi_k = sum_n r_nk / N. The exact log-likelihood at each iterate is summed in the same pass.

The start is k-means: k-means++ seeding (seeded) on the first ``init_sample`` rows of rank 0's
first batch, ``kmeans_iter`` Lloyd passes over all the data, and closed-form PPCA of each final
cluster's covariance (one pass with K x D x D sums).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from vaeflow.errors import ConfigError
from vaeflow.likelihoods import LOG_2PI
from vaeflow.models.em_base import F64, EMFit, EMModel, Pass, check_latent_dim, common_shift
from vaeflow.models.fa_blas import SMALL_WORK, single_thread_if
from vaeflow.models.fa_math import (
    factorise,
    posterior_covariance,
    ppca_solution,
)


class MixtureOfFactorAnalyzers(EMModel):
    """A mixture of K factor analysers with M factors each, fitted by exact EM.

    One pass over the data per EM iteration; the exact log-likelihood (nats per example, never
    decreasing) goes to the loggers as ``train/log_likelihood`` with ``train/bits_per_dim``, one
    row per iteration. ``vaeflow predict`` writes ``responsibilities`` (N x K) and ``latents``,
    the per-component posterior means E[z | x, k] (N x K x M), to ``latents.pt``.

    Args:
        input_shape: shape of one example (linked by the CLI from the data module's ``dims``).
        num_components: K.
        latent_dim: M, factors per component (1 <= M < D).
        noise: ``diagonal`` (Psi_k per component), ``shared`` (one diagonal Psi, Ghahramani &
            Hinton's model) or ``isotropic`` (sigma_k^2 I: mixtures of PPCA).
        noise_floor: lower bound of every noise variance, relative to the data's mean
            feature variance (scikit-learn's ``reg_covar``, 1e-6 in the data's units, made
            to scale with them). Without it a component that sits on fewer than M + 1 points,
            or on a feature constant within it (the digits' border pixels), drives a variance
            to zero: the training likelihood grows without bound and a held-out example that
            inks such a pixel scores -1e5 nats or less (MNIST, 10,000 training images: mean
            held-out 1262 nats against a median of 2112). The default 1e-4 is 6.7e-6 on MNIST
            in [0, 1], five times the dequantisation noise's variance (1 / (12 * 256^2)); a
            floor relative to each feature's own variance (the earlier rule) left pixels never
            inked in training at that noise. The M-step under the bound is still the exact
            constrained maximiser.
        kmeans_iter: Lloyd passes of the k-means start.
        init_sample: rows of rank 0's first batch that k-means++ seeds from (shuffle data that
            are sorted by class first).
        max_iter: most EM iterations.
        tol: stop when the log-likelihood is estimated to be within this many nats per example
            of its limit (:mod:`vaeflow.models.stopping`).
        seed: seed of k-means++.
        data_log_scale: log of the factor the data module divided the data by (linked by the
            CLI), for bits per dimension on the data's original grid.
    """

    checkpoint_key: ClassVar[str] = "mixture_of_factor_analyzers_fit"

    def __init__(
        self,
        input_shape: tuple[int, ...] | None = None,
        num_components: int = 3,
        latent_dim: int = 2,
        noise: Literal["diagonal", "shared", "isotropic"] = "diagonal",
        noise_floor: float = 1e-4,
        kmeans_iter: int = 10,
        init_sample: int = 1000,
        max_iter: int = 500,
        tol: float = 1e-6,
        seed: int = 0,
        data_log_scale: float = 0.0,
    ) -> None:
        if noise not in ("diagonal", "shared", "isotropic"):
            raise ConfigError(f"MixtureOfFactorAnalyzers: unknown noise {noise!r}")
        if num_components < 1 or init_sample < num_components:
            raise ConfigError(
                "MixtureOfFactorAnalyzers: num_components must be positive and init_sample at "
                f"least num_components, got {num_components} and {init_sample}"
            )
        if not 0 < noise_floor < 1 or kmeans_iter < 1:
            raise ConfigError(
                "MixtureOfFactorAnalyzers: noise_floor must be in (0, 1) and kmeans_iter "
                f"positive, got {noise_floor} and {kmeans_iter}"
            )
        self.num_components, self.latent_dim, self.noise = num_components, latent_dim, noise
        super().__init__(input_shape)

    @override
    def build(self) -> None:
        dim, k, m = self.dim, self.num_components, self.latent_dim
        check_latent_dim("MixtureOfFactorAnalyzers", m, dim)
        #: Loadings W_k (K x D x M), means mu_k (K x D), noise variances (K x D), weights pi (K).
        self.loadings = nn.Parameter(torch.zeros(k, dim, m, dtype=F64))
        self.mean = nn.Parameter(torch.zeros(k, dim, dtype=F64))
        self.noise_variance = nn.Parameter(torch.ones(k, dim, dtype=F64))
        self.weights = nn.Parameter(torch.full((k,), 1 / k, dtype=F64))
        #: The data's mean: every sum is about it, so a large offset costs no precision.
        self.register_buffer("centre", torch.zeros(dim, dtype=F64))

    # -- inference -------------------------------------------------------------------------

    def _factors(self) -> list:
        return [
            factorise(w, psi)
            for w, psi in zip(self.loadings.detach(), self.noise_variance.detach(), strict=True)
        ]

    def _joint(self, x: Tensor, factors: list) -> tuple[Tensor, Tensor, Tensor]:
        """log pi_k + log N(x; mu_k, C_k) (N x K), E[z | x, k] (N x K x M), and x - centre
        (N x D), all in float64 and without an N x D array per component (ten of those per
        component made a pass over MNIST memory-bound, 50x slower).

        With y = Psi_k^(-1/2) (x - mu_k) and a = U_k^T y = P_k^T (x - mu_k) (M), the quadratic
        form is |y|^2 - |a|^2 + sum a^2 / (1 + s^2) (U_k has orthonormal columns), and |y|^2 is
        three products of the data with D x K matrices. Its cancellations lose about 1e-16 of
        |y|^2 (1e-8 nats for MNIST at the noise floor), far below the stopping rule's ``tol``.
        """
        centred = self.flat(x).to(F64) - self.centre
        offsets = self.mean.detach() - self.centre  # K x D
        precision = 1 / self.noise_variance.detach()  # K x D
        probes = torch.stack([f.probe for f in factors])  # K x D x M
        k, dim, m = probes.shape
        a = (centred @ probes.transpose(0, 1).reshape(dim, k * m)).reshape(-1, k, m)
        a = a - torch.einsum("kd,kdm->km", offsets, probes)
        y2 = (centred**2) @ precision.T - 2 * centred @ (offsets * precision).T
        y2 = y2 + (offsets**2 * precision).sum(1)
        s2 = torch.stack([f.singular_values**2 for f in factors])  # K x M
        quad = y2 + (a**2 * (1 / (1 + s2) - 1)).sum(2)
        log_det = torch.stack([f.log_det for f in factors])
        joint = -0.5 * (dim * LOG_2PI + log_det + quad) + self.weights.detach().log()
        shrinkage = torch.stack([f.shrinkage for f in factors])  # E[z] = R^T diag(h) a
        rotations = torch.stack([f.rotation for f in factors])
        return joint, torch.einsum("nkm,kmj->nkj", a * shrinkage, rotations), centred

    @override
    @torch.no_grad()
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log p(x) of each example (N,): a log-sum-exp over components."""
        return torch.logsumexp(self._joint(x, self._factors())[0], 1)

    @torch.no_grad()
    def responsibilities(self, x: Tensor) -> Tensor:
        """p(k | x) of each example (N x K), computed in log space."""
        joint = self._joint(x, self._factors())[0]
        return (joint - torch.logsumexp(joint, 1, keepdim=True)).exp()

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """E[z | x, k] (N x K x M) and each component's posterior covariance (K x M x M)."""
        factors = self._factors()
        return self._joint(x, factors)[1], torch.stack([posterior_covariance(f) for f in factors])

    # -- Lightning -------------------------------------------------------------------------

    @override
    def make_fit(self, state: dict[str, Any] | None) -> EMFit:
        return MixtureFit(self, state)

    @override
    def summary(self) -> str:
        """The iterations, why EM stopped, the training log-likelihood."""
        return (
            f"{int(self.n_iter)} EM iterations (stopped by {self.stop_reason}); log-likelihood "
            f"{self.history[-1]['train/log_likelihood']:.6f} nats per example"
        )

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return {
            "responsibilities": self.responsibilities(batch),
            "latents": self.posterior(batch)[0],
        }

    def prediction_extras(self) -> dict[str, Tensor]:
        """Beside the columns in ``latents.pt``: each component's posterior covariance."""
        return {"covariance": torch.stack([posterior_covariance(f) for f in self._factors()]).cpu()}


class MixtureFit(EMFit):
    """Moments, k-means (seeding, Lloyd passes, per-cluster PPCA), then EM."""

    model: MixtureOfFactorAnalyzers

    def __init__(self, model: MixtureOfFactorAnalyzers, state: dict[str, Any] | None) -> None:
        self.floor: Tensor | None = None  # lower bound of the noise variances (D)
        self.started = False
        super().__init__(model, state)

    @override
    def first_pass(self) -> Pass:
        return EMPass(self) if self.started else MomentsPass(self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "started": self.started, "floor": self.floor}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.started, self.floor = state["started"], state["floor"]

    def m_step(self, n: Tensor, r: Tensor, xx: Tensor, xz: Tensor, zz: Tensor) -> None:
        """The closed-form M-step from per-component sums: r (K), sum r x~^2 (K x D),
        sum r x~ E[z~]^T (K x D x (M+1)), sum r E[z~ z~^T] (K x (M+1) x (M+1))."""
        model = self.model
        alive = r > 1e-10 * n  # an empty component keeps its parameters
        eye = torch.eye(zz.shape[-1], dtype=F64, device=zz.device)
        safe = torch.where(alive[:, None, None], zz, eye)
        joint = torch.linalg.solve(safe, xz.transpose(1, 2)).transpose(1, 2)  # [W_k, m_k]
        residual = (xx - (joint * xz).sum(2)) / torch.where(alive, r, 1.0)[:, None]
        if model.noise == "shared":
            residual = ((xx - (joint * xz).sum(2)).sum(0) / n).expand_as(residual)
        elif model.noise == "isotropic":
            residual = residual.mean(1, keepdim=True).expand_as(residual)
        psi = torch.maximum(residual, self.floor)
        keep = ~alive[:, None]
        with torch.no_grad():
            model.loadings.copy_(torch.where(keep[..., None], model.loadings, joint[..., :-1]))
            model.mean.copy_(torch.where(keep, model.mean, model.centre + joint[..., -1]))
            model.noise_variance.copy_(torch.where(keep, model.noise_variance, psi))
            model.weights.copy_(r / n)


class MixturePass(Pass):
    """A pass of a :class:`MixtureFit`."""

    def __init__(self, fit: MixtureFit) -> None:
        super().__init__()
        self.fit, self.model = fit, fit.model


class MomentsPass(MixturePass):
    """n, mean and feature variances (about a shared shift); keeps the seeding sample."""

    @override
    def start(self, x: Tensor) -> list[Tensor]:
        self.shift = common_shift(self.model, x)
        sample = x[: self.model.hparams.init_sample].to(F64)
        self.sample = self.model.trainer.strategy.broadcast(sample, src=0)
        return [torch.zeros_like(self.shift), torch.zeros_like(self.shift)]

    @override
    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        xs = x.to(F64) - self.shift
        sums[0].add_(xs.sum(0))
        sums[1].add_((xs**2).sum(0))

    @override
    def finish(self, n: Tensor, total: Tensor, squares: Tensor) -> Pass:
        model = self.model
        centre = total / n
        var = (squares / n - centre**2).clamp_min(0)
        model.centre.copy_(self.shift + centre)
        self.fit.floor = (model.hparams.noise_floor * var.mean()).expand_as(var).clone()
        seeds = kmeans_plus_plus(
            self.sample - model.centre, model.num_components, model.hparams.seed
        )
        return LloydPass(self.fit, seeds, 1)


def kmeans_plus_plus(x: Tensor, k: int, seed: int) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest one chosen (K x D)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.cpu() if nearest.sum() > 0 else torch.ones(len(x), dtype=F64)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
    return x[chosen].clone()


class LloydPass(MixturePass):
    """One Lloyd iteration: counts and sums per nearest centre. The last one also sums each
    cluster's scatter (K x D x D) for the per-cluster PPCA start."""

    def __init__(self, fit: MixtureFit, centres: Tensor, iteration: int) -> None:
        super().__init__(fit)
        self.centres, self.iteration = centres, iteration
        self.last = iteration >= fit.model.hparams.kmeans_iter

    @override
    def start(self, x: Tensor) -> list[Tensor]:
        k, dim = self.centres.shape
        sums = [self.centres.new_zeros(k), self.centres.new_zeros(k, dim)]
        return [*sums, self.centres.new_zeros(k, dim, dim)] if self.last else sums

    @override
    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        centred = x.to(F64) - self.model.centre
        labels = torch.cdist(centred, self.centres).argmin(1)
        onehot = torch.nn.functional.one_hot(labels, len(self.centres)).to(F64)
        sums[0].add_(onehot.sum(0))
        sums[1].add_(onehot.T @ centred)
        if self.last:
            for k in range(len(self.centres)):
                rows = centred[labels == k]
                sums[2][k].addmm_(rows.T, rows)

    @override
    def finish(self, n: Tensor, counts: Tensor, totals: Tensor, *scatter: Tensor) -> Pass:
        used = counts > 0  # an empty cluster keeps its centre
        centres = torch.where(used[:, None], totals / counts.clamp_min(1)[:, None], self.centres)
        if not self.last:
            return LloydPass(self.fit, centres, self.iteration + 1)
        self.start_components(n, counts, centres, scatter[0])
        self.fit.started = True
        return EMPass(self.fit)

    def start_components(self, n: Tensor, counts: Tensor, centres: Tensor, scatter: Tensor) -> None:
        """Each cluster's closed-form PPCA (factor analysis and shared noise take the residual
        variances diag(S_k - W_k W_k^T) as their noise), weights from the cluster sizes."""
        model, fit = self.model, self.fit
        dim, m = model.dim, model.latent_dim
        loadings, noise = [], []
        for k in range(model.num_components):
            # a cluster too small for a covariance starts from the data's mean variance
            cov = scatter[k] / counts[k].clamp_min(1) - torch.outer(centres[k], centres[k])
            if counts[k] <= m + 1:
                cov = torch.diag(fit.floor / model.hparams.noise_floor)
            eigenvalues, vectors = torch.linalg.eigh(cov)
            w, sigma2 = ppca_solution(eigenvalues.flip(0), vectors.flip(1), m, cov.trace(), dim)
            psi = sigma2 if model.noise == "isotropic" else cov.diagonal() - (w**2).sum(1)
            loadings.append(w)
            noise.append(torch.maximum(psi, fit.floor))
        noise = torch.stack(noise)
        if model.noise == "shared":
            noise = ((counts[:, None] * noise).sum(0) / n).expand_as(noise)
        with torch.no_grad():
            model.loadings.copy_(torch.stack(loadings))
            model.mean.copy_(model.centre + centres)
            model.noise_variance.copy_(noise)
            model.weights.copy_((counts + 1e-3) / (n + 1e-3 * len(counts)))


class EMPass(MixturePass):
    """One EM iteration: responsibilities and posterior moments under the current parameters,
    the exact log-likelihood there, then the M-step unless the fit has converged."""

    def __init__(self, fit: MixtureFit) -> None:
        super().__init__(fit)
        self.factors = self.model._factors()
        self.covariances = torch.stack([posterior_covariance(f) for f in self.factors])

    @override
    def start(self, x: Tensor) -> list[Tensor]:
        k, dim, m = self.model.loadings.shape
        new = self.model.loadings.new_zeros
        return [new(()), new(k), new(k, dim), new(k, dim, m + 1), new(k, m + 1, m + 1)]

    @override
    def accumulate(self, x: Tensor, *sums: Tensor) -> None:
        k, dim, m = self.model.loadings.shape
        # small products (digits: 1438 x 64 x 6 per component): threads only wait for each other
        with single_thread_if(len(x) * dim * (m + 1) * k < SMALL_WORK):
            self._accumulate(x, *sums)

    def _accumulate(self, x: Tensor, *sums: Tensor) -> None:
        ll, r_sum, xx, xz, zz = sums
        joint, means, centred = self.model._joint(x, self.factors)
        total = torch.logsumexp(joint, 1)
        ll.add_(total.sum())
        r = (joint - total[:, None]).exp()
        r_sum.add_(r.sum(0))
        xx.add_(r.T @ centred**2)
        z = torch.cat([means, means.new_ones(*means.shape[:2], 1)], 2)  # E[z~] (N x K x M+1)
        rz = z * r[..., None]
        k, m1 = rz.shape[1:]
        xz.add_((centred.T @ rz.reshape(-1, k * m1)).reshape(-1, k, m1).transpose(0, 1))
        zz.add_(torch.einsum("nki,nkj->kij", z, rz))

    @override
    def finish(
        self, n: Tensor, ll: Tensor, r: Tensor, xx: Tensor, xz: Tensor, zz: Tensor
    ) -> Pass | None:
        fit, model = self.fit, self.model
        value = (ll / n).item()
        model.record_row(
            int(model.n_iter),
            {"train/log_likelihood": value, "train/bits_per_dim": model.bits_per_dim(value)},
        )
        m = model.latent_dim
        zz[:, :m, :m] += r[:, None, None] * self.covariances  # E[z z^T] = G_k + E[z] E[z]^T
        # the log-likelihood sums terms of the size of D (the quadratic forms) and itself
        done = fit.stopping.converged(value, model.dim + abs(value))
        if done or int(model.n_iter) >= model.hparams.max_iter:
            return None
        fit.m_step(n, r, xx, xz, zz)
        model.n_iter += 1
        return EMPass(fit)
