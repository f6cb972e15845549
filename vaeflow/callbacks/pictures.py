"""Pictures of what a model learned, drawn on a schedule from its public methods only.

One callback, :class:`Pictures`, draws every few epochs and at the end of training the kinds of
picture that fit the model (or those it is given), writes each as a PNG into the run folder
(``pictures/<kind>/epoch=NNNN.png``) and sends it to the loggers that show images (W&B,
TensorBoard). One callback for all kinds, because Lightning calls every callback at each of a
training step's hooks, and each call costs microseconds that a small model's step notices.

The kinds read only public methods: a VAE's ``encode``, ``decode``, ``sample`` and
``latent_dim``; factor analysis's ``loadings``, ``history`` and ``posterior`` (and a mixture's
``mean`` and ``num_components``, Bayesian FA's ``factor_shares``). Drawing uses a
random generator of its own (the training's random stream is left as it was) with a fixed seed,
so the same prior draws are pictured at every epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import PIL.Image
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.distributions import Distribution
from torchvision.utils import make_grid
from typing_extensions import override

from vaeflow.callbacks import plots
from vaeflow.callbacks.tracking import log_image, run_dir
from vaeflow.errors import ConfigError

#: The folder of the run folder that holds the pictures.
PICTURES_DIR = "pictures"
#: A picture's longer side is scaled up (by whole pixels) towards this many pixels.
TARGET_SIDE = 256


@dataclass
class Examples:
    """What the pictures are drawn from: fixed examples of the validation split (else of the
    training split), on the model's device.

    Attributes:
        x: the examples as the model takes them, ``(N, *input_shape)``.
        labels: their class labels ``(N,)`` when the data module provides them, else None.
        image_shape: ``(C, H, W)`` of one example as a picture (``(1, 1, D)``, a strip, for
            data that are not images).
        value_range: the values shown as black and white.
    """

    x: Tensor
    labels: Tensor | None
    image_shape: tuple[int, int, int]
    value_range: tuple[float, float]

    def images(self, values: Tensor) -> Tensor:
        """``values`` (N, ...) as ``(N, C, H, W)`` images with values in [0, 1]."""
        low, high = self.value_range
        images = values.reshape(len(values), *self.image_shape).float().cpu()
        return ((images - low) / (high - low)).clamp(0, 1)


def expected(distribution: Distribution) -> Tensor:
    """The mean of ``distribution``, or a draw from it where the mean is undefined (a
    categorical over pixel levels has no mean in torch)."""
    try:
        mean = distribution.mean
    except NotImplementedError:
        return distribution.sample()
    return mean if torch.isfinite(mean).all() else distribution.sample()


def latent_means(model: LightningModule, x: Tensor) -> Tensor:
    """E[z|x] (N x M): a VAE's ``encode(x).mean``, factor analysis's ``posterior(x)[0]``."""
    if hasattr(model, "encode"):
        return model.encode(x).mean
    return model.posterior(x)[0]


def grid(images: Tensor, columns: int) -> Tensor:
    """The images in rows of ``columns``, scaled up by whole pixels towards :data:`TARGET_SIDE`."""
    picture = make_grid(images, nrow=columns, padding=1, pad_value=1.0)
    scale = max(1, TARGET_SIDE // max(picture.shape[1:]))
    return picture.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def save_png(image: Tensor, path: Path) -> None:
    """``image`` (3, H, W) in [0, 1] as an 8-bit PNG, rounded as ``torchvision``'s
    ``save_image`` does, compressed fast: zlib's level 1 takes a fifth of the default's time
    for files about a third larger."""
    pixels = image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    PIL.Image.fromarray(pixels).save(path, compress_level=1)


class Picture:
    """One kind of picture. Subclasses set ``name`` (file folder and logger key), say which
    models they can draw (:meth:`applies`) and draw a ``(3, H, W)`` image in [0, 1]."""

    name: ClassVar[str]
    #: the public attributes a model needs for this picture
    needs: ClassVar[tuple[str, ...]]

    #: whether it draws a conditional model (one with ``condition_dim``) too: the kinds that
    #: encode examples or decode codes of their own have no condition to give it
    draws_conditional: ClassVar[bool] = False

    def applies(self, model: LightningModule) -> bool:
        conditional = getattr(model, "condition_dim", 0) > 0
        return self.reads(model) and (self.draws_conditional or not conditional)

    def reads(self, model: LightningModule) -> bool:
        """Whether the model has what this picture reads."""
        return all(hasattr(model, attribute) for attribute in self.needs)

    def examples_needed(self) -> int:
        """How many examples :meth:`draw` reads at most."""
        return 0

    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        raise NotImplementedError


class Reconstructions(Picture):
    """Inputs (odd rows) above their reconstructions E[x | z = E[z|x]] (even rows).

    Args:
        num_examples: how many examples.
        columns: examples per row.
    """

    name = "reconstructions"
    needs = ("encode", "decode")

    def __init__(self, num_examples: int = 32, columns: int = 8) -> None:
        self.num_examples = num_examples
        self.columns = columns

    @override
    def examples_needed(self) -> int:
        return self.num_examples

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        x = examples.x[: self.num_examples]
        inputs = examples.images(x)
        outputs = examples.images(expected(model.decode(latent_means(model, x))))
        pairs = []
        for start in range(0, len(x), self.columns):
            pairs += [inputs[start : start + self.columns], outputs[start : start + self.columns]]
        width = min(self.columns, len(x))
        padded = [torch.cat([row, row.new_ones(width - len(row), *row.shape[1:])]) for row in pairs]
        return grid(torch.cat(padded), width)


class Samples(Picture):
    """Draws from the model: E[x|z] for z from the prior (the same z at every epoch).

    Args:
        num_samples: how many draws.
        columns: draws per row.
    """

    name = "samples"
    needs = ("decode", "sample")
    #: a conditional VAE's ``sample`` cycles through the classes: a class every K-th draw
    draws_conditional = True

    def __init__(self, num_samples: int = 64, columns: int = 8) -> None:
        self.num_samples = num_samples
        self.columns = columns

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        try:
            x = model.sample(self.num_samples, mean=True)
        except NotImplementedError:
            x = model.sample(self.num_samples)
        if not torch.isfinite(x).all():
            x = model.sample(self.num_samples)
        return grid(examples.images(x), self.columns)


class LatentTraversals(Picture):
    """One row per latent dimension, the most active first (largest variance of E[z_j|x] over
    the examples): z_j swept over mean +- ``span`` standard deviations of the codes, the other
    dimensions held at the first example's code.

    Args:
        num_dims: how many dimensions (rows).
        steps: values per dimension (columns).
        span: half the sweep, in standard deviations of the dimension's codes.
    """

    name = "traversals"
    needs = ("encode", "decode", "latent_dim")

    def __init__(self, num_dims: int = 8, steps: int = 9, span: float = 3.0) -> None:
        self.num_dims = num_dims
        self.steps = steps
        self.span = span

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        codes = latent_means(model, examples.x)
        centre, spread = codes.mean(0), codes.std(0).nan_to_num(1.0)  # NaN: one example
        dims = spread.argsort(descending=True)[: self.num_dims]
        sweep = torch.linspace(-self.span, self.span, self.steps, device=codes.device)
        z = codes[:1].repeat(len(dims) * self.steps, 1).reshape(len(dims), self.steps, -1)
        for row, dim in enumerate(dims.tolist()):
            z[row, :, dim] = centre[dim] + sweep * spread[dim]
        x = expected(model.decode(z.reshape(-1, z.shape[-1])))
        return grid(examples.images(x), self.steps)


class Interpolations(Picture):
    """Straight lines between the codes of two examples: each row starts with one input, ends
    with the other, and decodes ``steps`` codes evenly spaced between their E[z|x].

    Args:
        num_pairs: how many pairs (rows).
        steps: decoded codes per row.
    """

    name = "interpolations"
    needs = ("encode", "decode")

    def __init__(self, num_pairs: int = 6, steps: int = 8) -> None:
        self.num_pairs = num_pairs
        self.steps = steps

    @override
    def examples_needed(self) -> int:
        return 2 * self.num_pairs

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        pairs = min(self.num_pairs, len(examples.x) // 2)
        x = examples.x[: 2 * pairs]
        codes = latent_means(model, x)
        start, end = codes[0::2], codes[1::2]
        t = torch.linspace(0, 1, self.steps, device=codes.device)[None, :, None]
        z = start[:, None] + t * (end - start)[:, None]  # (pairs, steps, M)
        decoded = examples.images(expected(model.decode(z.reshape(-1, z.shape[-1]))))
        decoded = decoded.reshape(pairs, self.steps, *decoded.shape[1:])
        inputs = examples.images(x).reshape(pairs, 2, *decoded.shape[2:])
        rows = torch.cat([inputs[:, :1], decoded, inputs[:, 1:]], dim=1)
        return grid(rows.flatten(0, 1), self.steps + 2)


class LatentScatter(Picture):
    """The posterior means E[z|x] of the examples in 2-D, coloured by class label when the data
    module provides labels (see :class:`Pictures`): the codes themselves when M <= 2, else
    their first two principal components.

    Args:
        num_points: how many examples at most.
    """

    name = "latent_scatter"
    needs = ()

    def __init__(self, num_points: int = 1000) -> None:
        self.num_points = num_points

    @override
    def examples_needed(self) -> int:
        return self.num_points

    @override
    def reads(self, model: LightningModule) -> bool:
        """A VAE or a factor analyser; not a mixture, whose codes live in one coordinate
        system per component (:class:`Components` pictures those)."""
        mixture = hasattr(model, "num_components")
        return hasattr(model, "encode") or (hasattr(model, "posterior") and not mixture)

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        codes = latent_means(model, examples.x[: self.num_points]).double()
        labels = None if examples.labels is None else examples.labels[: len(codes)]
        if codes.shape[1] == 1:
            points, axes = torch.cat([codes, torch.zeros_like(codes)], 1), ("z1", "")
        elif codes.shape[1] == 2:
            points, axes = codes, ("z1", "z2")
        else:
            centred = codes - codes.mean(0)
            _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
            points = centred @ vh[:2].T
            share = (singular**2 / (singular**2).sum()).tolist()
            axes = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})")
        title = f"posterior means of {len(codes)} examples (M = {codes.shape[1]})"
        return plots.scatter(points, labels, title, axes)


def signed_images(w: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """Rows of ``w`` (N x D) as ``(N, 3, H, W)`` images, each on the scale of its largest
    absolute value: red positive, blue negative, white zero (mid-grey zero for colour images)."""
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    w = w.reshape(len(w), *image_shape).float()
    if w.shape[1] == 1:
        positive, negative = w.clamp(min=0), (-w).clamp(min=0)
        return torch.cat([1 - negative, 1 - positive - negative, 1 - positive], dim=1)
    return (w + 1) / 2


def largest_first(w: Tensor, most: int) -> Tensor:
    """The ``most`` columns of ``w`` (D x M) with the largest norms, as rows (<= most x D)."""
    w = w.detach().double().cpu().T
    return w[w.norm(dim=1).argsort(descending=True)[:most]]


class Loadings(Picture):
    """The loadings, one picture per factor, largest norm first: factor analysis's rotated
    pattern (:meth:`FactorAnalysis.rotated`), or Bayesian FA's posterior mean loadings of the
    columns ARD kept (``effective_factors``). Red positive, blue negative, white zero, each on
    its own scale. For data that are not images, one strip per factor, stacked into a heat map.

    Args:
        num_factors: how many factors at most.
        columns: factors per row.
    """

    name = "loadings"
    needs = ("loadings",)

    def __init__(self, num_factors: int = 32, columns: int = 8) -> None:
        self.num_factors = num_factors
        self.columns = columns

    @override
    def reads(self, model: LightningModule) -> bool:
        """One matrix of loadings (D x M); a mixture's (K x D x M) are :class:`Components`."""
        return super().reads(model) and model.loadings.dim() == 2

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        if hasattr(model, "rotated"):
            w, most = model.rotated().loadings, self.num_factors
        else:
            w, most = model.loadings, min(self.num_factors, max(model.effective_factors, 1))
        images = signed_images(largest_first(w, most), examples.image_shape)
        strips = examples.image_shape[1] == 1  # data that are not images: one row per factor
        return grid(images, 1 if strips else min(self.columns, len(images)))


class Components(Picture):
    """A mixture of factor analysers, one row per component in the model's order (the index
    of ``responsibilities``): the component's mean, then its loading columns largest norm
    first, coloured as :class:`Loadings` colours them.

    Args:
        num_components: how many components (rows) at most.
        num_factors: how many loading columns per component at most.
    """

    name = "components"
    needs = ("num_components", "mean", "loadings")

    def __init__(self, num_components: int = 16, num_factors: int = 8) -> None:
        self.num_components = num_components
        self.num_factors = num_factors

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        rows = []
        for mean, w in zip(model.mean[: self.num_components], model.loadings, strict=False):
            image = examples.images(mean.detach()[None])
            loadings = largest_first(w, self.num_factors)
            rows += [
                image.expand(1, 3, *image.shape[2:]),
                signed_images(loadings, examples.image_shape),
            ]
        return grid(torch.cat(rows), 1 + min(self.num_factors, model.latent_dim))


class LogLikelihoodCurve(Picture):
    """The training objective (nats per example) at each iteration, from the model's
    ``history``: the exact log-likelihood of EM fits, the ELBO of Bayesian FA."""

    name = "log_likelihood"
    needs = ("history",)

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        elbo = model.history and "train/elbo" in model.history[0]
        key = "train/elbo" if elbo else "train/log_likelihood"
        values = [row[key] for row in model.history]
        title = f"training {key.removeprefix('train/')}, {len(values)} iterations"
        return plots.curve(values, title, ("iteration", "nats per example"))


class FactorShares(Picture):
    """Bayesian FA's automatic relevance determination: each loading column's share of the
    loadings' energy (``factor_shares``), largest first; the columns at or above the model's
    ``prune_threshold`` are the ``effective_factors`` it keeps."""

    name = "factor_shares"
    needs = ("factor_shares", "effective_factors")

    @override
    def draw(self, model: LightningModule, examples: Examples) -> Tensor:
        shares = model.factor_shares.detach().double().cpu().sort(descending=True).values
        title = f"ARD: {model.effective_factors} of {len(shares)} loading columns kept"
        return plots.curve(shares.tolist(), title, ("loading column, largest first", "share"))


def all_kinds() -> list[Picture]:
    """One picture of every kind, with its defaults."""
    kinds = (
        Reconstructions,
        Samples,
        LatentTraversals,
        Interpolations,
        LatentScatter,
        Loadings,
        Components,
        LogLikelihoodCurve,
        FactorShares,
    )
    return [kind() for kind in kinds]


class Pictures(Callback):
    """Draws pictures of the model every ``every_n_epochs`` epochs and at the end of training,
    into ``<run folder>/pictures/<kind>/epoch=NNNN.png`` and to the loggers that show images.

    Labels for :class:`LatentScatter` come from the data module's ``labels(split)`` method when
    it has one (class labels ``(N,)`` row for row with that split), else the points share one
    colour.

    Args:
        every_n_epochs: draw after every this many training epochs (0: only at the end).
        pictures: the kinds to draw; by default every kind that fits the model (a VAE:
            reconstructions, samples, traversals, interpolations, latent scatter; factor
            analysis: loadings, log-likelihood curve, latent scatter; Bayesian FA: those and
            the factor shares; a mixture of factor analysers: components and the curve).
        image_shape: ``(C, H, W)`` of one example as a picture; by default the data module's
            ``example_shape`` when it has three dimensions, else the model's input shape,
            else a 1-pixel strip per example.
        seed: seed of the prior draws and of nothing else.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        pictures: list[Picture] | None = None,
        image_shape: tuple[int, int, int] | None = None,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 0:
            raise ConfigError(f"Pictures: every_n_epochs must be >= 0, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.pictures = pictures
        self.image_shape = image_shape
        self.seed = seed
        #: seconds spent drawing, saving and logging in this fit (what the pictures cost)
        self.seconds = 0.0
        self._kinds: list[Picture] = []
        self._folder = Path(PICTURES_DIR)
        self._examples: Examples | None = None
        self._drawn_step = -1

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Choose the kinds and find the run folder (on every process: it is broadcast)."""
        if stage != "fit":
            return
        if self.pictures is None:
            self._kinds = [kind for kind in all_kinds() if kind.applies(pl_module)]
        else:
            unfit = [kind.name for kind in self.pictures if not kind.applies(pl_module)]
            if unfit:
                raise ConfigError(
                    f"Pictures: {', '.join(unfit)} cannot be drawn for {type(pl_module).__name__}"
                    " (it lacks the public methods they read); remove them from the callback's "
                    "pictures, or leave pictures unset for every kind that fits the model"
                )
            self._kinds = list(self.pictures)
        self._folder = run_dir(trainer) / PICTURES_DIR
        self._examples, self._drawn_step, self.seconds = None, -1, 0.0

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, epoch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final model, unless the last epoch's pictures show it already. Lightning has
        counted the last epoch by now: its index is one less."""
        if self._drawn_step != trainer.global_step:
            self.draw(trainer, pl_module, max(trainer.current_epoch - 1, 0))

    def draw(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Draw, save and log every kind now, named by the epoch's index as checkpoints are
        (on rank 0; the others wait for nothing)."""
        self._drawn_step = trainer.global_step
        if not trainer.is_global_zero or not self._kinds:
            return
        start = time.perf_counter()
        if self._examples is None:
            self._examples = self._collect(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices):
                for kind in self._kinds:
                    torch.manual_seed(self.seed)
                    image = kind.draw(pl_module, self._examples)
                    folder = self._folder / kind.name
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"epoch={epoch:04d}.png"
                    save_png(image, path)
                    log_image(trainer, f"{PICTURES_DIR}/{kind.name}", image, path)
        finally:
            pl_module.train(was_training)
        self.seconds += time.perf_counter() - start

    def _collect(self, trainer: Trainer, pl_module: LightningModule) -> Examples:
        """Up to the largest number any kind needs, from the first validation batches (else
        training batches), with their labels where the data module has them."""
        wanted = max([64, *(kind.examples_needed() for kind in self._kinds)])
        split = "val" if trainer.val_dataloaders else "train"
        loader = trainer.val_dataloaders if split == "val" else trainer.train_dataloader
        loader = loader[0] if isinstance(loader, list | tuple) else loader
        batches, count = [], 0
        for batch in loader:
            batch = batch[0] if isinstance(batch, list | tuple) else batch
            batches.append(batch)
            count += len(batch)
            if count >= wanted:
                break
        x = torch.cat(batches)[:wanted].to(pl_module.device)
        labels_of = getattr(trainer.datamodule, "labels", None)
        labels = labels_of(split) if callable(labels_of) else None
        labels = None if labels is None or len(labels) < len(x) else labels[: len(x)].cpu()
        low, high = min(0.0, x.min().item()), max(1.0, x.max().item())
        return Examples(x, labels, self._image_shape(trainer, pl_module, x), (low, high))

    def _image_shape(
        self, trainer: Trainer, pl_module: LightningModule, x: Tensor
    ) -> tuple[int, int, int]:
        candidates = (
            self.image_shape,
            getattr(trainer.datamodule, "example_shape", None),
            getattr(pl_module, "input_shape", None),
        )
        dims = math.prod(x.shape[1:])
        for shape in candidates:
            if shape is not None and len(shape) == 3 and math.prod(shape) == dims:
                return tuple(shape)
        return (1, 1, dims)
