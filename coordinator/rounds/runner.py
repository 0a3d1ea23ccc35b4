"""One job's round loop, on its own thread: wait for clients, select, announce, collect, close or retry.

A round attempt that ends with fewer than ``min_clients`` accepted updates is recorded as failed and
retried with a fresh selection (attempt + 1), so a flaky device population slows a job down without
corrupting it. Stopping is cooperative: every wait in here polls the stop event.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_sdk.protocol.modelfile import dump_model, flatten, layout_sizes, load_model, unflatten
from edge_sdk.update import clamp_variances

from coordinator.rounds.context import RunnerContext
from coordinator.rounds.jobspec import model_meta
from coordinator.rounds.open_round import OpenRound
from coordinator.rounds.strategy import Strategy, make_strategy, round_seed


log = logging.getLogger(__name__)


class JobRunner:
    """Drives one running job; the engine owns it and routes updates to ``current``."""

    def __init__(self, ctx: RunnerContext, job_id: str, on_done: Callable[[JobRunner], None]) -> None:
        self.ctx = ctx
        self._on_done = on_done
        self.job_id = job_id
        self.stop_event = threading.Event()
        self.interrupted = False  # stopped by coordinator shutdown: the job stays 'running' and resumes
        self.current: OpenRound | None = None
        self.thread = threading.Thread(target=self._main, name=f"job-{job_id}", daemon=True)

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        self.thread.start()

    def stop(self, interrupted: bool = False) -> None:
        self.interrupted = interrupted
        self.stop_event.set()
        rnd = self.current
        if rnd is not None:
            with rnd.cond:
                rnd.cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        return not self.thread.is_alive()

    # ------------------------------------------------------------------------------------------ the loop

    def _main(self) -> None:
        store = self.ctx.store
        try:
            job = self._job()
            cfg = job["config"]
            strategy = make_strategy(cfg.get("strategy"))
            self._baseline_eval(job)
            failures = 0
            while job["current_round"] < cfg["rounds"] and not self.stop_event.is_set():
                if self._run_round(job, job["current_round"] + 1, strategy):
                    failures = 0
                    job = self._job()
                    continue
                if self.stop_event.is_set():
                    break
                failures += 1
                limit = self.ctx.config.max_attempts
                if limit and failures >= limit:
                    msg = f"round {job['current_round'] + 1} failed {failures} attempts in a row"
                    log.error("job %s: %s; giving up", self.job_id, msg)
                    store.update_job(self.job_id, status="failed", error=msg)
                    return
            if self.stop_event.is_set():
                if not self.interrupted:
                    store.update_job(self.job_id, status="stopped")
                log.info("job %s %s at round %d", self.job_id, "interrupted" if self.interrupted else "stopped",
                         job["current_round"])
                return
            self._finish(job)
        except Exception as exc:  # noqa: BLE001 - a job crash must be visible, never kill the coordinator
            log.exception("job %s failed", self.job_id)
            try:
                store.update_job(self.job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001
                log.exception("could not record failure of job %s", self.job_id)
        finally:
            self.current = None
            self._on_done(self)

    def _job(self) -> dict[str, Any]:
        job = self.ctx.store.get_job(self.job_id)
        if job is None:
            raise RuntimeError(f"job {self.job_id} vanished from the store")
        return job

    def _await_clients(self, cfg: dict[str, Any], round_: int) -> list[str] | None:
        """Eligible clients once K are online, or >= min_clients have been for the grace period."""
        k, need = cfg["clients_per_round"], cfg["min_clients"]
        grace = self.ctx.config.selection_grace_s
        since: float | None = None
        last_log = 0.0
        while not self.stop_event.is_set():
            eligible = self.ctx.eligible_clients(self.job_id)
            now = time.monotonic()
            if len(eligible) >= k:
                return eligible
            if len(eligible) >= need:
                since = since if since is not None else now
                if now - since >= grace:
                    return eligible
            else:
                since = None
            if now - last_log >= self.ctx.config.wait_log_s:
                log.info("job %s round %d: waiting for clients (%d online, need %d, want %d)", self.job_id,
                         round_, len(eligible), need, k)
                last_log = now
            self.ctx.presence.wait_change(self.ctx.config.poll_s)
        return None

    def _run_round(self, job: dict[str, Any], round_: int, strategy: Strategy) -> bool:
        """One attempt at ``round_``; True if it produced a new global version."""
        eng, cfg = self.ctx, job["config"]
        clients = self._await_clients(cfg, round_)
        if clients is None:
            return False
        attempt = eng.store.next_attempt(self.job_id, round_)
        rng = random.Random(round_seed(self.job_id, cfg["seed"], round_, attempt))
        selected = sorted(rng.sample(clients, min(cfg["clients_per_round"], len(clients))))
        task_cfg = strategy.configure_round(job, round_, selected, attempt=attempt)
        base_version = job["current_version"]
        arrays, _ = load_model(eng.models.get(base_version))
        vec = flatten(arrays)
        rnd = OpenRound(job_id=self.job_id, round=round_, attempt=attempt, base_version=base_version,
                        codec=task_cfg["codec"], numel=int(vec.size), layout_sizes=layout_sizes(arrays),
                        selected=frozenset(selected), max_update_bytes=cfg["max_update_bytes"],
                        accumulator=strategy.begin(vec), deadline=time.time() + cfg["round_timeout_s"])
        eng.store.open_round(self.job_id, round_, attempt, base_version, task_cfg["codec"], selected)
        self.current = rnd
        model_url = eng.model_url(self.job_id, base_version)
        for cid in selected:
            eng.send_task(cid, {"type": "train", "job_id": self.job_id, "round": round_, "attempt": attempt,
                                "base_version": base_version, "model_url": model_url, "config": task_cfg,
                                "deadline_s": cfg["round_timeout_s"]})
        eng.send_event(self.job_id, {"type": "round_started", "job_id": self.job_id, "round": round_,
                                     "attempt": attempt, "selected": selected, "base_version": base_version})
        log.info("job %s round %d attempt %d: announced to %d client(s)", self.job_id, round_, attempt,
                 len(selected))
        rnd.wait(self.stop_event, eng.config.poll_s)
        rnd.close()
        self.current = None
        return self._close(job, rnd, arrays, strategy)

    def _close(self, job: dict[str, Any], rnd: OpenRound, template: dict[str, Any], strategy: Strategy) -> bool:
        eng, cfg = self.ctx, job["config"]
        now = time.time()
        common = {"participants": sorted(rnd.accepted_clients), "accepted": rnd.accepted,
                  "rejected": rnd.rejected, "uplink_bytes": rnd.uplink_bytes,
                  "compression_ratio": rnd.compression_ratio(), "closed_at": now,
                  "duration_s": now - rnd.started_at, "metrics": _finite(rnd.metrics())}
        key = (self.job_id, rnd.round, rnd.attempt)
        if self.stop_event.is_set():
            eng.store.update_round(*key, status="aborted", reason="job stopped", **common)
            return False
        if rnd.accepted < cfg["min_clients"]:
            reason = f"{rnd.accepted} update(s) accepted, min_clients is {cfg['min_clients']}"
            eng.store.update_round(*key, status="failed", reason=reason, **common)
            eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                         "attempt": rnd.attempt, "status": "failed", "reason": reason})
            log.warning("job %s round %d attempt %d failed: %s; retrying", self.job_id, rnd.round, rnd.attempt,
                        reason)
            return False
        new_vec = rnd.accumulator.finalize()
        if not np.isfinite(new_vec).all():  # e.g. huge-but-finite values overflowing float32 in the mean
            reason = "aggregate is not finite (overflow); the round's updates were discarded"
            eng.store.update_round(*key, status="failed", reason=reason, **common)
            eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                         "attempt": rnd.attempt, "status": "failed", "reason": reason})
            log.error("job %s round %d: %s", self.job_id, rnd.round, reason)
            return False
        meta = model_meta(self.job_id, cfg, rnd.round, base_version=rnd.base_version, strategy=strategy.name)
        arrays = unflatten(new_vec, template)
        if clamp_variances(arrays):  # lossy codecs can push a BatchNorm variance below 0 (NaN outputs)
            log.info("job %s round %d: clamped negative BatchNorm variances", self.job_id, rnd.round)
        data = dump_model(arrays, meta)
        version = eng.models.put(data)
        eng.store.add_model_version(self.job_id, version, rnd.round, len(data))
        evaluation = self._evaluate(data, cfg)
        eng.store.update_round(*key, status="closed", new_version=version, eval=evaluation, **common)
        if common["metrics"]:
            eng.store.add_metrics(self.job_id, rnd.round, _numbers(common["metrics"]), "clients")
        if evaluation and "error" not in evaluation:
            eng.store.add_metrics(self.job_id, rnd.round, _numbers(evaluation), "eval")
        eng.store.update_job(self.job_id, current_round=rnd.round, current_version=version)
        eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                     "attempt": rnd.attempt, "status": "closed", "accepted": rnd.accepted,
                                     "version": version})
        eng.send_event(self.job_id, {"type": "model_updated", "job_id": self.job_id, "round": rnd.round,
                                     "version": version, "model_url": eng.model_url(self.job_id, version),
                                     "eval": evaluation})
        log.info("job %s round %d closed: %d accepted, %d rejected, version %s%s", self.job_id, rnd.round,
                 rnd.accepted, rnd.rejected, version[:12],
                 f", eval accuracy {evaluation['accuracy']:.4f}" if evaluation and "accuracy" in evaluation else "")
        return True

    def _evaluate(self, data: bytes, cfg: dict[str, Any]) -> dict[str, Any] | None:
        if not cfg.get("eval") or self.ctx.evaluator is None:
            return None
        try:
            return _finite(self.ctx.evaluator.evaluate(data, cfg))
        except Exception as exc:  # noqa: BLE001 - evaluation is advisory; a failure must not lose the round
            log.exception("job %s: evaluation failed", self.job_id)
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _baseline_eval(self, job: dict[str, Any]) -> None:
        """Accuracy of version 0, so charts start from the untrained model."""
        if job["current_round"] != 0 or not job["config"].get("eval"):
            return
        if any(m["round"] == 0 and m["source"] == "eval" for m in self.ctx.store.list_metrics(self.job_id)):
            return
        result = self._evaluate(self.ctx.models.get(job["current_version"]), job["config"])
        if result and "error" not in result:
            self.ctx.store.add_metrics(self.job_id, 0, _numbers(result), "eval")

    def _finish(self, job: dict[str, Any]) -> None:
        eng = self.ctx
        eng.store.update_job(self.job_id, status="finished")
        eng.send_event(self.job_id, {"type": "job_finished", "job_id": self.job_id, "round": job["current_round"],
                                     "version": job["current_version"],
                                     "model_url": eng.model_url(self.job_id, job["current_version"])})
        log.info("job %s finished after %d rounds, final version %s", self.job_id, job["current_round"],
                 job["current_version"][:12])
        if eng.exports is not None and eng.config.export_onnx:
            try:
                report = eng.exports.export(job, job["current_version"])
                log.info("job %s: ONNX export at %s", self.job_id, report.get("path"))
            except Exception as exc:  # noqa: BLE001 - export is best effort; the job itself succeeded
                log.warning("job %s: ONNX export failed: %s", self.job_id, exc)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf (and the store refuses them): a diverged loss is recorded as null."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
