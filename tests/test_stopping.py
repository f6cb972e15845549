"""The EM stopping rule (vaeflow.models.stopping) on sequences with a known limit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vaeflow.models.stopping import StoppingRule


def run(rule: StoppingRule, values, scale: float = 1.0) -> int | None:
    """The index at which ``rule`` stops on ``values``, or None."""
    for k, value in enumerate(values):
        if rule.converged(float(value), scale):
            return k
    return None


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99])
def test_a_linear_sequence_stops_within_tol_of_its_limit(rate: float) -> None:
    """l_k = L - c rate^k: Aitken's estimate is exact, so the fit stops at the first iterate
    within tol of L, however slowly the gains shrink."""
    limit, tol = 10.0, 1e-6
    values = limit - 3.0 * rate ** np.arange(5000)
    k = run(StoppingRule(tol), values, scale=0.0)
    assert k is not None
    assert limit - values[k] <= tol * (1 + 1e-6)
    assert limit - values[k - 1] > tol  # not one iterate later than needed


def test_small_constant_gains_are_a_plateau_not_convergence() -> None:
    """Gains of 2.5e-7 per iteration (the breast-cancer plateau) are below tol = 1e-6, but
    their ratio is one: no estimate, no stop."""
    values = 22.658 + 2.5e-7 * np.arange(200)
    rule = StoppingRule(1e-6)
    assert run(rule, values) is None
    assert math.isinf(rule.distance)


def test_a_single_small_ratio_does_not_stop_the_fit() -> None:
    """An erratic stretch (an accelerated cycle whose extrapolation was rejected) has a small
    ratio next to large ones: the largest of the window's ratios is the estimate."""
    gains = [6.9e-5, 7.7e-6, 1.7e-6, 1.7e-6, 7.7e-7, 4.0e-6, 5.9e-7, 2.5e-7, 2.5e-7, 2.5e-7]
    assert run(StoppingRule(1e-6), np.cumsum([0.0, *gains])) is None


def test_gains_at_round_off_stop_the_fit_whatever_tol() -> None:
    """At tol = 1e-12, below the round-off, noise of either sign stops the fit once the
    window's gains are all within the round-off (measured by the decreases seen): terms of
    1e7 (raw breast-cancer features) round at 2e-9, and the noise here is 1e-8."""
    rng = np.random.default_rng(0)
    values = 5.0 + 1e-8 * rng.standard_normal(1000)
    rule = StoppingRule(1e-12)
    k = run(rule, values, scale=1e7)
    assert k is not None and k < 100
    assert rule.reason == "round-off"


def test_a_large_decrease_is_not_taken_for_round_off() -> None:
    """A decrease far above the round-off (a start outside the model's family) must not make
    later real gains look like noise."""
    values = np.cumsum([0.0, -40.0, 10.7, 4.2, 1.0, 0.5, 0.25, 0.12])
    rule = StoppingRule(1e-10)
    assert run(rule, values, scale=1e3) is None


def test_the_state_round_trips() -> None:
    """A resumed fit continues the rule where the checkpoint left it."""
    values = 1.0 - 0.5 ** np.arange(8)
    rule = StoppingRule(1e-12)
    run(rule, values[:5])
    copy = StoppingRule(1e-12)
    copy.load_state_dict(rule.state_dict())
    assert run(copy, values[5:]) == run(rule, values[5:])


def test_another_estimate_of_what_remains_keeps_the_fit_going() -> None:
    """Gains that shrink fast (ratio 0.1) say "converged"; a SQUAREM cycle's estimate of what
    plain EM would still gain (1e-5) overrules them, and the fit stops once it is within tol."""
    values = [-10 + 1 - 0.1**k for k in range(8)]
    quick, careful = StoppingRule(tol=1e-6), StoppingRule(tol=1e-6)
    stopped = [quick.converged(v, 1.0) for v in values]
    assert any(stopped)
    assert not any(
        careful.converged(v, 1.0, remaining=1e-5) for v in values[: stopped.index(True) + 1]
    )
    assert careful.converged(values[-1] + 1e-9, 1.0, remaining=1e-7)
