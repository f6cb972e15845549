"""Callbacks that vaeflow brings along: pictures of what a model learned, the latent codes that
``vaeflow predict`` writes, and the run folder they share with the config and checkpoints."""

from vaeflow.callbacks.pictures import (
    Components,
    FactorShares,
    Interpolations,
    LatentScatter,
    LatentTraversals,
    Loadings,
    LogLikelihoodCurve,
    Picture,
    Pictures,
    Reconstructions,
    Samples,
)
from vaeflow.callbacks.prediction import LATENTS_FILE, LatentCodeWriter, prediction_callbacks
from vaeflow.callbacks.tracking import CONFIG_FILE, log_image, run_dir

__all__ = [
    "CONFIG_FILE",
    "LATENTS_FILE",
    "Components",
    "FactorShares",
    "Interpolations",
    "LatentCodeWriter",
    "LatentScatter",
    "LatentTraversals",
    "Loadings",
    "LogLikelihoodCurve",
    "Picture",
    "Pictures",
    "Reconstructions",
    "Samples",
    "log_image",
    "prediction_callbacks",
    "run_dir",
]
