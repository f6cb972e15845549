"""vaeflow: factor analysis, PPCA and variational autoencoders with PyTorch Lightning."""

from vaeflow import likelihoods, priors
from vaeflow.registry import LIKELIHOODS, PRIORS, register_likelihood, register_prior

__version__ = "0.1.0"
__all__ = [
    "LIKELIHOODS",
    "PRIORS",
    "likelihoods",
    "priors",
    "register_likelihood",
    "register_prior",
]
