"""Factor analysis that practitioners can analyse with: rotations, what a fit reports, factor
scores, goodness of fit and how many factors. Pure float64 functions of loadings, noise
variances and covariance matrices, so the FactorAnalysis model, the CLI and a scikit-learn
estimator can share them."""

from vaeflow.analysis.fit import fit_covariance
from vaeflow.analysis.moments import Moments, check_covariance
from vaeflow.analysis.rotation import (
    ROTATIONS,
    GradientProjection,
    Rotation,
    RotationMethod,
    explained_variance,
    register_rotation,
    rotate,
)
from vaeflow.analysis.scores import SCORE_METHODS, factor_score_weights, factor_scores
from vaeflow.analysis.selection import (
    BICSelection,
    ParallelAnalysis,
    correlation,
    max_latent_dim,
    parallel_analysis,
    select_by_bic,
)
from vaeflow.analysis.statistics import (
    KMO,
    ChiSquareTest,
    FitStatistics,
    SphericityTest,
    bartlett_sphericity,
    chi_square_test,
    fit_statistics,
    kmo,
)
from vaeflow.analysis.summary import LoadingSummary, model_std, standardize, summarize

__all__ = [
    "KMO",
    "ROTATIONS",
    "SCORE_METHODS",
    "BICSelection",
    "ChiSquareTest",
    "FitStatistics",
    "GradientProjection",
    "LoadingSummary",
    "Moments",
    "ParallelAnalysis",
    "Rotation",
    "RotationMethod",
    "SphericityTest",
    "bartlett_sphericity",
    "check_covariance",
    "chi_square_test",
    "correlation",
    "explained_variance",
    "factor_score_weights",
    "factor_scores",
    "fit_covariance",
    "fit_statistics",
    "kmo",
    "max_latent_dim",
    "model_std",
    "parallel_analysis",
    "register_rotation",
    "rotate",
    "select_by_bic",
    "standardize",
    "summarize",
]
