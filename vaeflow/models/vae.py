"""Variational autoencoder trained on the evidence lower bound.

q(z|x) comes from a registered variational family (a diagonal Gaussian by default, z = mu +
sigma * eps, reparameterised; full-covariance Gaussians and flows by name), p(x|z) from a
registered likelihood family and p(z) from a registered prior. Every quantity is in
nats per example: summed over data dimensions, averaged over the batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributions import Distribution
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from vaeflow.callbacks import prediction_callbacks
from vaeflow.callbacks.pictures import expected
from vaeflow.contracts import check_likelihood, check_net, check_posterior, check_prior
from vaeflow.errors import ConfigError, DataError
from vaeflow.hparams import save_plain_hyperparameters
from vaeflow.image_quality import ImageGeometry, image_geometry, image_quality
from vaeflow.likelihoods import Likelihood, check_scale_range
from vaeflow.metrics import EpochMeans, bits_per_dim
from vaeflow.models.inputs import as_examples
from vaeflow.models.loading import ReadyForInference
from vaeflow.models.missing import (
    Missing,
    SelfNormalisedMean,
    encoder_input,
    encoder_input_shape,
    observed_mask,
)
from vaeflow.nets import NetFactory, append_condition, build_net, conditioned_shape
from vaeflow.posteriors import Posterior, PosteriorContext, check_posterior_factorises
from vaeflow.priors import (
    Prior,
    PriorContext,
    kl_or_estimate,
    mean_over_samples,
    monte_carlo_kl,
)
from vaeflow.registry import LIKELIHOODS, POSTERIORS, PRIORS
from vaeflow.steps_per_call import SteppedModule
from vaeflow.utils import as_list, at_least_float32, check_memory

Estimator = Literal["analytic_kl", "monte_carlo", "importance_weighted"]
#: Burda et al.'s (2016) threshold on the variance over the data of E_q[z_j | x].
ACTIVE_UNIT_VARIANCE = 0.01
#: decoder outputs per chunk of importance samples in :meth:`VAE.log_likelihood` on the CPU:
#: 2^20 (4 MiB in float32), so that a chunk's element-wise work stays in cache (1.4x faster than
#: 64 MiB chunks for the MNIST VAE, ``benchmarks/vae_eval.py``).
CPU_EVAL_CHUNK_NUMBERS = 2**20
#: The longest an evaluation of the importance-weighted log-likelihood may take: an hour per
#: validation in a fit (every epoch), a day for ``validate`` and ``test``.
MAX_EVALUATION_SECONDS = {"fit": 3600.0, "validate": 86400.0, "test": 86400.0}
#: An evaluation estimated to take longer than this is announced with its estimate.
ANNOUNCED_EVALUATION_SECONDS = 30.0
#: Key of the training epoch's running means in a checkpoint.
TRAIN_MEANS_KEY = "vaeflow_train_means"
#: the same on accelerators: 2^24 (64 MiB), fewer and larger kernels.
EVAL_CHUNK_NUMBERS = 2**24
#: Importance samples of each imputation E[x_miss | x_obs] by default (:meth:`VAE.impute`).
IMPUTE_SAMPLES = 1000


def check_representable(data: Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse data that would turn infinite in the networks' ``dtype`` (float64 data of 1e300
    are finite; in float32 they are infinite, and training would seem to diverge)."""
    if (
        not data.numel()
        or not data.is_floating_point()
        or torch.finfo(data.dtype).max <= torch.finfo(dtype).max
    ):
        return
    largest = data.abs().max().item()
    if largest > torch.finfo(dtype).max:
        raise DataError(
            f"{what} holds values up to {largest:.3g} in magnitude, which overflow {dtype} "
            f"(largest {torch.finfo(dtype).max:.3g}), in which the VAE computes: rescale the "
            "data (data option scale: true maps them to [0, 1])"
        )


def samples_per_chunk(examples: int, outputs_per_example: int, device: torch.device) -> int:
    """How many importance samples of ``examples`` examples one chunk takes through the decoder
    on ``device``: as many as keep its outputs under the device's bound, at least one."""
    bound = CPU_EVAL_CHUNK_NUMBERS if device.type == "cpu" else EVAL_CHUNK_NUMBERS
    return max(1, bound // max(1, examples * outputs_per_example))


#: a batch: the examples, or for a conditional VAE the pair (examples, conditions)
Batch = Tensor | tuple[Tensor, Tensor] | list[Tensor]


def split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """(examples, conditions) of a batch; the conditions None for an unconditional one (a
    tensor, or the one-tensor list of a ``TensorDataset(x)``)."""
    if isinstance(batch, tuple | list):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def kl_estimator(estimator: Estimator) -> Callable[[Distribution, Distribution, Tensor], Tensor]:
    """KL(q || p) from (q, p, samples of q): analytic where registered for ``analytic_kl``,
    Monte Carlo for the others."""
    return kl_or_estimate if estimator == "analytic_kl" else monte_carlo_kl


def dimension_names(name: str, count: int) -> list[str]:
    """``name_00``, ``name_01``, ...: one per latent dimension, zero-padded so that tables and
    loggers list them in order."""
    width = len(str(count - 1))
    return [f"{name}_{j:0{width}d}" for j in range(count)]


def per_dimension(name: str, values: Tensor) -> dict[str, Tensor]:
    """``{name_00: values[0], ...}``: one epoch mean per latent dimension."""
    return dict(zip(dimension_names(name, len(values)), values.unbind(), strict=True))


def check_objective(
    estimator: Estimator, beta: float, kl_warmup_steps: int, free_bits: float, dreg: bool
) -> None:
    """Refuse objective settings that do nothing or contradict each other."""
    if kl_warmup_steps < 0 or free_bits < 0 or beta < 0:
        raise ConfigError(
            "beta, kl_warmup_steps and free_bits must be non-negative; got "
            f"beta={beta}, kl_warmup_steps={kl_warmup_steps}, free_bits={free_bits}"
        )
    weighted = beta != 1 or kl_warmup_steps or free_bits
    if estimator == "importance_weighted" and weighted:
        raise ConfigError(
            "beta, kl_warmup_steps and free_bits weigh the ELBO's KL term, which the "
            "importance-weighted bound does not have: use estimator analytic_kl or monte_carlo"
        )
    if dreg and estimator != "importance_weighted":
        raise ConfigError(
            f"dreg=True is a gradient of the importance-weighted bound; estimator={estimator!r} "
            "trains on the ELBO. Set estimator: importance_weighted or dreg: false"
        )


class VAE(ReadyForInference, SteppedModule):
    """Variational autoencoder with injectable posterior, likelihood, prior, encoder and decoder.

    Args:
        input_shape: shape of one example; the CLI links it from the data module's ``dims``.
        latent_dim: dimension of z.
        likelihood: a registered likelihood name (``bernoulli``, ``gaussian``, ...) or instance.
        prior: a registered prior name (``standard_normal``, ...) or instance.
        posterior: the variational family q(z|x), a registered name (``diagonal_gaussian``,
            ``full_gaussian``, ``planar``, ``iaf``, ...) or instance; it says how many numbers
            the encoder outputs. Older checkpoints reload as ``diagonal_gaussian``.
        encoder: a registered net name (``mlp``, ``conv_encoder``, ...) or a factory
            ``(input_shape, (posterior.num_outputs,)) -> nn.Module`` (YAML: ``class_path`` +
            ``init_args``).
        decoder: a registered net name (``mlp``, ``conv_decoder``, ...) or a factory
            ``((latent_dim,), likelihood.output_shape) -> nn.Module``. None, for either, is
            ``mlp`` (checkpoints written before nets had names store None).
        estimator: the training objective. ``analytic_kl``: analytic KL (where registered for
            the posterior and prior) + Monte-Carlo reconstruction term; ``monte_carlo``: the mean
            over samples of log p(x, z) - log q(z|x); ``importance_weighted``: the IWAE bound
            with ``num_samples`` importance samples.
        num_samples: samples of z per example in the training objective (L, or K for IWAE).
        beta: weight of the KL term (1 is the ELBO); it never depends on the data-set size.
        kl_warmup_steps: KL warm-up (Bowman et al., 2016; Sonderby et al., 2016): the KL weight
            grows linearly from 0 at the first training step (batch) to ``beta`` at this step
            and stays there; 0 turns it off. The logged ELBO stays the unweighted one.
        free_bits: free bits per latent dimension (Kingma et al., 2016): each dimension's KL,
            averaged over the batch, enters the loss as max(free_bits, KL_j), so dimensions
            below the floor get no pull towards the prior; 0 turns it off. Needs a prior and a
            posterior that factorise over the dimensions (``standard_normal``,
            ``learned_gaussian``; ``diagonal_gaussian``).
        dreg: with ``importance_weighted``, the doubly reparameterised gradient (Tucker et al.,
            2019) for the encoder: unbiased, about twice plain IWAE's signal-to-noise ratio.
            The decoder's gradient and the logged bound are plain IWAE's.
        eval_samples: importance samples K of the log-likelihood estimate logged at validation
            and test (0 skips it; 5000 is the literature's standard for MNIST test scores).
        predict_samples: posterior samples per example at ``vaeflow predict``: 0 writes the
            posterior means only (``latents``; a flow's: the mean of
            :data:`~vaeflow.posteriors.MEAN_SAMPLES` samples); S >= 2 also writes
            ``latent_spread``, the standard deviation over S samples z ~ q(z|x) of each latent
            dimension, and ``reconstruction_spread``, that of their reconstructions E[x|z] per
            data element.
        optimizer: optimiser factory (YAML: ``class_path: torch.optim.Adam`` + ``init_args``).
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch
            (``ReduceLROnPlateau`` on the training objective).
        training: ``joint`` moves all parameters at once; ``alternating`` is the EM view:
            per batch an E-step moves the encoder and the posterior's own parameters (a flow's
            networks) with the decoder fixed, then an M-step moves the decoder, likelihood and
            prior with the encoder fixed (one optimiser each).
        gradient_clip_val: clip the gradient norm to this value (the VAE steps its optimisers
            itself, so Trainer(gradient_clip_val) does not apply; set it here).
        steps_per_call: training steps (batches) per call of Lightning's training step, as
            Keras's ``steps_per_execution`` (Lightning's per-call cost is 10-20% of a small
            model's CPU step); same results as 1 (:class:`~vaeflow.steps_per_call.SteppedModule`).
        posterior_scale_range: (floor, cap) of the posterior's standard deviations, softplus
            of the encoder's outputs plus the floor, capped so that a diverging run cannot
            overflow (the prior's scale is 1: healthy training stays far below).
        data_log_scale: log of the factor the data module divided each value by (its
            ``log_scale``, linked by the CLI): bits per dimension are of the data on their
            original grid (:func:`vaeflow.metrics.bits_per_dim`).
        condition_dim: length of the condition c beside each example (one-hot label,
            covariates; equal to the data's, checked): q(z | x, c) and p(x | z, c) get c
            appended (:func:`vaeflow.nets.append_condition`). 0: unconditional.
        predict_condition: a class whose condition ``vaeflow predict`` also decodes every
            code under (``counterfactuals``).
        missing: NaN in the data: ``refuse`` (an error), or a missing value that the likelihood
            leaves out (MIWAE) and the encoder sees as 0 (``zeros``) or 0 and the mask
            (``zeros_and_mask``).
    """

    #: Its checkpoints keep the training epoch's running means, so an interrupted run stops
    #: mid-epoch and resumes there (:class:`~vaeflow.guards.InterruptCheckpoint`).
    resumes_mid_epoch: ClassVar[bool] = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 16,
        likelihood: Likelihood | str = "bernoulli",
        prior: Prior | str = "standard_normal",
        posterior: Posterior | str = "diagonal_gaussian",
        encoder: str | NetFactory | None = "mlp",
        decoder: str | NetFactory | None = "mlp",
        estimator: Estimator = "analytic_kl",
        num_samples: int = 1,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        dreg: bool = False,
        eval_samples: int = 0,
        predict_samples: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        training: Literal["joint", "alternating"] = "joint",
        gradient_clip_val: float | None = None,
        steps_per_call: int = 1,
        posterior_scale_range: tuple[float, float] = (1e-6, 1e3),
        data_log_scale: float = 0.0,
        condition_dim: int = 0,
        predict_condition: int | None = None,
        missing: Missing = "refuse",
    ) -> None:
        super().__init__(steps_per_call)
        save_plain_hyperparameters(self)
        if predict_samples == 1 or predict_samples < 0:
            raise ConfigError(
                f"predict_samples={predict_samples}: a spread needs at least 2 samples (0 writes "
                "the posterior means only)"
            )
        if latent_dim < 1 or num_samples < 1 or eval_samples < 0 or condition_dim < 0:
            raise ConfigError(
                "latent_dim and num_samples must be positive and eval_samples and condition_dim "
                f"non-negative; got latent_dim={latent_dim}, num_samples={num_samples}, "
                f"eval_samples={eval_samples}, condition_dim={condition_dim}"
            )
        check_scale_range("posterior_scale_range", *posterior_scale_range)
        self.posterior_scale_range = tuple(posterior_scale_range)
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.likelihood = LIKELIHOODS.build(likelihood)
        self.likelihood.bind(self.input_shape)
        self.posterior = POSTERIORS.build(posterior)
        self.posterior.bind(PosteriorContext(latent_dim, self.posterior_scale_range))
        self.condition_dim = condition_dim
        if predict_condition is not None and not 0 <= predict_condition < condition_dim:
            raise ConfigError(
                f"predict_condition={predict_condition} is not a class of this VAE's "
                f"condition_dim={condition_dim} (0 .. {condition_dim - 1})"
            )
        self.predict_condition = predict_condition
        if missing != "refuse":
            self.likelihood.check_elementwise()
        self.missing = missing
        encoder_shape = conditioned_shape(
            encoder_input_shape(self.input_shape, missing), condition_dim
        )
        self.encoder = build_net(encoder or "mlp", encoder_shape, (self.posterior.num_outputs,))
        self.decoder = build_net(
            decoder or "mlp", (latent_dim + condition_dim,), self.likelihood.output_shape
        )
        self.prior = PRIORS.build(prior)
        self.prior.bind(PriorContext(latent_dim, self.input_shape, self.encode))
        # each part on two examples, once the networks (the largest parts) fit in memory
        check_likelihood(self.likelihood)
        check_posterior(self.posterior, latent_dim)
        check_net(self.encoder, "encoder", encoder_shape, self.posterior.num_outputs)
        check_net(
            self.decoder, "decoder", (latent_dim + condition_dim,), self.likelihood.num_outputs
        )
        check_prior(self.prior, latent_dim)
        check_objective(estimator, beta, kl_warmup_steps, free_bits, dreg)
        if free_bits and self.prior.marginals() is None:
            raise ConfigError(
                f"free_bits={free_bits} needs a prior that factorises over the latent dimensions "
                f"(standard_normal, learned_gaussian); {type(self.prior).__name__} does not"
            )
        if free_bits:
            check_posterior_factorises(self.posterior, f"free_bits={free_bits}")
        self.estimator = estimator
        self.num_samples = num_samples
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps
        self.free_bits = free_bits
        self.dreg = dreg
        self.eval_samples = eval_samples
        self.predict_samples = predict_samples
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_mode = training
        self.gradient_clip_val = gradient_clip_val
        self.data_log_scale = data_log_scale
        self._means = {stage: EpochMeans() for stage in ("train", "val", "test")}
        #: set at setup when the data module's examples are pictures (:mod:`vaeflow.image_quality`)
        self._image_geometry: ImageGeometry | None = None
        #: told (samples done, samples asked) after each chunk of :meth:`log_likelihood`: the
        #: console's progress bar sets it while it shows an evaluation, which may spend minutes
        #: in one batch
        self.sample_progress: Callable[[int, int], None] | None = None

    #: What the data modules' message about NaN in the data adds.
    missing_values_advice: ClassVar[str] = (
        ", or set the VAE's missing: zeros (NaN is a missing value: the likelihood counts the "
        "observed values only, MIWAE) or missing: zeros_and_mask"
    )

    @property
    def missing_values(self) -> str | None:
        """None when NaN in the data is an error; else what NaN means, for messages."""
        return None if self.missing == "refuse" else f"missing: {self.missing}"

    # -- the model --------------------------------------------------------------------------------

    def as_input(self, x: Tensor | np.ndarray) -> Tensor:
        """``x`` as the networks take it: a tensor on the model's device, floats in its dtype
        (users hold float64 tensors and NumPy arrays, and data modules keep float64 arrays in
        float64 for factor analysis)."""
        x = as_examples(x, self.input_shape, "VAE").to(self.device)
        return x.to(self.dtype) if x.is_floating_point() and x.dtype != self.dtype else x

    def gradients(self) -> torch.set_grad_enabled:
        """Autograd for the public methods: off in eval mode, so that a model loaded for
        inference gives tensors that ``.numpy()`` takes (training runs in train mode)."""
        return torch.set_grad_enabled(self.training and torch.is_grad_enabled())

    def checked_condition(self, condition: Tensor | np.ndarray | None) -> Tensor | None:
        """``condition`` as a tensor on the model's device; refused where it does not fit."""
        if (condition is None) != (self.condition_dim == 0):
            raise ConfigError(
                f"this VAE has condition_dim={self.condition_dim}: "
                + ("pass a condition" if condition is None else "it takes no condition")
            )
        if condition is None:
            return None
        condition = torch.as_tensor(condition, device=self.device).to(self.dtype)
        if condition.shape[-1] != self.condition_dim:
            raise ConfigError(
                f"a condition has {self.condition_dim} numbers per example here; got shape "
                f"{tuple(condition.shape)}"
            )
        return condition

    def encoder_outputs(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """The encoder's outputs for ``x`` (with its condition appended, if conditional)."""
        condition = self.checked_condition(condition)
        x = encoder_input(x, self.missing, len(self.input_shape))
        if condition is not None:
            x = append_condition(x, condition, len(self.input_shape))
        return self.encoder(x)

    def encode(self, x: Tensor, condition: Tensor | None = None) -> Distribution:
        """q(z | x), or q(z | x, c) for a conditional VAE, event shape ``(latent_dim,)``, from
        the registered posterior family."""
        x = self.as_input(x)
        with self.gradients():
            return self.posterior(self.encoder_outputs(x, condition))

    def decode(
        self, z: Tensor, size_factor: Tensor | None = None, condition: Tensor | None = None
    ) -> Distribution:
        """p(x | z) (p(x | z, c) with a ``condition``), batched over the leading dimensions of
        ``z`` (samples, examples).

        ``size_factor`` (one per example, broadcast against those dimensions) scales the mean
        of a count likelihood with ``library_size: observed``: the library size to decode for.
        """
        with self.gradients():
            return self.likelihood.decoded(self.decoder_outputs(z, condition), size_factor)

    def decoder_outputs(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """The decoder's outputs for ``z``, whose leading dimensions it sees as one batch; a
        ``condition`` ``(N, condition_dim)`` broadcasts against them."""
        condition = self.checked_condition(condition)
        if condition is not None:
            z = append_condition(z, condition.expand(*z.shape[:-1], -1), 1)
        outputs = at_least_float32(self.decoder(z.reshape(-1, z.shape[-1])))
        shape = (*z.shape[:-1], self.likelihood.num_outputs)
        return outputs if outputs.shape == shape else outputs.reshape(shape)

    def elbo_terms(
        self,
        x: Tensor,
        num_samples: int = 1,
        estimator: Estimator = "analytic_kl",
        condition: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ELBO, reconstruction term, KL) per example, each of shape ``(N,)``.

        With ``monte_carlo`` the KL is the sample mean of log q(z|x) - log p(z) over the same z
        as the reconstruction term; with ``analytic_kl`` it is closed-form where registered.
        """
        posterior, z, reconstruction = self.reconstruction_term(x, num_samples, condition)
        kl = self.kl(posterior, z, estimator)
        return reconstruction - kl, reconstruction, kl

    def reconstruction_term(
        self, x: Tensor, num_samples: int = 1, condition: Tensor | None = None
    ) -> tuple[Distribution, Tensor, Tensor]:
        """q(z|x), reparameterised samples z from it, and the mean over them of log p(x|z),
        ``(N,)``."""
        x = self.as_input(x)
        posterior = self.encode(x, condition)
        # One sample needs no sample dimension, nor a mean over it (a few percent of a small
        # model's step on the CPU).
        z = posterior.rsample((num_samples,) if num_samples > 1 else ())
        log_px = self.data_log_prob(self.decoder_outputs(z, condition), x)
        return posterior, z, mean_over_samples(log_px, posterior)

    def data_log_prob(self, outputs: Tensor, x: Tensor) -> Tensor:
        """log p(x | outputs), or with ``missing`` log p(x_obs | outputs), the sum over the
        observed values of examples with NaN (a complete batch takes the complete-data path)."""
        observed = None if self.missing == "refuse" else observed_mask(x)
        if observed is None:
            return self.likelihood.log_prob(outputs, x)
        return self.likelihood.masked_log_prob(outputs, x, observed)

    def check_data(self, x: Tensor) -> None:
        """Refuse values outside the likelihood's support; with ``missing``, of the values
        that are there (NaN is a missing value), and without it NaN, naming the option."""
        missing = torch.isnan(x)
        if not bool(missing.any()):
            self.likelihood.check_support(x)
            return
        if self.missing == "refuse":
            raise DataError(
                f"the data hold {int(missing.sum())} NaN values, which this VAE refuses "
                f"(missing: refuse): drop or impute them{self.missing_values_advice}"
            )
        self.likelihood.check_support(x[~missing])

    def kl(
        self, posterior: Distribution, z: Tensor, estimator: Estimator = "analytic_kl"
    ) -> Tensor:
        """KL(q(z|x) || p(z)) per example: by ``kl_divergence`` where registered (Monte Carlo
        over ``z`` otherwise) with ``analytic_kl``, by Monte Carlo over ``z`` with any other."""
        return kl_estimator(estimator)(posterior, self.prior(), z)

    def kl_per_dimension(
        self, posterior: Distribution, z: Tensor, estimator: Estimator = "analytic_kl"
    ) -> Tensor:
        """KL(q(z_j|x) || p(z_j)) per example and latent dimension, ``(N, latent_dim)``, for a
        prior and a posterior that factorise (:meth:`Prior.marginals`,
        :meth:`Posterior.marginals`); estimated as :meth:`kl` is."""
        marginals = self.posterior.marginals(posterior)
        return kl_estimator(estimator)(marginals, self.prior.marginals(), z)

    def elbo(
        self,
        x: Tensor,
        num_samples: int = 1,
        estimator: Estimator = "analytic_kl",
        condition: Tensor | None = None,
    ) -> Tensor:
        """The evidence lower bound per example, ``(N,)``, by either unbiased estimator.

        ``analytic_kl`` (the default) takes the KL in closed form where one is registered;
        ``monte_carlo`` averages log p(x, z) - log q(z|x) over the same samples. Neither has
        the lower variance in general: the Monte-Carlo one's terms cancel where q(z|x) is close
        to the true posterior. Measured per example over 2,000 draws of one sample
        (tests/test_vae.py::test_which_elbo_estimator_has_the_lower_variance): on the exact
        posterior widened by 20% of a linear-Gaussian model, ``monte_carlo`` has the smaller
        variance; on an untrained digits VAE, ``analytic_kl`` has.
        """
        x = self.as_input(x)
        self.check_data(x)
        with self.gradients():
            return self.elbo_terms(x, num_samples, estimator, condition)[0]

    def log_importance_weights(
        self,
        x: Tensor,
        num_samples: int,
        reparameterized: bool = False,
        dreg: bool = False,
        condition: Tensor | None = None,
    ) -> Tensor:
        """log p(x, z_k) - log q(z_k | x) for K samples z_k ~ q(z|x): shape ``(K, N)``.

        ``reparameterized`` keeps the samples differentiable (for training on the IWAE bound).
        ``dreg`` gives the doubly reparameterised gradient of their log-sum-exp (Tucker et al.,
        2019, eq. 7): log q takes the samples but not q's parameters, and the gradient reaching
        each sample is multiplied by its normalised weight, so that the encoder receives
        sum_k w_k^2 d log w_k / dz_k dz_k / dphi. The values are unchanged.
        """
        x = self.as_input(x)
        outputs = self.encoder_outputs(x, condition)
        posterior = self.posterior(outputs)
        shape = (num_samples,)
        z = posterior.rsample(shape) if reparameterized or dreg else posterior.sample(shape)
        # a copy of q with every parameter (the encoder's outputs, a flow's weights) detached
        proposal = self.posterior(outputs, detach=True) if dreg else posterior
        log_weights = self.log_weights(x, z, proposal, condition)
        if dreg and z.requires_grad:
            normalised = log_weights.detach().softmax(0).unsqueeze(-1)
            z.register_hook(lambda grad: grad * normalised)
        return log_weights

    def log_weights(
        self,
        x: Tensor,
        z: Tensor,
        posterior: Distribution,
        condition: Tensor | None = None,
        outputs: Tensor | None = None,
    ) -> Tensor:
        """log p(x | z) + log p(z) - log q(z | x) for samples ``z`` ``(K, N, latent_dim)``
        (``outputs``: the decoder's for ``z``, when the caller has them)."""
        outputs = self.decoder_outputs(z, condition) if outputs is None else outputs
        log_px = self.data_log_prob(outputs, x)
        return log_px + self.prior().log_prob(z) - posterior.log_prob(z)

    def log_likelihood(
        self,
        x: Tensor,
        num_samples: int = 1000,
        chunk_size: int | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """Importance-weighted estimate of log p(x) (log p(x | c) with a ``condition``) per
        example, ``(N,)``.

        ``log mean_k exp(log w_k)`` over K = ``num_samples`` samples. x is encoded once; the
        samples go through the decoder ``chunk_size`` at a time for all examples at once (by
        default :func:`samples_per_chunk`), their log-sum-exp accumulated, so memory stays
        bounded for any K. It is a lower bound in expectation that tightens towards log p(x) as
        K grows.
        """
        x = self.as_input(x)
        self.check_data(x)
        if chunk_size is None:
            chunk_size = samples_per_chunk(len(x), self.likelihood.num_outputs, x.device)
        with torch.no_grad():
            posterior = self.encode(x, condition)
            total = None
            for start in range(0, num_samples, chunk_size):
                z = posterior.sample((min(chunk_size, num_samples - start),))
                chunk = self.log_weights(x, z, posterior, condition).logsumexp(0)
                total = chunk if total is None else torch.logaddexp(total, chunk)
                if self.sample_progress is not None:
                    self.sample_progress(start + len(z), num_samples)
        return total - math.log(num_samples)

    def impute(
        self,
        x: Tensor | np.ndarray,
        num_samples: int = IMPUTE_SAMPLES,
        chunk_size: int | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """``x`` with each missing value (NaN) replaced by its imputation E[x_miss | x_obs], the
        self-normalised importance-sampling estimate of Mattei & Frellsen (2019): sum_k w_k
        E[x | z_k] over K = ``num_samples`` samples z_k ~ q(z | x),
        w_k proportional to p(x_obs | z_k) p(z_k) / q(z_k | x) and summing to 1. The samples go
        through the decoder ``chunk_size`` at a time, as in :meth:`log_likelihood`.

        Raises:
            ConfigError: the VAE takes no missing values (``missing: refuse``).
        """
        if self.missing == "refuse":
            raise ConfigError(
                "this VAE has missing: refuse, so it was trained on complete data and takes no "
                "NaN: train one with missing: zeros (or zeros_and_mask) to impute"
            )
        x = self.as_input(x)
        self.check_data(x)
        if chunk_size is None:
            chunk_size = samples_per_chunk(len(x), self.likelihood.num_outputs, x.device)
        estimate = SelfNormalisedMean()
        with torch.no_grad():
            posterior = self.encode(x, condition)
            for start in range(0, num_samples, chunk_size):
                z = posterior.sample((min(chunk_size, num_samples - start),))
                outputs = self.decoder_outputs(z, condition)
                log_weights = self.log_weights(x, z, posterior, condition, outputs)
                estimate.add(log_weights, self.likelihood.decoded(outputs).mean)
        return torch.where(torch.isnan(x), estimate.mean, x)

    def sample(
        self,
        n: int,
        mean: bool = False,
        size_factor: Tensor | float | None = None,
        condition: Tensor | np.ndarray | None = None,
    ) -> Tensor:
        """``n`` draws x ~ p(x|z) p(z), shape ``(n, *input_shape)``; ``mean`` gives E[x|z].

        ``size_factor`` (a number or ``n`` of them) is the library size of count likelihoods
        with ``library_size: observed`` (see :meth:`decode`). A conditional VAE draws from
        p(x | z, c) for its ``condition``: one row ``(condition_dim,)`` for every draw or ``n``
        rows; without one it cycles through the one-hot conditions (class 0, 1, ..., K - 1, 0,
        ...), the draws of a class every K-th row.
        """
        with torch.no_grad():
            z = self.prior().sample((n,))
            if size_factor is not None:
                size_factor = torch.as_tensor(size_factor, dtype=z.dtype, device=z.device)
                size_factor = size_factor.expand(n)
            if self.condition_dim:
                condition = self.sample_conditions(n, condition)
            likelihood = self.decode(z, size_factor, condition)
            return likelihood.mean if mean else likelihood.sample()

    def sample_conditions(self, n: int, condition: Tensor | np.ndarray | None) -> Tensor:
        """``n`` condition rows: ``condition`` broadcast, or the one-hot classes in turn."""
        if condition is None:
            classes = torch.arange(n, device=self.device) % self.condition_dim
            return F.one_hot(classes, self.condition_dim).to(self.dtype)
        return self.checked_condition(condition).expand(n, -1)

    # -- training -----------------------------------------------------------------------------

    def objective(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise and the per-batch means of what gets logged."""
        x, condition = split_batch(batch)
        if self.estimator == "importance_weighted":
            weights = self.log_importance_weights(x, self.num_samples, True, self.dreg, condition)
            bound = (weights.logsumexp(0) - math.log(self.num_samples)).mean()
            return -bound, {"iw_bound": bound}
        posterior, z, reconstruction = self.reconstruction_term(x, self.num_samples, condition)
        reconstruction = reconstruction.mean()
        if self.free_bits:
            kl_dims = self.kl_per_dimension(posterior, z, self.estimator).mean(0)
            kl, kl_term = kl_dims.sum(), kl_dims.clamp(min=self.free_bits).sum()
        else:
            kl = kl_term = self.kl(posterior, z, self.estimator).mean()
        loss = self.kl_weight() * kl_term - reconstruction
        return loss, {"reconstruction": reconstruction, "kl": kl}

    def kl_weight(self) -> float:
        """``beta``, ramped linearly from 0 over the first ``kl_warmup_steps`` training steps
        (batches; an alternating E- and M-step count as one)."""
        if not self.kl_warmup_steps:
            return self.beta
        steps = self.global_step // len(self.trainer.optimizers) if self._trainer else 0
        return self.beta * min(1.0, steps / self.kl_warmup_steps)

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Clip here, inside ``optimizer.step()``: under ``16-mixed`` Lightning unscales the
        gradients just before this hook, so the norm is that of the true gradients (before
        ``step()`` they are still multiplied by the loss scale, about 65536)."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)

    @override
    def train_on_batch(self, batch: Batch) -> None:
        """A step on the whole model, or, alternating, an E-step that moves the encoder with
        the rest fixed and then an M-step that moves the rest with the encoder fixed."""
        optimizers = as_list(self.optimizers())
        for phase, optimizer in enumerate(optimizers):
            if len(optimizers) > 1:
                self.toggle_optimizer(optimizer)  # no gradients for the fixed parameters
            loss, metrics = self.objective(batch)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()  # clips in on_before_optimizer_step
            if len(optimizers) > 1:
                self.untoggle_optimizer(optimizer)
            if phase == 0:
                self._means["train"].update(metrics, len(split_batch(batch)[0]))

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    @override
    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor | dict[str, Tensor]:
        """The posterior means E[z|x] (the codes the decoder gets at test time; a flow's is the
        mean of :data:`~vaeflow.posteriors.MEAN_SAMPLES` samples); with ``predict_samples``,
        the spread of posterior samples and of their reconstructions; with
        ``predict_condition``, ``counterfactuals``: E[x | z, c] for the codes of the examples'
        own conditions decoded under the chosen one (batch correction's "as if from batch b");
        with ``missing``, ``imputations``: the examples with each NaN replaced by its
        imputation (:meth:`impute` with ``eval_samples`` importance samples, or
        :data:`IMPUTE_SAMPLES` where it is 0)."""
        x, condition = split_batch(batch)
        posterior = self.encode(x, condition)
        if not self.predict_samples and self.predict_condition is None and self.missing == "refuse":
            return posterior.mean
        predictions = {"latents": posterior.mean}
        if self.missing != "refuse":
            samples = self.eval_samples or IMPUTE_SAMPLES
            predictions["imputations"] = self.impute(x, samples, condition=condition)
        if self.predict_condition is not None:
            chosen = F.one_hot(torch.tensor([self.predict_condition]), self.condition_dim)
            predictions["counterfactuals"] = self.decode(posterior.mean, None, chosen).mean
        if self.predict_samples:
            z = posterior.sample((self.predict_samples,))
            reconstructions = self.decode(z, None, condition).mean
            predictions["latent_spread"] = z.std(0)
            predictions["reconstruction_spread"] = reconstructions.std(0)
        return predictions

    def prediction_extras(self) -> dict[str, Tensor]:
        """Beside the codes in ``latents.pt``: for a family without a closed-form mean (a
        flow), ``latent_mean_samples``, the number S of samples each code is the mean of."""
        samples = self.posterior.mean_samples
        return {"latent_mean_samples": torch.tensor(samples)} if samples else {}

    def _evaluate(self, stage: str, batch: Batch) -> None:
        """The ELBO's two terms and the importance-weighted log-likelihood; at test also the
        moments of the posterior means (for the active units) and the KL of each dimension."""
        x, condition = split_batch(batch)
        posterior, z, reconstruction = self.reconstruction_term(x, self.num_samples, condition)
        metrics = {"reconstruction": reconstruction.mean(), "kl": self.kl(posterior, z).mean()}
        if self.eval_samples:
            log_px = self.log_likelihood(x, self.eval_samples, condition=condition)
            metrics["log_likelihood"] = log_px.mean()
        if stage == "test":
            codes = posterior.mean
            metrics |= per_dimension("code_mean", codes.mean(0))
            metrics |= per_dimension("code_square", codes.square().mean(0))
            if self.prior.marginals() is not None and self.posterior.factorises:
                metrics |= per_dimension("kl_dim", self.kl_per_dimension(posterior, z).mean(0))
            if self._image_geometry is not None and self.missing == "refuse":
                metrics |= self.image_quality(x, codes)
        self._means[stage].update(metrics, len(x))

    def image_quality(self, x: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """Batch means of PSNR and SSIM of the reconstructions E[x | z = E[z|x]] (``codes``) and
        of the sharpness of as many samples E[x | z], z ~ p(z) (:mod:`vaeflow.image_quality`;
        a family without a mean, the categorical, gives a draw instead)."""
        reconstructions = expected(self.decode(codes))
        samples = expected(self.decode(self.prior().sample((len(x),))))
        metrics = image_quality(x, reconstructions, samples, self._image_geometry)
        return {name: value.mean() for name, value in metrics.items()}

    def progress(self) -> dict[str, float]:
        """The training objective's mean over the epoch so far (nats per example), for the
        progress bar: the ELBO, or the importance-weighted bound."""
        means = self._means["train"].running()
        if "kl" in means:
            return {"elbo": means["reconstruction"] - means["kl"]}
        return {name: means[name] for name in ("iw_bound",) if name in means}

    def latent_summary(self, means: dict[str, Tensor]) -> dict[str, Tensor]:
        """From the test epoch's means: the number of active units (Burda et al., 2016: latent
        dimensions whose posterior mean E_q[z_j | x] varies over the data with variance above
        0.01) and the KL of each latent dimension (``kl_dim_j``, when the prior factorises).
        The per-dimension moments are removed from ``means``."""
        first, second = (
            torch.stack([means.pop(key) for key in dimension_names(name, self.latent_dim)])
            for name in ("code_mean", "code_square")
        )
        summary = {"active_units": ((second - first.square()) > ACTIVE_UNIT_VARIANCE).sum()}
        kl_names = dimension_names("kl_dim", self.latent_dim)
        if kl_names[0] in means:
            summary |= {key: means.pop(key) for key in kl_names}
        return summary

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        """Log the epoch means in nats per example, with bits per dimension beside the bounds."""
        means = self._means[stage].compute(
            lambda totals: self.trainer.strategy.reduce(totals, reduce_op="sum")
        )
        if "kl" in means:  # the ELBO's epoch mean, from its two terms
            means["elbo"] = means["reconstruction"] - means["kl"]
        if dimension_names("code_mean", self.latent_dim)[0] in means:
            means |= self.latent_summary(means)
        dims = math.prod(self.input_shape)
        # a probability mass on the pixel levels is already on the data's original grid
        log_scale = 0.0 if self.likelihood.discrete else self.data_log_scale
        logged = {f"{stage}/{name}": value for name, value in means.items()}
        for name in ("elbo", "iw_bound", "log_likelihood"):
            if name in means:
                bits = bits_per_dim(means[name], dims, log_scale)
                logged[f"{stage}/{name}_bits_per_dim"] = bits
        # One value per epoch, already a mean: no batch size to weigh it by. Plain numbers, as
        # they are already reduced over processes: of a tensor logged without sync_dist
        # Lightning cannot know that, and warns under DDP for every metric.
        logged = {name: float(value) for name, value in logged.items()}
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=1)
        return means

    @override
    def on_train_epoch_start(self) -> None:
        self._means["train"] = EpochMeans()  # nothing left from an interrupted epoch

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the training epoch's running means: a run resumed from a checkpoint written
        mid-epoch (an interruption) then logs that epoch's means over all of its batches."""
        checkpoint[TRAIN_MEANS_KEY] = self._means["train"].state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if TRAIN_MEANS_KEY in checkpoint:  # checkpoints written before it have none
            self._means["train"].load_state_dict(checkpoint[TRAIN_MEANS_KEY])

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
        """Check the data against the likelihood's support once, before any step runs, and
        note whether the examples are pictures (image quality at test)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        splits = getattr(datamodule, "splits", {})
        for split, data in splits.items():
            if isinstance(data, Tensor):  # streamed splits are never read whole
                self.check_data(data)
                check_representable(data, self.dtype, f"the {split} split")
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch_size, int):
            # each sample of each example holds the decoder's outputs and the latent code,
            # with their gradients and the activations between them: a few copies of both
            per_sample = self.likelihood.num_outputs + self.posterior.num_outputs
            check_memory(
                batch_size * self.num_samples * per_sample * 4 * 8,
                f"a training step with num_samples={self.num_samples} and batch_size={batch_size}",
                "choose fewer samples (num_samples) or a smaller batch_size",
            )
        split = {"fit": "val", "validate": "val", "test": "test"}.get(stage)
        if self.eval_samples and split in splits and len(splits[split]):
            check_evaluation_time(self, splits[split], split, MAX_EVALUATION_SECONDS[stage])
        self._image_geometry = image_geometry(datamodule, self.input_shape)
        given = getattr(datamodule, "condition_dim", 0)
        if datamodule is not None and given != self.condition_dim:
            raise ConfigError(
                f"the data give a condition of {given} numbers per example (data option "
                f"condition) and the VAE has condition_dim={self.condition_dim}: set "
                f"model condition_dim: {given}"
            )
        super().setup(stage)

    @override
    def configure_optimizers(self) -> tuple[list[Optimizer], list[LRScheduler]]:
        """One optimiser for joint training; for alternating, one for the encoder and the
        posterior's own parameters (E-step) and one for the decoder, likelihood and prior
        (M-step). A scheduler for each."""
        if self.training_mode == "joint":
            groups = [list(self.parameters())]
        else:
            encoder = [*self.encoder.parameters(), *self.posterior.parameters()]
            rest = [p for p in self.parameters() if all(p is not q for q in encoder)]
            groups = [encoder, rest]
        optimizers = [self.optimizer(params) for params in groups]
        if self.lr_scheduler is None:
            return optimizers, []
        return optimizers, [self.lr_scheduler(optimizer) for optimizer in optimizers]


def check_evaluation_time(model: VAE, data: Tensor, split: str, limit: float) -> None:
    """Time ``log_likelihood`` with up to 256 samples on up to 64 examples of ``data`` and
    extrapolate to ``eval_samples`` on every example (the cost is linear in both): refuse an
    evaluation longer than ``limit`` seconds, with its estimate; announce one longer than
    :data:`ANNOUNCED_EVALUATION_SECONDS`, so that a long silence is expected."""
    samples, examples = min(model.eval_samples, 256), min(len(data), 64)
    # the cost does not depend on which condition: the first class for a conditional model
    condition = torch.eye(model.condition_dim)[[0] * examples] if model.condition_dim else None
    start = time.perf_counter()
    model.log_likelihood(data[:examples], samples, condition=condition)
    seconds = (time.perf_counter() - start) * model.eval_samples / samples * len(data) / examples
    what = (
        f"the importance-weighted log-likelihood with eval_samples={model.eval_samples} on the "
        f"{len(data)} {split} examples takes about {duration(seconds)} on this machine"
    )
    if seconds > limit:
        raise ConfigError(
            f"{what} (measured on {examples} examples with {samples} samples), longer than "
            f"{duration(limit)}: lower model.init_args.eval_samples (5000 gives a test "
            "log-likelihood to a few hundredths of a nat), or 0 to skip it"
        )
    if seconds > ANNOUNCED_EVALUATION_SECONDS:
        rank_zero_info(f"vaeflow: {what} per evaluation")


def duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps a number above 1 (s, min, h, d)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"
