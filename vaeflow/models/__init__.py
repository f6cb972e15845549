"""Models: factor analysis / PPCA fitted by EM, and variational autoencoders."""

from vaeflow.models.vae import VAE

__all__ = ["VAE"]
