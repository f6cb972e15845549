"""Models: factor analysis / PPCA fitted by EM, and variational autoencoders."""

import os

import torch

from vaeflow.models.fa import FactorAnalysis
from vaeflow.models.vae import VAE

__all__ = ["VAE", "FactorAnalysis"]

#: Set to 1 by Lightning on import (read by ``torch.cuda.is_available``).
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _plain_cuda_check_without_gpu() -> None:
    """Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether CUDA is
    available cannot initialise CUDA, which would break forked processes. Without a GPU every
    such question then tries to load NVML again, and torch's Adam asks at every step: 0.1-0.3 ms,
    a few percent of a small model's step on the CPU. With no GPU there is nothing to protect,
    so torch's own (cached) check is restored."""
    if os.environ.get(NVML_CHECK) == "1" and torch.cuda.device_count() == 0:
        del os.environ[NVML_CHECK]


_plain_cuda_check_without_gpu()
