"""SQUAREM's cycle (:func:`vaeflow.models.squarem.squarem_step`) on a toy EM whose fixed point
and steps are known in closed form: the extrapolation, and the safeguard that keeps the
log-likelihood from decreasing."""

from __future__ import annotations

import pytest
import torch

from vaeflow.models.squarem import EMMap, Parameters, squarem_step

F64 = torch.float64
TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def toy_em(rate: float, likelihood=None) -> EMMap[Parameters]:
    """A linear EM map t -> target + rate (t - target), whose state is the point itself and
    whose log-likelihood -|t - target|^2 the map raises (``likelihood`` replaces it)."""
    return EMMap(
        e_step=lambda p: p,
        m_step=lambda state: (TARGET + rate * (state[0] - TARGET),),
        log_likelihood=likelihood or (lambda state: -((state[0] - TARGET) ** 2).sum()),
        chart=lambda p: p,
        point=lambda t: tuple(t),
    )


def test_on_a_linear_map_the_extrapolation_lands_on_the_fixed_point() -> None:
    """For a linear map with one rate, r = (rate - 1) e and v = (rate - 1)^2 e (e = t - target),
    so a = 1 / (1 - rate) and t + 2 a r + a^2 v = target: one cycle solves it, where two EM
    steps only shrink the error by rate^2."""
    em = toy_em(0.9)
    start = (torch.tensor([3.0, 3.0, 3.0], dtype=F64),)
    (point,), state, remaining = squarem_step(em, start, em.e_step(start))
    torch.testing.assert_close(point, TARGET, rtol=0, atol=1e-12)
    assert state[0] is point
    assert abs(remaining) < 1e-12  # nothing is left to gain at the fixed point


def test_an_extrapolation_that_lowers_the_likelihood_is_replaced_by_two_em_steps() -> None:
    """The safeguard: where the stabilised extrapolated point's log-likelihood is below that
    of one EM step (here a likelihood that punishes the fixed point), the cycle takes the two
    plain EM steps F(F(t)) instead."""
    start = (torch.tensor([3.0, 3.0, 3.0], dtype=F64),)

    def punishing(state: Parameters) -> torch.Tensor:
        error = ((state[0] - TARGET) ** 2).sum()
        return torch.where(error < 1e-6, -1e9, -error)

    em = toy_em(0.9, punishing)
    (point,), _, remaining = squarem_step(em, start, em.e_step(start))
    twice = TARGET + 0.81 * (start[0] - TARGET)
    torch.testing.assert_close(point, twice, rtol=0, atol=1e-12)
    # EM's rate, read off the step length, says what is left: here exactly the gap at F(F(t))
    assert remaining == pytest.approx(((twice - TARGET) ** 2).sum().item(), rel=1e-9)


def test_a_step_length_of_at_most_one_takes_the_two_em_steps() -> None:
    """a <= 1 (the map expands rather than contracts) gives no extrapolation beyond F(F(t))."""
    em = toy_em(3.0)
    start = (torch.tensor([2.0, 0.0, 1.0], dtype=F64),)
    (point,), _, _ = squarem_step(em, start, em.e_step(start))
    torch.testing.assert_close(point, TARGET + 9.0 * (start[0] - TARGET), rtol=0, atol=1e-12)
