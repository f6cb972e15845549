"""A Student-t likelihood for vaeflow: heavy tails make the decoder robust to outlying pixels."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, StudentT

from vaeflow.likelihoods import Likelihood


class StudentTLikelihood(Likelihood):
    """Student-t per element: location from the decoder, learned scale, fixed degrees of freedom.

    Args:
        df: degrees of freedom (small: heavy tails; large: close to a Gaussian).
        scale: initial scale, learned as one value shared by all elements.
    """

    def __init__(self, df: float = 4.0, scale: float = 1.0) -> None:
        super().__init__()
        self.df = df
        self.scale = scale
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(scale))))

    def distribution(self, params: Tensor) -> Distribution:
        """``params[..., 0]`` is the location (one parameter per element: ``num_params = 1``)."""
        loc = params[..., 0]
        scale = F.softplus(self.raw_scale).expand_as(loc)
        return StudentT(self.df, loc, scale, validate_args=False)
