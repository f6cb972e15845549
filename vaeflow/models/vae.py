"""Variational autoencoder trained on the evidence lower bound.

q(z|x) is a diagonal Gaussian from the encoder, z = mu + sigma * eps (reparameterised), p(x|z)
comes from a registered likelihood family and p(z) from a registered prior. Every quantity is in
nats per example: summed over data dimensions, averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from vaeflow.callbacks import prediction_callbacks
from vaeflow.errors import ConfigError
from vaeflow.hparams import save_plain_hyperparameters
from vaeflow.likelihoods import Likelihood
from vaeflow.metrics import EpochMeans
from vaeflow.nets import MLP, NetFactory
from vaeflow.priors import Prior, mean_over_samples
from vaeflow.registry import LIKELIHOODS, PRIORS
from vaeflow.steps_per_call import SteppedModule
from vaeflow.utils import as_list

Estimator = Literal["analytic_kl", "monte_carlo", "importance_weighted"]


class VAE(SteppedModule):
    """Variational autoencoder with injectable likelihood, prior, encoder and decoder.

    Args:
        input_shape: shape of one example; the CLI links it from the data module's ``dims``.
        latent_dim: dimension of z.
        likelihood: a registered likelihood name (``bernoulli``, ``gaussian``, ...) or instance.
        prior: a registered prior name (``standard_normal``, ...) or instance.
        encoder: factory ``(input_shape, 2 * latent_dim) -> nn.Module``; an MLP by default.
        decoder: factory ``((latent_dim,), outputs) -> nn.Module``; an MLP by default.
        estimator: the training objective. ``analytic_kl``: analytic KL (where registered for
            the posterior and prior) + Monte-Carlo reconstruction term; ``monte_carlo``: the mean
            over samples of log p(x, z) - log q(z|x); ``importance_weighted``: the IWAE bound
            with ``num_samples`` importance samples.
        num_samples: samples of z per example in the training objective (L, or K for IWAE).
        beta: weight of the KL term (1 is the ELBO); it never depends on the data-set size.
        eval_samples: importance samples K of the log-likelihood estimate logged at validation
            and test (0 skips it; 5000 is the literature's standard for MNIST test scores).
        optimizer: optimiser factory (YAML: ``class_path: torch.optim.Adam`` + ``init_args``).
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch
            (``ReduceLROnPlateau`` on the training objective).
        training: ``joint`` moves all parameters at once; ``alternating`` is the EM view:
            per batch an E-step moves the encoder with the decoder fixed, then an M-step moves
            the decoder, likelihood and prior with the encoder fixed (one optimiser each).
        gradient_clip_val: clip the gradient norm to this value (the VAE steps its optimisers
            itself, so Trainer(gradient_clip_val) does not apply; set it here).
        steps_per_call: training steps (batches) per call of Lightning's training step, as
            Keras's ``steps_per_execution``: Lightning's per-call cost (loop, hooks, callbacks)
            is 10-20% of a small model's step on the CPU. Same steps and results as 1; see
            :class:`~vaeflow.steps_per_call.SteppedModule` for what changes.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 16,
        likelihood: Likelihood | str = "bernoulli",
        prior: Prior | str = "standard_normal",
        encoder: NetFactory | None = None,
        decoder: NetFactory | None = None,
        estimator: Estimator = "analytic_kl",
        num_samples: int = 1,
        beta: float = 1.0,
        eval_samples: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        training: Literal["joint", "alternating"] = "joint",
        gradient_clip_val: float | None = None,
        steps_per_call: int = 1,
    ) -> None:
        super().__init__(steps_per_call)
        save_plain_hyperparameters(self)
        if latent_dim < 1 or num_samples < 1 or eval_samples < 0:
            raise ConfigError(
                "latent_dim and num_samples must be positive and eval_samples non-negative; got "
                f"latent_dim={latent_dim}, num_samples={num_samples}, eval_samples={eval_samples}"
            )
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.likelihood = LIKELIHOODS.build(likelihood)
        self.likelihood.bind(self.input_shape)
        self.prior = PRIORS.build(prior)
        self.prior.bind(latent_dim)
        self.encoder = (encoder or MLP)(self.input_shape, 2 * latent_dim)
        self.decoder = (decoder or MLP)((latent_dim,), self.likelihood.num_outputs)
        self.estimator = estimator
        self.num_samples = num_samples
        self.beta = beta
        self.eval_samples = eval_samples
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_mode = training
        self.gradient_clip_val = gradient_clip_val
        self._means = {stage: EpochMeans() for stage in ("train", "val", "test")}

    # -- the model --------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Distribution:
        """q(z | x): a diagonal Gaussian with event shape ``(latent_dim,)``."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        return Independent(Normal(loc, F.softplus(raw_scale) + 1e-6, validate_args=False), 1)

    def decode(self, z: Tensor) -> Distribution:
        """p(x | z), batched over the leading dimensions of ``z`` (samples, examples)."""
        return self.likelihood(self.decoder_outputs(z))

    def decoder_outputs(self, z: Tensor) -> Tensor:
        """The decoder's outputs for ``z``, whose leading dimensions it sees as one batch."""
        outputs = self.decoder(z.reshape(-1, self.latent_dim))
        return outputs.reshape(*z.shape[:-1], -1)

    def elbo_terms(
        self, x: Tensor, num_samples: int = 1, estimator: Estimator = "analytic_kl"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ELBO, reconstruction term, KL) per example, each of shape ``(N,)``.

        With ``monte_carlo`` the KL is the sample mean of log q(z|x) - log p(z) over the same z
        as the reconstruction term; with ``analytic_kl`` it is closed-form where registered.
        """
        posterior = self.encode(x)
        # One sample needs no sample dimension, nor a mean over it (a few percent of a small
        # model's step on the CPU).
        z = posterior.rsample((num_samples,) if num_samples > 1 else ())
        log_px = self.likelihood.log_prob(self.decoder_outputs(z), x)
        reconstruction = mean_over_samples(log_px, posterior)
        if estimator == "analytic_kl":
            kl = self.prior.kl(posterior, z)
        else:
            kl = mean_over_samples(posterior.log_prob(z) - self.prior().log_prob(z), posterior)
        return reconstruction - kl, reconstruction, kl

    def elbo(self, x: Tensor, num_samples: int = 1) -> Tensor:
        """The evidence lower bound per example, ``(N,)``, with the lower-variance estimator."""
        return self.elbo_terms(x, num_samples)[0]

    def log_importance_weights(
        self, x: Tensor, num_samples: int, reparameterized: bool = False
    ) -> Tensor:
        """log p(x, z_k) - log q(z_k | x) for K samples z_k ~ q(z|x): shape ``(K, N)``.

        ``reparameterized`` keeps the samples differentiable (for training on the IWAE bound).
        """
        posterior = self.encode(x)
        shape = (num_samples,)
        z = posterior.rsample(shape) if reparameterized else posterior.sample(shape)
        log_px = self.likelihood.log_prob(self.decoder_outputs(z), x)
        return log_px + self.prior().log_prob(z) - posterior.log_prob(z)

    def log_likelihood(self, x: Tensor, num_samples: int = 1000, chunk_size: int = 250) -> Tensor:
        """Importance-weighted estimate of log p(x) per example, ``(N,)``.

        ``log mean_k exp(log w_k)`` over K = ``num_samples`` samples, computed in chunks of
        ``chunk_size`` samples so memory stays bounded for large K. It is a lower bound in
        expectation that tightens towards log p(x) as K grows.
        """
        with torch.no_grad():
            chunks = [
                self.log_importance_weights(x, min(chunk_size, num_samples - start)).logsumexp(0)
                for start in range(0, num_samples, chunk_size)
            ]
        return torch.stack(chunks).logsumexp(0) - math.log(num_samples)

    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` draws x ~ p(x|z) p(z), shape ``(n, *input_shape)``; ``mean`` gives E[x|z]."""
        with torch.no_grad():
            z = self.prior().sample((n,))
            likelihood = self.decode(z)
            return likelihood.mean if mean else likelihood.sample()

    # -- training -----------------------------------------------------------------------------

    def objective(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise and the per-batch means of what gets logged."""
        if self.estimator == "importance_weighted":
            weights = self.log_importance_weights(x, self.num_samples, reparameterized=True)
            bound = (weights.logsumexp(0) - math.log(self.num_samples)).mean()
            return -bound, {"iw_bound": bound}
        _, reconstruction, kl = self.elbo_terms(x, self.num_samples, self.estimator)
        reconstruction, kl = reconstruction.mean(), kl.mean()
        return self.beta * kl - reconstruction, {"reconstruction": reconstruction, "kl": kl}

    @override
    def train_on_batch(self, batch: Tensor) -> None:
        """A step on the whole model, or, alternating, an E-step that moves the encoder with
        the rest fixed and then an M-step that moves the rest with the encoder fixed."""
        optimizers = as_list(self.optimizers())
        for phase, optimizer in enumerate(optimizers):
            if len(optimizers) > 1:
                self.toggle_optimizer(optimizer)  # no gradients for the fixed parameters
            loss, metrics = self.objective(batch)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
            optimizer.step()
            if len(optimizers) > 1:
                self.untoggle_optimizer(optimizer)
            if phase == 0:
                self._means["train"].update(metrics, len(batch))

    @override
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate("val", batch)

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate("test", batch)

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """The posterior means E[z|x]: the latent codes of the batch."""
        return self.encode(batch).mean

    def _evaluate(self, stage: str, x: Tensor) -> None:
        _, reconstruction, kl = self.elbo_terms(x, self.num_samples)
        metrics = {"reconstruction": reconstruction.mean(), "kl": kl.mean()}
        if self.eval_samples:
            metrics["log_likelihood"] = self.log_likelihood(x, self.eval_samples).mean()
        self._means[stage].update(metrics, len(x))

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        """Log the epoch means in nats per example, with bits per dimension beside the bounds."""
        means = self._means[stage].compute(
            lambda totals: self.trainer.strategy.reduce(totals, reduce_op="sum")
        )
        if "kl" in means:  # the ELBO's epoch mean, from its two terms
            means["elbo"] = means["reconstruction"] - means["kl"]
        dims = math.prod(self.input_shape) * math.log(2)
        logged = {f"{stage}/{name}": value for name, value in means.items()}
        for name in ("elbo", "iw_bound", "log_likelihood"):
            if name in means:
                logged[f"{stage}/{name}_bits_per_dim"] = -means[name] / dims
        # One value per epoch, already a mean: no batch size to weigh it by.
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=1)
        return means

    @override
    def on_train_epoch_start(self) -> None:
        self._means["train"] = EpochMeans()  # nothing left from an interrupted epoch

    @override
    def on_train_epoch_end(self) -> None:
        """Log the epoch, then step the schedulers (manual optimisation steps them itself)."""
        means = self._log_epoch("train")
        for scheduler in as_list(self.lr_schedulers()):
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(-means.get("elbo", means.get("iw_bound")))
            else:
                scheduler.step()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    @override
    def configure_callbacks(self) -> list[Callback]:
        """``vaeflow predict`` writes the latent codes (posterior means) to ``latents.pt``."""
        return prediction_callbacks(self.trainer)

    @override
    def setup(self, stage: str) -> None:
        """Check the data against the likelihood's support once, before any step runs."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        for data in getattr(datamodule, "splits", {}).values():
            self.likelihood.check_support(data)
        super().setup(stage)

    @override
    def configure_optimizers(self) -> tuple[list[Optimizer], list[LRScheduler]]:
        """One optimiser for joint training; for alternating, one for the encoder (E-step)
        and one for the decoder, likelihood and prior (M-step). A scheduler for each."""
        if self.training_mode == "joint":
            groups = [list(self.parameters())]
        else:
            encoder = list(self.encoder.parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in encoder)]
            groups = [encoder, rest]
        optimizers = [self.optimizer(params) for params in groups]
        if self.lr_scheduler is None:
            return optimizers, []
        return optimizers, [self.lr_scheduler(optimizer) for optimizer in optimizers]
