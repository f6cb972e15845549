"""Models: factor analysis / PPCA fitted by EM, and variational autoencoders."""

from vaeflow.models.fa import FactorAnalysis
from vaeflow.models.vae import VAE

__all__ = ["VAE", "FactorAnalysis"]
