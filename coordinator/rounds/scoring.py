"""How a round's new version is scored: server-side evaluation, devices' federated held-out scores, version 0.

Why its own module: scoring is advisory (a failed evaluation never loses a round) and has its own failure
reporting, so it stays out of the runner's round lifecycle.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from coordinator.rounds.context import RunnerContext
from coordinator.rounds.jobspec import holdout_fraction
from coordinator.rounds.open_round import OpenRound

log = logging.getLogger("coordinator.rounds.runner")


class RoundScoring:
    """Scores one job's versions and records the results in the store."""

    def __init__(self, ctx: RunnerContext, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id

    def evaluate(self, data: bytes, cfg: dict[str, Any]) -> dict[str, Any] | None:
        if not (cfg.get("eval") or {}).get("dataset") or self.ctx.evaluator is None:
            return None
        try:
            return finite(self.ctx.evaluator.evaluate(data, cfg))
        except Exception as exc:  # noqa: BLE001 - evaluation is advisory; a failure must not lose the round
            log.warning("job %s: evaluation failed: %s", self.job_id, exc, exc_info=not isinstance(exc, ValueError))
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            return {"error": reason}

    def record_federated(self, rnd: OpenRound, cfg: dict[str, Any]) -> None:
        """Devices scored this round's base version: store it on the round that produced that version."""
        fraction = holdout_fraction(cfg)
        if fraction <= 0:
            return
        store, score = self.ctx.store, rnd.federated_eval()
        if score is None:
            result: dict[str, Any] = {
                "status": "failed", "version": rnd.base_version, "scored_in_round": rnd.round,
                "reason": f"none of the {rnd.accepted} device(s) reported a held-out score (each needs samples "
                          f"in its {fraction:.0%} held-out share)"}
        else:
            result = {"status": "ok", **score, "version": rnd.base_version, "scored_in_round": rnd.round}
            made = store.get_model_version(self.job_id, rnd.base_version)
            store.add_metrics(self.job_id, made["round"] if made else rnd.round - 1, numbers(score), "federated")
        producers = [r for r in store.get_rounds(self.job_id)
                     if r["new_version"] == rnd.base_version and r["status"] == "closed"]
        if producers:
            store.update_round(self.job_id, producers[-1]["round"], producers[-1]["attempt"], federated_eval=result)
        if score is not None:
            log.info("job %s: devices scored version %s at accuracy %.4f (%d held-out samples)", self.job_id,
                     rnd.base_version[:12], score["accuracy"], score["num_samples"])

    def baseline(self, job: dict[str, Any]) -> None:
        """Accuracy of version 0, so charts start from the untrained model."""
        if job["current_round"] != 0 or not (job["config"].get("eval") or {}).get("dataset"):
            return
        if any(m["round"] == 0 and m["source"] == "eval" for m in self.ctx.store.list_metrics(self.job_id)):
            return
        result = self.evaluate(self.ctx.models.get(job["current_version"]), job["config"])
        if result and "error" not in result:
            self.ctx.store.add_metrics(self.job_id, 0, numbers(result), "eval")
        elif result:  # the set does not fit the model: every round would fail the same way, say so now
            self.ctx.store.update_job(self.job_id, error=f"evaluation of version 0 failed: {result['error']}")


def finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf (and the store refuses them): a diverged loss is recorded as null."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


def numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
