"""Pictures: each kind draws what it says from a model's public methods (stub models record what
they are asked), and the Pictures callback writes each PNG into the run folder and hands the
same image to the logger, on its schedule, without changing the training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor
from torch.distributions import Independent, Normal

import vaeflow.models
from vaeflow.analysis import Rotation
from vaeflow.callbacks import (
    Components,
    FactorShares,
    Interpolations,
    LatentScatter,
    LatentTraversals,
    Loadings,
    LogLikelihoodCurve,
    Pictures,
    Reconstructions,
    Samples,
    run_dir,
)
from vaeflow.callbacks.pictures import Examples, grid, signed_images
from vaeflow.callbacks.plots import PALETTE
from vaeflow.data import DigitsDataModule, MNISTDataModule
from vaeflow.errors import ConfigError
from vaeflow.models import VAE, BayesianFactorAnalysis, FactorAnalysis, MixtureOfFactorAnalyzers
from vaeflow.registry import LIKELIHOODS

VAE_KINDS = [Reconstructions, Samples, LatentTraversals, Interpolations, LatentScatter]
FA_KINDS = [Loadings, LogLikelihoodCurve, LatentScatter]
#: every model of vaeflow.models and the kinds of picture drawn of it by default
DEFAULT_KINDS = {
    VAE: VAE_KINDS,
    FactorAnalysis: FA_KINDS,
    BayesianFactorAnalysis: [*FA_KINDS, FactorShares],
    MixtureOfFactorAnalyzers: [Components, LogLikelihoodCurve],
}


class IdentityCodes:
    """A stub VAE in two lines: z = x exactly, and p(x|z) centred on ``decode_map(z)``. It
    records every z it decodes."""

    def __init__(self, decode_map: Any = lambda z: z) -> None:
        self.decode_map = decode_map
        self.decoded: list[Tensor] = []
        self.latent_dim = 4

    def encode(self, x: Tensor) -> Independent:
        return Independent(Normal(x, torch.ones_like(x)), 1)

    def decode(self, z: Tensor) -> Independent:
        self.decoded.append(z.clone())
        return Independent(Normal(self.decode_map(z), torch.ones_like(z)), 1)


def examples(x: Tensor, labels: Tensor | None = None) -> Examples:
    return Examples(x, labels, (1, 2, 2), (0.0, 1.0))


def test_reconstructions_put_each_row_of_inputs_above_its_reconstructions() -> None:
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(0))
    picture = Reconstructions(num_examples=16, columns=8).draw(
        IdentityCodes(lambda z: 1 - z), examples(x)
    )
    images = examples(x).images
    rows = [images(x[:8]), images(1 - x[:8]), images(x[8:]), images(1 - x[8:])]
    torch.testing.assert_close(picture, grid(torch.cat(rows), 8))


def test_traversals_sweep_one_dimension_at_a_time_most_active_first() -> None:
    scales = torch.tensor([1.0, 0.1, 3.0, 0.5])  # activity order: dims 2, 0, 3, 1
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * scales
    model = IdentityCodes()
    LatentTraversals(num_dims=3, steps=5, span=2.0).draw(model, examples(x))
    z = model.decoded[-1].reshape(3, 5, 4)
    mean, std = x.mean(0), x.std(0)
    for row, dim in enumerate([2, 0, 3]):
        expected = mean[dim] + torch.linspace(-2, 2, 5) * std[dim]
        torch.testing.assert_close(z[row, :, dim], expected)
        others = [d for d in range(4) if d != dim]
        torch.testing.assert_close(z[row][:, others], x[0, others].expand(5, 3))


def test_interpolations_decode_evenly_spaced_codes_between_two_examples() -> None:
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(1))
    model = IdentityCodes()
    picture = Interpolations(num_pairs=3, steps=4).draw(model, examples(x))
    z = model.decoded[-1].reshape(3, 4, 4)
    for pair in range(3):
        a, b = x[2 * pair], x[2 * pair + 1]
        for step, t in enumerate(torch.linspace(0, 1, 4)):
            torch.testing.assert_close(z[pair, step], a + t * (b - a))
    assert picture.shape[1:] == grid(torch.zeros(18, 1, 2, 2), 6).shape[1:]  # 3 rows of 6


def colours_in(picture: Tensor) -> set[tuple[int, ...]]:
    pixels = (picture * 255).round().to(torch.uint8).flatten(1).T
    return {tuple(p) for p in pixels.unique(dim=0).tolist()}


def test_scatter_colours_points_by_label_and_projects_on_principal_components() -> None:
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(300) % 3
    # three clusters apart along one direction of a 4-D space: PC1 separates them
    direction = torch.tensor([1.0, 2.0, -1.0, 0.5]) / 2.5
    x = labels[:, None] * 5 * direction + 0.1 * torch.randn(300, 4, generator=generator)
    picture = LatentScatter(num_points=300).draw(IdentityCodes(), examples(x, labels))
    assert set(PALETTE[:3]) <= colours_in(picture)
    assert PALETTE[3] not in colours_in(picture)
    plain = LatentScatter(num_points=300).draw(IdentityCodes(), examples(x))
    assert PALETTE[0] in colours_in(plain) and PALETTE[1] not in colours_in(plain)


def test_loadings_are_red_where_positive_blue_where_negative_largest_factor_first() -> None:
    class StubFA:
        def rotated(self) -> Rotation:
            loadings = torch.tensor([[1.0, 0.0], [-1.0, 4.0], [0.0, -4.0], [0.5, 2.0]])
            return Rotation(loadings, torch.eye(2), torch.eye(2))

    picture = Loadings(columns=2).draw(StubFA(), examples(torch.zeros(2, 4)))
    white, red, blue = [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    # factor 1 (norm 6) first, on the scale of its largest |value| (4); then factor 0 (scale 1)
    first = torch.tensor([white, red, blue, [1.0, 0.5, 0.5]])
    second = torch.tensor([red, blue, white, [1.0, 0.5, 0.5]])
    expected = torch.stack([first, second]).permute(0, 2, 1).reshape(2, 3, 2, 2)
    torch.testing.assert_close(picture, grid(expected, 2))
    strips = Examples(torch.zeros(2, 4), None, (1, 1, 4), (0.0, 1.0))  # data that are not images
    heat_map = Loadings(columns=2).draw(StubFA(), strips)
    torch.testing.assert_close(heat_map, grid(expected.reshape(2, 3, 1, 4), 1))  # a row each


def test_bayesian_loadings_show_only_the_columns_ard_kept_largest_first() -> None:
    class StubBayesianFA:
        loadings = torch.tensor([[0.0, 2.0, 1e-9], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0, 0, 0]])
        effective_factors = 2

    picture = Loadings(columns=4).draw(StubBayesianFA(), examples(torch.zeros(2, 4)))
    expected = signed_images(StubBayesianFA.loadings.T[[1, 0]].double(), (1, 2, 2))
    torch.testing.assert_close(picture, grid(expected, 2))  # the third column is left out


def test_components_show_each_mean_then_its_loadings_one_row_per_component() -> None:
    class StubMixture:
        num_components, latent_dim = 2, 2
        mean = torch.tensor([[0.0, 0.25, 0.5, 1.0], [1.0, 1.0, 0.0, 0.0]])
        loadings = torch.tensor(
            [
                [[1.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]],
                [[0.0, 0.0], [0.0, 0.0], [-1, 0], [0, 0]],
            ]
        )

    picture = Components().draw(StubMixture(), examples(torch.zeros(2, 4)))
    grey = examples(torch.zeros(2, 4)).images(StubMixture.mean).expand(2, 3, 2, 2)
    first = signed_images(StubMixture.loadings[0].T[[1, 0]].double(), (1, 2, 2))
    second = signed_images(StubMixture.loadings[1].T.double(), (1, 2, 2))  # column 1 is zero
    rows = torch.cat([grey[:1], first, grey[1:], second])
    torch.testing.assert_close(picture, grid(rows, 3))


def test_factor_shares_draw_the_ard_shares_and_say_how_many_columns_were_kept() -> None:
    class StubBayesianFA:
        factor_shares = torch.tensor([0.05, 0.6, 0.35, 0.0])
        effective_factors = 3

    picture = FactorShares().draw(StubBayesianFA(), examples(torch.zeros(1, 4)))
    assert PALETTE[0] in colours_in(picture) and PALETTE[3] in colours_in(picture)


def test_log_likelihood_curve_draws_every_em_iteration() -> None:
    class StubFA:
        history = [{"train/log_likelihood": v} for v in (-50.0, -20.0, -12.0, -11.5, -11.4)]

    picture = LogLikelihoodCurve().draw(StubFA(), examples(torch.zeros(1, 4)))
    assert PALETTE[0] in colours_in(picture)  # the line
    assert PALETTE[3] in colours_in(picture)  # the last value's dot


# -- the callback in a fit ---------------------------------------------------------------------


class RecordingTensorBoard(TensorBoardLogger):
    """TensorBoard logger that also keeps the images it was handed: (key, image, step)."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__(save_dir, name="tb")
        self.images: list[tuple[str, Tensor, int]] = []
        writer = self.experiment
        add_image = writer.add_image

        def record(tag: str, image: Tensor, global_step: int) -> None:
            self.images.append((tag, image, global_step))
            add_image(tag, image, global_step=global_step)

        writer.add_image = record


def fit(tmp_path: Path, model: Any, callback: Pictures, max_epochs: int = 1) -> Trainer:
    logger = RecordingTensorBoard(tmp_path)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule(batch_size=256, binarize="static"))
    return trainer


@pytest.mark.parametrize(
    ("model_class", "kind"),
    [(model, kind) for model, kinds in DEFAULT_KINDS.items() for kind in kinds],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_each_picture_is_a_png_in_the_run_folder_and_the_same_image_in_the_logger(
    tmp_path: Path, model_class: type, kind: type
) -> None:
    seed_everything(0)
    trainer = fit(tmp_path, tiny(model_class), Pictures(pictures=[kind()]))
    path = run_dir(trainer) / "pictures" / kind.name / "epoch=0000.png"
    assert path.is_file()
    assert path.parent.parent.parent == Path(trainer.log_dir)  # the logger's version folder
    [(key, image, step)] = trainer.logger.images
    assert key == f"pictures/{kind.name}" and step == trainer.global_step
    assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0  # something was drawn
    if kind is LatentScatter:  # coloured by the digits' labels (DigitsDataModule.labels)
        assert set(PALETTE) <= colours_in(image)
    torch.testing.assert_close(
        torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1) / 255,
        image,
        atol=0.6 / 255,
        rtol=0,
    )


def tiny(model_class: type) -> Any:
    """A model of the digits (D = 64) that one epoch fits: EM models stop after few passes."""
    model_class_args = {VAE: {}, MixtureOfFactorAnalyzers: {"kmeans_iter": 1, "max_iter": 2}}
    extra = model_class_args.get(model_class, {"max_iter": 2})
    return model_class(input_shape=(64,), latent_dim=3, **extra)


@pytest.mark.parametrize("model_class", DEFAULT_KINDS, ids=lambda cls: cls.__name__)
def test_every_model_gets_its_kinds_by_default(tmp_path: Path, model_class: type) -> None:
    assert set(vaeflow.models.__all__) == {cls.__name__ for cls in DEFAULT_KINDS}  # none missed
    seed_everything(0)
    epochs = 1 if model_class is VAE else -1  # EM models stop by themselves
    trainer = fit(tmp_path, tiny(model_class), Pictures(every_n_epochs=0), max_epochs=epochs)
    folder = run_dir(trainer) / "pictures"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        k.name for k in DEFAULT_KINDS[model_class]
    )


def test_default_kinds_fit_the_model_and_the_schedule_is_every_n_epochs_and_the_end(
    tmp_path: Path,
) -> None:
    seed_everything(0)
    callback = Pictures(every_n_epochs=2)
    trainer = fit(tmp_path, VAE(input_shape=(64,), latent_dim=3), callback, max_epochs=3)
    folder = run_dir(trainer) / "pictures"
    assert sorted(p.name for p in folder.iterdir()) == sorted(k.name for k in VAE_KINDS)
    for kind in VAE_KINDS:  # epoch 1 by the schedule, epoch 2 at the end of training
        files = sorted(p.name for p in (folder / kind.name).iterdir())
        assert files == ["epoch=0001.png", "epoch=0002.png"]
    assert callback.seconds > 0


def test_pictures_leave_the_training_as_it_was(silent_trainer, tmp_path: Path) -> None:
    """Drawing uses a random stream of its own: the fit is the same with or without it."""
    weights = []
    for folder, callbacks in (("with", [Pictures(every_n_epochs=1)]), ("without", [])):
        seed_everything(0)
        model = VAE(input_shape=(64,), latent_dim=3)
        trainer = silent_trainer(
            max_epochs=2, callbacks=callbacks, default_root_dir=tmp_path / folder
        )
        trainer.fit(model, DigitsDataModule(batch_size=256, binarize="dynamic"))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_a_picture_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loadings cannot be drawn for VAE"):
        fit(tmp_path, VAE(input_shape=(64,), latent_dim=3), Pictures(pictures=[Loadings()]))


def test_data_modules_give_labels_row_for_row_with_their_splits(mnist_root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = DigitsDataModule(flatten=True)
    digits.setup()
    raw = load_digits()
    for split, data in digits.splits.items():
        labels = digits.labels(split)
        rows = digits.indices[split]
        assert torch.equal(labels, torch.from_numpy(raw.target)[rows])
        torch.testing.assert_close(
            data, torch.from_numpy(raw.images / 16).reshape(-1, 64)[rows].to(data)
        )
    mnist = MNISTDataModule(root=str(mnist_root))
    mnist.setup()
    train_labels, test_labels = mnist.load_labels()
    assert len(test_labels) == 10_000 and torch.equal(mnist.labels("test"), test_labels)
    assert torch.equal(mnist.labels("val"), train_labels[mnist.indices["val"]])


@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_every_picture_of_a_vae_draws_with_every_registered_likelihood(likelihood: str) -> None:
    """Colour images, and families whose mean torch does not define (a categorical over pixel
    levels): each kind still draws a finite picture."""
    torch.manual_seed(0)
    model = VAE(input_shape=(3, 4, 4), latent_dim=3, likelihood=likelihood).eval()
    x = torch.rand(64, 3, 4, 4)
    if LIKELIHOODS.get(likelihood).discrete:
        x = (x * 255).round() / 255  # on the 8-bit grid
    shown = Examples(x, torch.arange(64) % 10, (3, 4, 4), (0.0, 1.0))
    for kind in VAE_KINDS:
        with torch.no_grad():
            picture = kind().draw(model, shown)
        assert picture.shape[0] == 3 and torch.isfinite(picture).all(), kind.name
