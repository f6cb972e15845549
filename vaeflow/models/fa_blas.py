"""CPU and BLAS tuning of the factor-analysis fitters, kept apart from the mathematics.

Nothing here changes a result beyond float64 round-off: it picks thread counts and which BLAS
(torch's MKL or the OpenBLAS behind NumPy and SciPy) runs the few large products of a fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache

import torch
from scipy.linalg.blas import dsyrk
from threadpoolctl import ThreadpoolController
from torch import Tensor

#: Flops per EM iteration under which EM on the covariance runs on one thread.
SMALL_WORK = 1e8

#: Rows converted to float64 at a time by :func:`add_moments_`: enough for an efficient syrk,
#: few enough (12 MB at D = 784) for the buffer to stay in cache and be reused, so no batch
#: allocates (and page-faults) a float64 copy of itself.
CHUNK_ROWS = 2048


@cache
def _blas() -> ThreadpoolController:
    """Handle on OpenBLAS's thread pools (found once: a scan of the loaded libraries)."""
    return ThreadpoolController()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread meanwhile: its idle OpenMP threads would otherwise spin on the cores
    that OpenBLAS's threads need (measured 2-5x slower on two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def single_thread_if(small: bool) -> Iterator[None]:
    """One torch and one OpenBLAS thread for small matrix work. An EM iteration on MNIST's
    covariance is about a millisecond of small operations; with two threads each waits at a
    barrier for the other, which costs ~10x when other processes share the cores."""
    if not small:
        yield
        return
    with one_torch_thread(), _blas().limit(limits=1, user_api="blas"):
        yield


def add_moments_(total: Tensor, gram: Tensor, x: Tensor, shift: Tensor, buffer: Tensor) -> None:
    """Add sum (x - shift) to ``total`` and (x - shift)^T (x - shift) to ``gram``, in float64.

    Rows go through ``buffer`` (float64, up to :data:`CHUNK_ROWS` x D) a chunk at a time. On
    the CPU only the lower triangle of ``gram`` is filled (read it with
    :func:`symmetric_from_lower`), in place, by OpenBLAS's syrk: half the flops, and about 3x
    faster than torch's MKL matmul on AMD processors. Elsewhere a full matmul.
    """
    cpu = gram.device.type == "cpu"
    with one_torch_thread() if cpu else nullcontext():
        for start in range(0, len(x), len(buffer)):
            rows = x[start : start + len(buffer)]
            xs = buffer[: len(rows)].copy_(rows).sub_(shift)
            total += xs.sum(0)
            if cpu:  # gram^T in Fortran order is gram: syrk's upper triangle is its lower one
                dsyrk(1.0, xs.numpy().T, beta=1.0, c=gram.numpy().T, trans=0, overwrite_c=1)
            else:
                gram.addmm_(xs.T, xs)


def symmetric_from_lower(lower: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle :func:`add_moments_` filled."""
    return lower.tril() + lower.tril(-1).T


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b; on the CPU through OpenBLAS, about 1.5x faster than torch's MKL on AMD processors
    for the D x D x M product of an E-step."""
    if a.device.type == "cpu":
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b
