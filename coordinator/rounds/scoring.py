"""How a round's new version is scored: server-side evaluation, devices' federated held-out scores, version 0.

Why its own module: scoring is advisory (a failed evaluation never loses a round) and has its own failure
reporting, so it stays out of the runner's round lifecycle.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any

from coordinator.rounds.background_eval import BackgroundEvaluation, Scoring
from coordinator.rounds.context import RunnerContext
from coordinator.rounds.jobspec import holdout_fraction
from coordinator.rounds.open_round import OpenRound

log = logging.getLogger("coordinator.rounds.runner")


class RoundScoring:
    """Scores one job's versions and records the results in the store."""

    def __init__(self, ctx: RunnerContext, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.background = BackgroundEvaluation(job_id, self.evaluate, self._record)

    def server_side(self, cfg: dict[str, Any]) -> bool:
        """Does this job score its versions on a server-side held-out set?"""
        return bool((cfg.get("eval") or {}).get("dataset")) and self.ctx.evaluator is not None

    def evaluate(self, data: bytes, cfg: dict[str, Any]) -> dict[str, Any] | None:
        if not self.server_side(cfg):
            return None
        try:
            return finite(self.ctx.evaluator.evaluate(data, cfg))
        except Exception as exc:  # noqa: BLE001 - evaluation is advisory; a failure must not lose the round
            log.warning("job %s: evaluation failed: %s", self.job_id, exc, exc_info=not isinstance(exc, ValueError))
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            return {"error": reason}

    def submit(self, round_: int, attempt: int, version: str, data: bytes, cfg: dict[str, Any]) -> None:
        """Score a committed version in the background; its round's ``eval`` says pending until then."""
        self.background.submit(Scoring(round_, attempt, version, data, cfg))

    def resume(self, job: dict[str, Any]) -> None:
        """After a restart: score again the versions whose evaluation was still pending when the coordinator
        stopped (older ones than the newest are superseded, as they would have been while running)."""
        if not self.server_side(job["config"]):
            return
        for r in self.ctx.store.get_rounds(self.job_id):
            if r["status"] == "closed" and (r.get("eval") or {}).get("status") == "pending" and r["new_version"]:
                self.submit(r["round"], r["attempt"], r["new_version"], self.ctx.models.get(r["new_version"]),
                            job["config"])

    def drain(self, stop: threading.Event) -> None:
        """Wait for the queued and running evaluations (the job's last version is always scored)."""
        while not self.background.drain(0.5):
            if stop.is_set():
                return

    def finish(self, job: dict[str, Any], stop: threading.Event) -> None:
        """The job is ending: the final version has no later round for devices to score it in (say so), and
        its server-side score is waited for, so a finished job is a fully scored one."""
        store = self.ctx.store
        hint = "see its server-side eval" if (job["config"].get("eval") or {}).get("dataset") else \
            "give the job eval.dataset imagefolder for a server-side score"
        for r in store.get_rounds(self.job_id):
            if (r.get("federated_eval") or {}).get("status") == "pending":
                store.update_round(self.job_id, r["round"], r["attempt"], federated_eval={
                    "status": "not_run", "reason": f"final version: devices score a version in the round after "
                                                   f"it; {hint}"})
        self.drain(stop)

    def close(self, reason: str | None) -> None:
        """Stop scoring; a queued version is recorded as not run with ``reason`` (None: left pending, so a
        restarted coordinator scores it)."""
        self.background.close(reason)

    def _record(self, item: Scoring, result: dict[str, Any]) -> None:
        store = self.ctx.store
        store.update_round(self.job_id, item.round, item.attempt, eval=result)
        if "error" not in result and "status" not in result:
            store.add_metrics(self.job_id, item.round, numbers(result), "eval")
            log.info("job %s round %d: version %s scored, eval accuracy %.4f", self.job_id, item.round,
                     item.version[:12], result.get("accuracy", math.nan))
        self.ctx.send_event(self.job_id, {"type": "round_evaluated", "job_id": self.job_id, "round": item.round,
                                          "attempt": item.attempt, "version": item.version, "eval": result})

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
