"""SQUAREM (Varadhan & Roland, 2008): an EM fit's steps extrapolated, with the monotonicity
safeguard, for any EM whose E-step and M-step are functions of its parameters.

Every EM of vaeflow that iterates on data or statistics it holds (factor analysis on the
covariance, FIML on the rows kept in memory) takes its cycles through :func:`squarem_step`,
which only sees parameters (a tuple of tensors), an E-step state and the log-likelihood in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

Parameters = tuple[Tensor, ...]
State = TypeVar("State")


@dataclass(frozen=True)
class EMMap(Generic[State]):
    """One EM model's steps, as :func:`squarem_step` takes them.

    Attributes:
        e_step: the E-step at some parameters (a state that holds their log-likelihood).
        m_step: the parameters that maximise the expected complete-data log-likelihood of a
            state.
        log_likelihood: the exact log-likelihood of a state's parameters (a 0-d tensor).
        chart: the parameters as the coordinates the extrapolation is linear in (a variance
            as its log, so that it stays positive; each value in units of its feature's scale,
            so that the cycle is equivariant to rescaling a feature, as the model is).
        point: the parameters at coordinates, projected into the parameter space (a variance
            at least its floor).
    """

    e_step: Callable[[Parameters], State]
    m_step: Callable[[State], Parameters]
    log_likelihood: Callable[[State], Tensor]
    chart: Callable[[Parameters], Sequence[Tensor]]
    point: Callable[[Sequence[Tensor]], Parameters]


def _squared_norm(tensors: Sequence[Tensor]) -> float:
    return sum((t**2).sum() for t in tensors).item()


class Cycle(NamedTuple, Generic[State]):
    """Where a SQUAREM cycle ended.

    Attributes:
        parameters: the new parameters.
        state: their E-step.
        remaining: what plain EM's own rate says is left to gain from here (nats per example).
            The step length a is 1 / (1 - lambda) for a map that shrinks the error by lambda,
            and the log-likelihood's gap is quadratic in the error, so EM from the cycle's
            start would still gain (l(F(t)) - l(t)) / (1 - lambda^2) in all; minus what the
            cycle gained. The gains of successive cycles can shrink fast while EM itself
            crawls (kept and rejected extrapolations alternating): their Aitken estimate alone
            stopped a FIML fit 2e-5 nats short at ``tol`` 1e-6.
    """

    parameters: Parameters
    state: State
    remaining: float


def squarem_step(em: EMMap[State], parameters: Parameters, state: State) -> Cycle[State]:
    """One SQUAREM cycle from ``parameters`` t, whose E-step is ``state`` (step length S3).

    Two EM steps give r = F(t) - t and v = F(F(t)) - 2 F(t) + t in the chart's coordinates; the
    extrapolated point t + 2 a r + a^2 v, a = |r| / |v|, is followed by one stabilising EM step
    and kept only if its log-likelihood is at least that of F(t), else the two EM steps are
    taken. Either way the log-likelihood never decreases, and a kept extrapolation costs three
    E-steps: F(F(t)) is never evaluated.
    """
    first = em.m_step(state)
    state1 = em.e_step(first)
    second = em.m_step(state1)
    t, t1, t2 = em.chart(parameters), em.chart(first), em.chart(second)
    r = [b - a for a, b in zip(t, t1, strict=True)]
    v = [c - b - d for b, c, d in zip(t1, t2, r, strict=True)]
    a = math.sqrt(_squared_norm(r) / max(_squared_norm(v), 1e-300))
    start, em_gain = em.log_likelihood(state), em.log_likelihood(state1) - em.log_likelihood(state)

    def ended(parameters: Parameters, state: State) -> Cycle[State]:
        gained = em.log_likelihood(state) - start
        # 1 / (1 - lambda^2) with lambda = 1 - 1/a, written so that a large a cannot divide by 0
        remaining = (em_gain * (a / (2 - 1 / a)) - gained).item() if 1 < a < math.inf else 0.0
        return Cycle(parameters, state, max(remaining, 0.0))

    if 1 < a < math.inf:  # a = 1 is the point of the two EM steps
        jump = em.point([x + 2 * a * dr + a**2 * dv for x, dr, dv in zip(t, r, v, strict=True)])
        if all(torch.isfinite(p).all() for p in jump):  # not an overflow
            stabilised = em.m_step(em.e_step(jump))
            state4 = em.e_step(stabilised)
            if em.log_likelihood(state4) >= em.log_likelihood(state1):  # False for NaN
                return ended(stabilised, state4)
    return ended(second, em.e_step(second))
