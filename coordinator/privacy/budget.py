"""A DP job's budget as the round loop sees it: what was spent, whether the next round fits, and restart.

The coordinator refuses to open a round whose release would take the job past its ``epsilon``: the job
then finishes with that reason and its current version, the last one released within budget, is final.
A failed or aborted attempt released nothing and costs nothing; only committed rounds are charged.

State survives a restart without a file of its own: every committed round's record carries a ``privacy``
object (noise multiplier, sampling probability, clip bound, epsilon after the round) written in the same
store transaction that advances the job, so the accountant is rebuilt from the store by replaying those
records, and the adaptive clip bound continues from the last one.

The same object serves jobs whose noise the devices add under secure aggregation (``distributed.py``): only
the mechanism (no server noise) and the accountant's orders and adjacency differ.
"""
from __future__ import annotations

import logging
from typing import Any

from coordinator.privacy.accountant import Accountant
from coordinator.privacy.distributed import is_distributed, mechanism_for

log = logging.getLogger(__name__)


class JobPrivacy:
    """One DP job's mechanism and accountant."""

    def __init__(self, privacy: dict[str, Any], clients_per_round: int, rounds: list[dict[str, Any]] = ()) -> None:
        self.config = privacy
        self.target = float(privacy["epsilon"])
        self.delta = float(privacy["delta"])
        self.mechanism = mechanism_for(privacy, clients_per_round)  # central noise, or devices' (secure aggregation)
        self.accountant = Accountant.from_rounds(self.delta, rounds, distributed=is_distributed(privacy))
        released = [r for r in rounds if r.get("status") == "closed" and (r.get("privacy") or {}).get(
            "next_clip_bound") is not None]
        if released:  # the adaptive bound continues where the last released round left it
            self.mechanism.bound.bound = float(released[-1]["privacy"]["next_clip_bound"])

    @classmethod
    def for_job(cls, job: dict[str, Any], rounds: list[dict[str, Any]]) -> JobPrivacy | None:
        cfg = job["config"]
        if not cfg.get("privacy"):
            return None
        jp = cls(cfg["privacy"], int(cfg["clients_per_round"]), rounds)
        if jp.accountant.events:
            log.info("job %s: privacy accountant restored: %d round(s) released, epsilon %.4f of %g", job["id"],
                     len(jp.accountant.events), jp.spent(), jp.target)
        return jp

    def spent(self) -> float:
        return self.accountant.spent()

    def refusal(self, next_round: int) -> str | None:
        """Why round ``next_round`` must not start (it would exceed the budget), or None if it fits."""
        after = self.accountant.spent_after(self.mechanism.noise_multiplier)
        if after <= self.target:
            return None
        return (f"privacy budget reached: round {next_round} would raise epsilon from {self.spent():.4f} to "
                f"{after:.4f}, over the job's budget of {self.target:g} (delta {self.delta:g}); the released model "
                f"is the one from round {next_round - 1}")

    def round_record(self, release: dict[str, Any]) -> dict[str, Any]:
        """The ``privacy`` object stored on a round about to be committed (epsilon as if it were charged)."""
        before = self.spent()
        after = self.accountant.spent_after(float(release["noise_multiplier"]),
                                            float(release.get("sampling_probability", 1.0)))
        return {**release, "epsilon": after, "epsilon_round": after - before, "delta": self.delta,
                "target_epsilon": self.target}

    def charge(self, record: dict[str, Any]) -> None:
        """The round was committed: its release counts from now on, and the adaptive bound takes its step."""
        self.accountant.record(float(record["noise_multiplier"]), float(record.get("sampling_probability", 1.0)))
        if record.get("next_clip_bound") is not None:
            self.mechanism.bound.bound = float(record["next_clip_bound"])

    def status(self) -> dict[str, Any]:
        """The job-level summary shown in REST and ``job status``."""
        return summary(self.config, self.spent(), len(self.accountant.events), self.mechanism.bound.bound)


def summary(privacy: dict[str, Any], spent: float, released: int, clip_bound: float | None) -> dict[str, Any]:
    return {"target_epsilon": privacy["epsilon"], "delta": privacy["delta"], "epsilon_spent": spent,
            "rounds_released": released, "rounds_within_budget": privacy.get("rounds_within_budget"),
            "noise_multiplier": privacy["noise_multiplier"], "clip_mode": privacy["clip"]["mode"],
            "clip_bound": clip_bound, "amplification": privacy.get("amplification"),
            "noise_added_by": "devices" if is_distributed(privacy) else "coordinator"}


def summary_from_rounds(privacy: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The same summary read back from stored round records (REST, no runner needed)."""
    released = [r for r in rounds if r.get("status") == "closed" and (r.get("privacy") or {}).get("epsilon")
                is not None]
    spent = float(released[-1]["privacy"]["epsilon"]) if released else 0.0
    bound = released[-1]["privacy"].get("next_clip_bound") if released else privacy["clip"]["bound"]
    return summary(privacy, spent, len(released), bound)
