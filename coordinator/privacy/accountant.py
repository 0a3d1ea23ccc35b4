"""Privacy accounting for DP-FedAvg rounds, on Google's ``dp-accounting`` (RDP); no hand-written RDP math.

One DP-FedAvg round releases ``sum of clipped updates + N(0, (z C)^2 I)`` (plus, with adaptive clipping, a
noised count folded into ``z``; see ``mechanism.py``). With one device added or removed the sum moves by at
most ``C`` in L2, so a round is a Gaussian mechanism with noise multiplier ``z``. Rounds compose.

Sampling amplification (``sampling_probability < 1``) is a ``PoissonSampledDpEvent``: it may be claimed only
when each round's participants really are a Poisson sample of a known population. The coordinator picks from
whichever devices happen to be online, so jobs account with ``q = 1`` (no amplification); simulations that do
sample uniformly may pass ``q``.

``distributed=True`` (noise added on devices under secure aggregation, ``distributed.py``): the same Gaussian
events, at integer RDP orders only (the Skellam bound they stand for holds at integer orders) and under
zero-out adjacency (``REPLACE_SPECIAL``; participation is public under secure aggregation).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

log = logging.getLogger(__name__)

# absl logs a warning per RDP order it cannot evaluate for some (q, z); harmless and noisy
logging.getLogger("absl").setLevel(logging.ERROR)

MAX_NOISE_MULTIPLIER = 1e4
INTEGER_ORDERS = [*range(2, 64), 128, 256, 512, 1024]


def _event(noise_multiplier: float, sampling_probability: float = 1.0) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if sampling_probability >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(float(sampling_probability), gaussian)


def _fresh(distributed: bool = False) -> rdp_privacy_accountant.RdpAccountant:
    if distributed:
        return rdp_privacy_accountant.RdpAccountant(INTEGER_ORDERS, dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    return rdp_privacy_accountant.RdpAccountant()


def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_probability: float = 1.0, *,
            distributed: bool = False) -> float:
    """Epsilon after ``rounds`` Gaussian rounds of multiplier ``noise_multiplier`` (0 rounds: 0)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _fresh(distributed)
    acc.compose(_event(noise_multiplier, sampling_probability), int(rounds))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, rounds: int, sampling_probability: float = 1.0, *,
                    distributed: bool = False) -> float:
    """Smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon`` (dp-accounting's search)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    if epsilon(MAX_NOISE_MULTIPLIER, rounds, delta, sampling_probability, distributed=distributed) > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon:g} at delta {delta:g} over {rounds} round(s) would need a noise "
                         f"multiplier above {MAX_NOISE_MULTIPLIER:g}; allow a larger epsilon or fewer rounds")
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh(distributed),
        lambda z: dp_accounting.SelfComposedDpEvent(_event(z, sampling_probability), int(rounds)),
        float(target_epsilon), float(delta), dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
        tol=1e-4)
    return float(z)


def rounds_within(target_epsilon: float, noise_multiplier: float, delta: float, max_rounds: int,
                  sampling_probability: float = 1.0, *, distributed: bool = False) -> int:
    """How many rounds (at most ``max_rounds``) fit in ``target_epsilon``; epsilon is monotone in rounds."""
    lo, hi = 0, int(max_rounds)
    while lo < hi:  # largest n with epsilon(n) <= target
        mid = (lo + hi + 1) // 2
        if epsilon(noise_multiplier, mid, delta, sampling_probability, distributed=distributed) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Accountant:
    """The rounds a job has released, each as (noise multiplier, sampling probability), and what they cost.

    State is just that list: the coordinator persists it with each committed round (``privacy`` on the round
    record) and rebuilds the accountant from the store after a restart (:meth:`from_rounds`)."""

    delta: float
    events: list[tuple[float, float]] = field(default_factory=list)
    distributed: bool = False  # noise added on devices (secure aggregation): integer orders, zero-out adjacency

    def _accountant(self, extra: Iterable[tuple[float, float]] = ()) -> rdp_privacy_accountant.RdpAccountant:
        acc = _fresh(self.distributed)
        for z, q in [*self.events, *extra]:
            acc.compose(_event(z, q))
        return acc

    def spent(self) -> float:
        """Epsilon of everything released so far (at this accountant's delta)."""
        return float(self._accountant().get_epsilon(self.delta)) if self.events else 0.0

    def spent_after(self, noise_multiplier: float, sampling_probability: float = 1.0) -> float:
        """Epsilon if one more round with these parameters were released."""
        return float(self._accountant([(noise_multiplier, sampling_probability)]).get_epsilon(self.delta))

    def record(self, noise_multiplier: float, sampling_probability: float = 1.0) -> float:
        """Charge one released round; returns the new total epsilon."""
        self.events.append((float(noise_multiplier), float(sampling_probability)))
        return self.spent()

    @classmethod
    def from_rounds(cls, delta: float, rounds: Iterable[dict], distributed: bool = False) -> Accountant:
        """From stored round records: every closed round that carries a ``privacy`` record was released."""
        acc = cls(delta, distributed=distributed)
        for r in rounds:
            p = r.get("privacy") or {}
            if r.get("status") == "closed" and p.get("noise_multiplier") is not None:
                acc.events.append((float(p["noise_multiplier"]), float(p.get("sampling_probability", 1.0))))
        return acc
