"""vaeflow: factor analysis, PPCA and variational autoencoders with PyTorch Lightning."""

from vaeflow import likelihoods, nets, priors
from vaeflow.registry import (
    LIKELIHOODS,
    NETS,
    PRIORS,
    register_likelihood,
    register_net,
    register_prior,
)

__version__ = "0.1.0"
__all__ = [
    "LIKELIHOODS",
    "NETS",
    "PRIORS",
    "likelihoods",
    "nets",
    "priors",
    "register_likelihood",
    "register_net",
    "register_prior",
]
