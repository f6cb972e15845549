"""vaeflow: factor analysis, PPCA and variational autoencoders with PyTorch Lightning."""

from vaeflow import likelihoods, nets, posteriors, priors
from vaeflow.registry import (
    LIKELIHOODS,
    NETS,
    POSTERIORS,
    PRIORS,
    register_likelihood,
    register_net,
    register_posterior,
    register_prior,
)

__version__ = "0.1.0"
__all__ = [
    "LIKELIHOODS",
    "NETS",
    "POSTERIORS",
    "PRIORS",
    "likelihoods",
    "nets",
    "posteriors",
    "priors",
    "register_likelihood",
    "register_net",
    "register_posterior",
    "register_prior",
]
