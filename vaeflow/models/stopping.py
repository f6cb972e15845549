"""When an EM fit stops: the Aitken estimate of the distance to the limit, and round-off.

EM converges linearly: near a maximum each iteration's gain in log-likelihood is a fraction
lambda of the previous one, so a small gain is not a small distance to the limit when lambda
is close to one. Aitken's delta-squared estimate (Boehning et al., 1994; McNicholas et al.,
2010) puts the limit at l_inf = l_k + g_k lambda / (1 - lambda), g_k = l_k - l_(k-1), and the fit
stops when l_inf - l_k <= ``tol``. One ratio g_k / g_(k-1) is a poor estimate of lambda where
the sequence is not yet linear: SQUAREM's cycles alternate kept and rejected extrapolations,
and near a saddle point EM slows down before it escapes (raw breast-cancer features: gains of
1.7e-6, then 2.5e-7 per cycle for a dozen cycles at 22.658 nats per example, 0.55 below the
maximum; a single small ratio there said "within 1e-6"). So lambda is the largest of the last
``window`` ratios, and each must lie in [0, 1): a plateau (ratios near or above one) has no
estimate and the fit goes on.

Below the round-off of the log-likelihood the gains are noise, and so are their ratios: a fit
also stops when the last ``window`` gains are all within the round-off level, the larger of a
multiple of float64's precision times the size of the terms that the log-likelihood sums
(``scale``) and the largest decrease seen (EM never lowers the likelihood, so a decrease
measures the round-off).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: The round-off level is at least this many float64 epsilons times the scale of the terms
#: that the log-likelihood sums (the decreases seen raise it where the round-off is larger):
#: on raw breast-cancer features (sum_d S_dd / Psi_d ~ 1.9e7, eps times that ~ 4e-9) EM still
#: gains 4e-9 per cycle with no decrease, 1e-4 nats below the maximum; at 16 eps the fit took
#: those real gains for round-off and stopped there.
ROUNDOFF_EPSILONS = 1
#: A decrease counts as round-off up to this multiple of that level: a larger one is no
#: rounding (a fit started outside its model's family, a bug) and must not stop the fit.
MAX_ROUNDOFF = 1000


@dataclass
class StoppingRule:
    """Whether an EM fit has converged, from its log-likelihood at each iteration.

    Args:
        tol: stop when the Aitken estimate of the limit of the log-likelihood is at most this
            many nats per example above the current value.
        window: how many successive gain ratios must agree (all in [0, 1)) for an estimate.
    """

    tol: float
    window: int = 3
    #: The last ``window + 1`` gains.
    gains: list[float] = field(default_factory=list)
    #: The last log-likelihood.
    last: float | None = None
    #: The largest decrease of the log-likelihood seen, a measure of its round-off.
    largest_decrease: float = 0.0
    #: Why the fit stopped: ``""`` while it runs, ``"aitken"`` or ``"round-off"``.
    reason: str = ""
    #: The last estimate of the distance to the limit (inf without an estimate).
    distance: float = math.inf

    def converged(self, log_likelihood: float, scale: float, remaining: float = 0.0) -> bool:
        """Take the next iterate's log-likelihood (nats per example); whether to stop.

        Args:
            scale: size of the terms that the log-likelihood sums, which sets its round-off.
            remaining: another estimate of the distance to the limit, which the Aitken
                estimate must not undercut (:class:`~vaeflow.models.squarem.Cycle`).
        """
        last, self.last = self.last, log_likelihood
        if last is None:
            return False
        gain = log_likelihood - last
        self.largest_decrease = max(self.largest_decrease, -gain)
        self.gains = [*self.gains, gain][-(self.window + 1) :]
        if len(self.gains) <= self.window:
            return False
        floor = ROUNDOFF_EPSILONS * 2.0**-52 * scale
        roundoff = max(floor, min(self.largest_decrease, MAX_ROUNDOFF * floor))
        if all(abs(g) <= roundoff for g in self.gains):
            self.reason = "round-off"
            return True
        self.distance = math.inf
        if all(g > 0 for g in self.gains):
            rate = max(b / a for a, b in zip(self.gains, self.gains[1:], strict=False))
            if rate < 1:
                self.distance = max(gain * rate / (1 - rate), remaining)
                if self.distance <= self.tol:
                    self.reason = "aitken"
                    return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
