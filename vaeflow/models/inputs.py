"""What the models' Python methods accept: the checks the CLI's data modules make, for a user
who calls ``log_likelihood(x)`` on a tensor of their own."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vaeflow.errors import DataError


def as_examples(x: Tensor | np.ndarray, input_shape: tuple[int, ...], model: str) -> Tensor:
    """``x`` as a tensor of examples ``(N, *input_shape)``: given so (leading sample dimensions
    ``(K, N, ...)`` are kept), or as N examples of the same number of values in another shape
    (rows of D values, images of flat data), reshaped.

    Raises:
        DataError: ``x`` is not numeric, or its examples are not of the model's shape (a single
            example without its batch dimension says so).
    """
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{model}: x must be a tensor or array of numbers ({error})") from error
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{model}: x must hold real numbers, got dtype {x.dtype}")
    shape, dim = tuple(input_shape), math.prod(input_shape)
    k = len(shape)
    if x.dim() > k and tuple(x.shape[-k:]) == shape:
        return x
    if x.dim() >= 2 and math.prod(x.shape[1:]) == dim:
        return x.reshape(len(x), *shape)  # examples flattened to rows, or images of flat data
    single = tuple(x.shape) in (shape, (dim,))
    hint = (
        ": that is one example; add the batch dimension, x[None] (or x.reshape(1, -1))"
        if single
        else ""
    )
    flat = f" (or (N, {dim}) flattened)" if k > 1 else ""
    raise DataError(
        f"{model}: x must hold examples of shape (N, {', '.join(map(str, shape))}){flat}; got a "
        f"tensor of shape {tuple(x.shape)}{hint}"
    )
