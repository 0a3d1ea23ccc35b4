"""DP-FedAvg with secure aggregation: the noise is added on the devices, in the masking ring, never by the server.

With ``privacy`` and ``secure_aggregation`` together, each device clips its random-k vector to ``privacy.clip``
and adds Skellam noise of variance ``(z_dev S)^2 / t`` in ring units (``edge_sdk/secagg/noise.py``), where
``S = clip * scale + sqrt(k) / 2`` bounds the L2 norm of one encoded update and ``t`` is the fewest survivors
the round accepts. Skellam is closed under addition, so the sum of any ``s >= t`` survivors carries Skellam
noise of variance at least ``(z_dev S)^2``; the coordinator unmasks that sum and adds nothing.

Accounting (Google's dp-accounting, as for central DP; no RDP math is computed here): a round is charged as
one Gaussian mechanism of multiplier ``z`` (``privacy.noise_multiplier``), under zero-out adjacency
(``REPLACE_SPECIAL``: participation is public under secure aggregation, a device's *update* is what is
protected) and at integer RDP orders only. Why that is an upper bound for the Skellam sum: Agarwal, Kairouz &
Liu 2021 (NeurIPS, "The Skellam Mechanism for Differentially Private Federated Learning", Thm. 3.5 / Cor. 3.6)
bound its RDP at integer ``alpha > 1``, with variance ``mu`` and sensitivities ``D2``, ``D1``, by

    alpha D2^2 / (2 mu)  +  min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu)).

The first term is the Gaussian one. With ``mu >= (z_dev S)^2``, ``D2 <= S`` and ``D1 <= D2^2`` (integer
vectors), the surcharge is at most ``(2 alpha + 5) / (4 z_dev^4 S^2) <= alpha / (2 z_dev^2) * 9 / (4 z_dev^2 S^2)``
for ``alpha >= 2``, so the Skellam RDP is at most a Gaussian's of multiplier
``z = z_dev / sqrt(1 + 9 / (4 z_dev^2 S^2))``. The rounds refuse a ring coarser than ``S >=``
``noise.MIN_NOISY_SENSITIVITY`` (2^12; in practice S is 1e5-1e7), so devices add ``z_dev`` a hair above ``z``
(:func:`device_noise_multiplier`: relative 1e-7 / z^2) and the Gaussian charge is a bound, not an estimate.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_sdk.secagg.noise import MIN_NOISY_SENSITIVITY

from coordinator.privacy.mechanism import DPAccumulator, DPMechanism
from coordinator.rounds.strategy import DecodedLike

MECHANISM = "distributed"  # privacy.mechanism of a job whose noise comes from the devices (secure aggregation)
ADJACENCY_NOTE = ("zero-out: under secure aggregation who took part is public (the coordinator sees who "
                  "survived); what is protected is each device's update, as if it had sent zeros")


def device_noise_multiplier(z: float, min_sensitivity: float = MIN_NOISY_SENSITIVITY) -> float:
    """The multiplier devices add so that the Skellam sum is charged at most a Gaussian of multiplier ``z``:
    the positive root of ``z_dev^4 - z^2 z_dev^2 - 9 z^2 / (4 S^2) = 0`` (see the module docstring)."""
    if z <= 0:
        return 0.0
    s2 = float(min_sensitivity) ** 2
    return math.sqrt((z * z + math.sqrt(z ** 4 + 9.0 * z * z / s2)) / 2.0)


def accounted_noise_multiplier(z_dev: float, sensitivity: float = MIN_NOISY_SENSITIVITY) -> float:
    """The inverse: what a Skellam sum of multiplier ``z_dev`` at ring sensitivity ``sensitivity`` is charged."""
    if z_dev <= 0:
        return 0.0
    return z_dev / math.sqrt(1.0 + 9.0 / (4.0 * z_dev * z_dev * float(sensitivity) ** 2))


class DistributedDPMechanism(DPMechanism):
    """Fixed clip bound, the public denominator ``clients_per_round``, no server noise."""

    def accumulator(self, global_vec: np.ndarray, finish: Callable[[np.ndarray, np.ndarray], np.ndarray]
                    ) -> DistributedDPAccumulator:
        return DistributedDPAccumulator(global_vec, finish, self)


class DistributedDPAccumulator(DPAccumulator):
    """Takes only the unmasked sum of a secure round (already clipped and noised on the devices)."""

    def add(self, decoded: DecodedLike, num_samples: int) -> float:
        raise ValueError("this job uses secure aggregation with distributed DP: only the masked sum of a round "
                         "is accepted, never one device's update")

    def noised_delta(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """sum / clients_per_round: the noise is already in the sum; ``release`` is what the round released."""
        if self.count == 0:
            raise ValueError("no update was accumulated in this round")
        m = self.mech
        self.release = {"noise_multiplier": m.noise_multiplier, "update_noise_multiplier": m.update_noise_multiplier,
                        "sampling_probability": 1.0, "clip_bound": self.clip_bound, "mechanism": MECHANISM,
                        "survivors": self.count, "denominator": m.denominator,
                        # at least this much (s >= t survivors carry >= the calibrated variance), in update units
                        "noise_stddev": m.update_noise_multiplier * self.clip_bound / m.denominator,
                        "next_clip_bound": self.clip_bound}
        return self._sum / m.denominator


def is_distributed(privacy: dict[str, Any] | None) -> bool:
    return bool(privacy) and privacy.get("mechanism") == MECHANISM  # type: ignore[union-attr]


def mechanism_for(privacy: dict[str, Any], clients_per_round: int) -> DPMechanism:
    cls = DistributedDPMechanism if is_distributed(privacy) else DPMechanism
    return cls.from_config(privacy, clients_per_round)
