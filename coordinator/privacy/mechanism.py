"""DP-FedAvg aggregation (McMahan et al. 2018, adaptive clipping per Andrew et al. 2021).

Per round: every accepted update is clipped to L2 norm ``C`` by the server (devices clip what they send too,
but the server never trusts that), folded in with weight 1 (``num_samples`` is not used), and the sum gets
Gaussian noise ``N(0, (z_update C)^2 I)``. The noised sum is divided by ``clients_per_round``, a public
constant fixed when the job was created, not by the number of updates that arrived: that count depends on
who took part, so dividing by it would not be post-processing of the noised sum.

Adaptive clipping: with ``b_i = 1`` if update ``i`` had norm ``<= C``, the released count is
``sum(b_i - 1/2) + N(0, count_stddev^2)`` (sensitivity 1/2), its fraction steers ``C`` geometrically. The two
Gaussian releases together are one Gaussian mechanism of multiplier ``z`` with
``z^-2 = z_update^-2 + (2 count_stddev)^-2`` (Andrew et al., Thm. 1): the accountant charges ``z``.

Noise comes from a generator seeded by the OS (``secrets``), fresh per round: reproducible noise would be
removable noise. Floating-point Gaussian sampling is not hardened against the precision attacks of
Mironov 2012; docs/privacy.md says so.
"""
from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from coordinator.rounds.clipping import AdaptiveBound, ClipBound, clip_update
from coordinator.rounds.strategy import Accumulator, DecodedLike


def noise_rng() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


@dataclass
class DPMechanism:
    """A job's DP parameters plus its clip bound (state that moves between rounds with adaptive clipping)."""

    noise_multiplier: float  # what the accountant charges per round
    update_noise_multiplier: float  # the part added to the update sum
    denominator: int  # clients_per_round
    bound: ClipBound
    count_stddev: float = 0.0
    rng_factory: Callable[[], np.random.Generator] = field(default=noise_rng)

    @classmethod
    def from_config(cls, privacy: dict[str, Any], clients_per_round: int) -> DPMechanism:
        clip = privacy["clip"]
        bound: ClipBound
        if clip["mode"] == "adaptive":
            bound = AdaptiveBound(float(clip["bound"]), quantile=float(clip["quantile"]), lr=float(clip["lr"]),
                                  step="round")
        else:
            bound = ClipBound(float(clip["bound"]))
        return cls(float(privacy["noise_multiplier"]), float(privacy["update_noise_multiplier"]),
                   int(clients_per_round), bound, float(clip.get("count_stddev") or 0.0))

    @property
    def adaptive(self) -> bool:
        return isinstance(self.bound, AdaptiveBound)

    def task_config(self) -> dict[str, Any]:
        """What devices are told: clip what you send to this bound; send no metrics, no sample count."""
        return {"clip_bound": self.bound.bound}

    def accumulator(self, global_vec: np.ndarray, finish: Callable[[np.ndarray, np.ndarray], np.ndarray]
                    ) -> DPAccumulator:
        return DPAccumulator(global_vec, finish, self)


class DPAccumulator(Accumulator):
    """Clipped, unweighted running sum; ``finalize`` adds the noise and records what was released."""

    keeps_client_metrics: ClassVar[bool] = False  # client-reported metrics are not released under DP

    def __init__(self, global_vec: np.ndarray, finish: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
                 mech: DPMechanism) -> None:
        super().__init__(global_vec, finish)
        self.mech = mech
        self.clip_bound = float(mech.bound.bound)  # fixed for the round, even if the bound object moves
        self.unclipped = 0
        self.release: dict[str, Any] | None = None

    def add(self, decoded: DecodedLike, num_samples: int) -> float:
        """Fold one update in with weight 1 after clipping it to the round's bound (``num_samples`` ignored)."""
        self._check(decoded)
        clipped, norm = clip_update(decoded, self.clip_bound)
        self._fold(clipped, 1.0)
        self.unclipped += int(norm <= self.clip_bound)
        self.total_weight += 1.0
        self.count += 1
        return 1.0

    def noised_delta(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """(sum of clipped updates + Gaussian noise) / clients_per_round; ``release`` says what was released."""
        if self.count == 0:
            raise ValueError("no update was accumulated in this round")
        rng = rng or self.mech.rng_factory()
        m = self.mech
        stddev = m.update_noise_multiplier * self.clip_bound
        delta = (self._sum + rng.normal(0.0, stddev, size=self.numel)) / m.denominator
        release = {"noise_multiplier": m.noise_multiplier, "update_noise_multiplier": m.update_noise_multiplier,
                   "sampling_probability": 1.0, "clip_bound": self.clip_bound,
                   "noise_stddev": stddev / m.denominator, "denominator": m.denominator}
        if m.adaptive:
            noised_count = self.unclipped - self.count / 2.0 + float(rng.normal(0.0, m.count_stddev))
            fraction = noised_count / m.denominator + 0.5
            release["noised_unclipped_fraction"] = fraction
            # computed on a copy: the bound moves only once the round is committed (JobPrivacy.charge), so a
            # discarded round's noised count never reaches a task
            release["next_clip_bound"] = copy.copy(m.bound).update(fraction)
        else:
            release["next_clip_bound"] = self.clip_bound
        self.release = release
        return delta

    def finalize(self) -> np.ndarray:
        delta = self.noised_delta()
        if self._finish is not None:
            return self._finish(self.global_vec, delta)
        return (self.global_vec.astype(np.float64) + delta).astype(np.float32)
