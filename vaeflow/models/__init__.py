"""Models: factor analysis / PPCA fitted by EM, Bayesian factor analysis by mean-field
variational inference, mixtures of factor analysers, and variational autoencoders."""

from vaeflow.models.bayesian_fa import BayesianFactorAnalysis
from vaeflow.models.fa import FactorAnalysis
from vaeflow.models.mfa import MixtureOfFactorAnalyzers
from vaeflow.models.vae import VAE

__all__ = ["VAE", "BayesianFactorAnalysis", "FactorAnalysis", "MixtureOfFactorAnalyzers"]
