"""One job's round loop, on its own thread: wait for clients, select, announce, collect, close or retry.

A round attempt that ends with fewer than ``min_clients`` accepted updates is recorded as failed and
retried with a fresh selection (attempt + 1), so a flaky device population slows a job down without
corrupting it. Stopping is cooperative: every wait in here polls the stop event.

Faults (issue 10): with too few devices for ``stall_timeout_s`` the job says why and pauses or fails
(``on_stall``); a round is committed in one store transaction after its model and strategy state are on
disk, and a commit that cannot be written (disk full) keeps the round in memory and retries; after a
crash ``recovery.restore_open_round`` re-opens the interrupted attempt from the journal.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_sdk.protocol.modelfile import dump_model, flatten, layout_sizes, load_model, unflatten
from edge_sdk.update import clamp_variances, statistics_mask

from coordinator.privacy.budget import JobPrivacy
from coordinator.rounds.context import RunnerContext
from coordinator.rounds.jobspec import holdout_fraction, model_meta
from coordinator.rounds.limits import UpdateLimits
from coordinator.rounds.open_round import OpenRound
from coordinator.rounds.recovery import load_strategy_state, restore_open_round
from coordinator.rounds.scoring import RoundScoring, finite, numbers
from coordinator.rounds.strategy import Strategy, make_strategy, round_seed
from coordinator.secagg.config import task_fields
from coordinator.secagg.flow import run_secure


log = logging.getLogger(__name__)

# Test-only fault injection: while the file this names exists, a round waits between aggregation and commit,
# so a fault suite can SIGKILL the coordinator "during aggregation" deterministically. Unset in production.
_COMMIT_HOLD_ENV = "FEDSIGHT_FAULT_COMMIT_HOLD"


def _job_strategy(cfg: dict[str, Any]) -> Strategy:
    """The job's strategy with its limits (weighting, clipping), for a fresh start and a restart alike."""
    return make_strategy(cfg.get("strategy"), UpdateLimits.from_config(cfg.get("limits")))


class JobFailed(Exception):
    """The job cannot go on (e.g. stalled with ``on_stall: fail``); the message is recorded as its error."""


class JobRunner:
    """Drives one running job; the engine owns it and routes updates to ``current``."""

    def __init__(self, ctx: RunnerContext, job_id: str, on_done: Callable[[JobRunner], None],
                 restore: bool = False) -> None:
        self.ctx = ctx
        self.restore = restore  # re-open an interrupted round from the journal (coordinator restart)
        self.notice: str | None = None  # why the job is not progressing right now (REST, `job status`)
        self.paused = False
        self._strategy: Strategy | None = None
        self._privacy: JobPrivacy | None = None  # DP jobs: mechanism + accountant (rebuilt from the store)
        self._pending: tuple[OpenRound, dict[str, Any]] | None = None
        self._committed: tuple[str, dict[str, Any]] | None = None  # (version, arrays) this runner just stored
        self._on_done = on_done
        self.job_id = job_id
        self.scoring = RoundScoring(ctx, job_id)
        self.stop_event = threading.Event()
        self.interrupted = False  # stopped by coordinator shutdown: the job stays 'running' and resumes
        self.current: OpenRound | None = None
        self.thread = threading.Thread(target=self._main, name=f"job-{job_id}", daemon=True)

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the round thread. With ``restore``, the interrupted round is re-opened first, on the caller's
        thread, so updates that were queued for it while the coordinator was down find it open."""
        if self.restore:
            job = self._job()
            self._strategy = _job_strategy(job["config"])
            load_strategy_state(self.ctx, job, self._strategy)
            self._attach_privacy(job, self._strategy)
            self._pending = restore_open_round(self.ctx, job, self._strategy)
            if self._pending is not None:
                self.current = self._pending[0]
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
            strategy = self._strategy or _job_strategy(cfg)
            if self._strategy is None:
                load_strategy_state(self.ctx, job, strategy)
                self._attach_privacy(job, strategy)
            pending, self._pending = self._pending, None
            self.scoring.baseline(job)
            self.scoring.resume(job)
            failures = 0
            while job["current_round"] < cfg["rounds"] and not self.stop_event.is_set():
                if pending is not None:
                    ok = self._collect(job, *pending, strategy)
                    pending = None
                else:
                    refusal = self._privacy.refusal(job["current_round"] + 1) if self._privacy else None
                    if refusal is not None:
                        self._finish(job, reason=refusal)
                        return
                    try:
                        ok = self._run_round(job, job["current_round"] + 1, strategy)
                    except (OSError, sqlite3.Error) as exc:  # e.g. disk full while opening a round: not a
                        self._storage_trouble(f"cannot open round {job['current_round'] + 1}", exc)  # device fault
                        continue
                if ok:
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
        except JobFailed as exc:
            log.error("job %s failed: %s", self.job_id, exc)
            store.update_job(self.job_id, status="failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job crash must be visible, never kill the coordinator
            log.exception("job %s failed", self.job_id)
            try:
                store.update_job(self.job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001
                log.exception("could not record failure of job %s", self.job_id)
        finally:
            self.current = None
            self.scoring.close(None if self.interrupted else "the job ended before this version was scored")
            self._on_done(self)

    def _attach_privacy(self, job: dict[str, Any], strategy: Strategy) -> None:
        """DP jobs aggregate with noise; the accountant and adaptive bound continue from the stored rounds."""
        self._privacy = JobPrivacy.for_job(job, self.ctx.store.get_rounds(self.job_id))
        strategy.privacy = self._privacy.mechanism if self._privacy else None

    def _job(self) -> dict[str, Any]:
        job = self.ctx.store.get_job(self.job_id)
        if job is None:
            raise RuntimeError(f"job {self.job_id} vanished from the store")
        return job

    def _await_clients(self, cfg: dict[str, Any], round_: int) -> list[str] | None:
        """Eligible clients once K are online, or >= min_clients have been for the grace period."""
        k, need = cfg["clients_per_round"], cfg["min_clients"]
        grace = self.ctx.config.selection_grace_s
        stall_s = float(cfg.get("stall_timeout_s") or self.ctx.config.stall_timeout_s)
        since: float | None = None
        short_since: float | None = None
        last_log = 0.0
        while not self.stop_event.is_set():
            eligible = self.ctx.eligible_clients(self.job_id)
            now = time.monotonic()
            if len(eligible) >= need:
                short_since = None
                self._unstall(len(eligible))
            if len(eligible) >= k:
                return eligible
            if len(eligible) >= need:
                since = since if since is not None else now
                if now - since >= grace:
                    return eligible
            else:
                since = None
                short_since = short_since if short_since is not None else now
                if now - short_since >= stall_s:
                    self._stall(cfg, f"{len(eligible)} of {need} required devices online for "
                                     f"{now - short_since:.0f} s (round {round_})")
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
        rng = random.Random(round_seed(cfg["seed"], round_, attempt))
        selected = sorted(rng.sample(clients, min(cfg["clients_per_round"], len(clients))))
        task_cfg = strategy.configure_round(job, round_, selected, attempt=attempt)
        task_cfg["holdout_fraction"] = holdout_fraction(cfg)  # devices score the base model on this share
        if cfg.get("secure_aggregation"):
            task_cfg["secure_aggregation"] = task_fields(cfg)
        base_version = job["current_version"]
        if self._committed is not None and self._committed[0] == base_version:
            arrays = self._committed[1]  # the version the last round wrote: no re-read, re-hash and re-parse
        else:
            arrays, _ = load_model(eng.models.get(base_version))
        vec = flatten(arrays)
        strategy.observe_layout(stats := statistics_mask(arrays))
        rnd = OpenRound(job_id=self.job_id, round=round_, attempt=attempt, base_version=base_version,
                        codec=task_cfg["codec"], numel=int(vec.size), layout_sizes=layout_sizes(arrays),
                        selected=frozenset(selected), statistics=stats, max_update_bytes=cfg["max_update_bytes"],
                        accumulator=strategy.begin(vec), deadline=time.time() + cfg["round_timeout_s"])
        rnd.task = {"type": "train", "job_id": self.job_id, "round": round_, "attempt": attempt,
                    "base_version": base_version, "model_path": eng.model_path(self.job_id, base_version),
                    "config": task_cfg, "deadline_s": cfg["round_timeout_s"]}
        eng.store.open_round(self.job_id, round_, attempt, base_version, task_cfg["codec"], selected)
        if cfg.get("secure_aggregation"):  # the coordinator only ever sees the sum (coordinator/secagg/flow.py)
            run_secure(self, job, rnd)
            return self._close(job, rnd, arrays, strategy)
        return self._collect(job, rnd, arrays, strategy)

    def _collect(self, job: dict[str, Any], rnd: OpenRound, arrays: dict[str, Any], strategy: Strategy) -> bool:
        """Announce ``rnd`` to its selected clients not yet accepted, wait for updates, close it."""
        eng = self.ctx
        self.current = rnd
        waiting = sorted(rnd.selected - set(rnd.accepted_clients))
        for cid in waiting:
            eng.send_task(cid, rnd.task or {})
        eng.send_event(self.job_id, {"type": "round_started", "job_id": self.job_id, "round": rnd.round,
                                     "attempt": rnd.attempt, "selected": sorted(rnd.selected),
                                     "base_version": rnd.base_version})
        log.info("job %s round %d attempt %d: announced to %d client(s)", self.job_id, rnd.round, rnd.attempt,
                 len(waiting))
        rnd.wait(self.stop_event, eng.config.poll_s)
        rnd.close()
        self.current = None
        return self._close(job, rnd, arrays, strategy)

    def _close(self, job: dict[str, Any], rnd: OpenRound, template: dict[str, Any], strategy: Strategy) -> bool:
        eng, cfg = self.ctx, job["config"]
        now = time.time()
        common = {"participants": sorted(rnd.accepted_clients), "accepted": rnd.accepted,
                  "rejected": rnd.rejected, **rnd.traffic(),
                  "compression_ratio": rnd.compression_ratio(), "closed_at": now,
                  "duration_s": now - rnd.started_at, "metrics": finite(rnd.metrics())}
        key = (self.job_id, rnd.round, rnd.attempt)
        if self.stop_event.is_set():
            if self.interrupted and eng.journal is not None:
                return False  # coordinator shutdown: the attempt stays open and is re-aggregated on restart
            eng.store.update_round(*key, status="aborted", reason="job stopped", **common)
            self._drop_spool(rnd)
            return False
        if rnd.accepted < cfg["min_clients"]:
            reason = rnd.failure or f"{rnd.accepted} update(s) accepted, min_clients is {cfg['min_clients']}"
            try:
                eng.store.update_round(*key, status="failed", reason=reason, **common)
            except sqlite3.Error as exc:  # e.g. disk full: the attempt stays 'open' and is aborted on restart
                log.error("job %s: could not record failed round %d: %s", self.job_id, rnd.round, exc)
            self._drop_spool(rnd)
            eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                         "attempt": rnd.attempt, "status": "failed", "reason": reason})
            log.warning("job %s round %d attempt %d failed: %s; retrying", self.job_id, rnd.round, rnd.attempt,
                        reason)
            return False
        new_vec = rnd.accumulator.finalize()
        if not np.isfinite(new_vec).all():  # e.g. huge-but-finite values overflowing float32 in the mean
            reason = "aggregate is not finite (overflow); the round's updates were discarded"
            eng.store.update_round(*key, status="failed", reason=reason, **common)
            self._drop_spool(rnd)
            eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                         "attempt": rnd.attempt, "status": "failed", "reason": reason})
            log.error("job %s round %d: %s", self.job_id, rnd.round, reason)
            return False
        release = getattr(rnd.accumulator, "release", None)
        if self._privacy is not None and release is not None:
            common["privacy"] = self._privacy.round_record(release)
        meta = model_meta(self.job_id, cfg, rnd.round, base_version=rnd.base_version, strategy=strategy.name)
        arrays = unflatten(new_vec, template)
        if clamp_variances(arrays):  # lossy codecs can push a BatchNorm variance below 0 (NaN outputs)
            log.info("job %s round %d: clamped negative BatchNorm variances", self.job_id, rnd.round)
        data = dump_model(arrays, meta)
        scored_later = self.scoring.server_side(cfg)  # in the background: devices need not wait for it
        evaluation = {"status": "pending", "reason": "scored in the background after the round closed"} \
            if scored_later else None
        pending = {"status": "pending", "reason": f"devices score this version on their held-out data in round "
                                                  f"{rnd.round + 1}"} if holdout_fraction(cfg) > 0 else None
        metrics = []
        if common["metrics"]:
            metrics.append((numbers(common["metrics"]), "clients"))
        done = time.time()  # a round closes when its version is stored, not when intake stops
        common.update(closed_at=done, duration_s=done - rnd.started_at)
        version = self._commit(rnd, data, strategy, {"status": "closed", "eval": evaluation,
                                                     "federated_eval": pending, **common}, metrics)
        if version is None:
            return False
        self._committed = (version, arrays)
        if self._privacy is not None and "privacy" in common:
            self._privacy.charge(common["privacy"])
            log.info("job %s round %d: epsilon %.4f of %g spent", self.job_id, rnd.round,
                     common["privacy"]["epsilon"], self._privacy.target)
        if scored_later:
            self.scoring.submit(rnd.round, rnd.attempt, version, data, cfg)
        self.scoring.record_federated(rnd, cfg)
        eng.send_event(self.job_id, {"type": "round_closed", "job_id": self.job_id, "round": rnd.round,
                                     "attempt": rnd.attempt, "status": "closed", "accepted": rnd.accepted,
                                     "version": version,
                                     "epsilon": (common.get("privacy") or {}).get("epsilon")})
        eng.send_event(self.job_id, {"type": "model_updated", "job_id": self.job_id, "round": rnd.round,
                                     "version": version, "model_path": eng.model_path(self.job_id, version),
                                     "eval": evaluation})
        log.info("job %s round %d closed: %d accepted, %d rejected, version %s", self.job_id, rnd.round,
                 rnd.accepted, rnd.rejected, version[:12])
        return True

    def _commit(self, rnd: OpenRound, data: bytes, strategy: Strategy, fields: dict[str, Any],
                metrics: list[tuple[dict[str, float], str]]) -> str | None:
        """Model file, strategy state, then one store transaction (round closed + job advanced + metrics).

        A write that fails (disk full, read-only disk) is reported and retried: the round's accepted updates
        stay in memory and in the journal, so freeing space lets the job continue with nothing lost.
        Returns the new version, or None if the job was stopped while retrying.
        """
        eng = self.ctx
        hold = os.environ.get(_COMMIT_HOLD_ENV)
        if hold and os.path.exists(hold):
            log.warning("fault injection: holding commit of job %s round %d attempt %d (version %s, %d accepted)",
                        self.job_id, rnd.round, rnd.attempt, hashlib.sha256(data).hexdigest(), rnd.accepted)
            while os.path.exists(hold):
                if self.stop_event.wait(0.1):
                    return None
        while True:
            try:
                version = eng.models.put(data)
                if eng.journal is not None:
                    eng.journal.save_strategy(self.job_id, rnd.round, strategy.state())
                eng.store.commit_round(self.job_id, rnd.round, rnd.attempt, version, len(data), fields, metrics)
                break
            except (OSError, sqlite3.Error) as exc:
                self._storage_trouble(f"round {rnd.round}: cannot store the new model; its {rnd.accepted} accepted "
                                      "update(s) are kept", exc)
                if self.stop_event.is_set():
                    return None
        if self.notice is not None and not self.paused:
            log.info("job %s round %d: storage writable again; round committed", self.job_id, rnd.round)
            self.notice = None
        self._drop_spool(rnd)
        if eng.journal is not None:
            eng.journal.prune_strategy(self.job_id, keep_from=rnd.round - 1)
        return version

    def _storage_trouble(self, what: str, exc: BaseException) -> None:
        """Report a failed write (REST ``notice``, log) and wait before the caller retries it."""
        msg = f"{what}: {type(exc).__name__}: {exc}; retrying every {self.ctx.config.storage_retry_s:.0f} s"
        if self.notice != msg:
            log.error("job %s: %s", self.job_id, msg)
        self.notice = msg
        self.stop_event.wait(self.ctx.config.storage_retry_s)

    def _drop_spool(self, rnd: OpenRound) -> None:
        if self.ctx.journal is not None:
            self.ctx.journal.drop_round(self.job_id, rnd.round, rnd.attempt)

    def _stall(self, cfg: dict[str, Any], reason: str) -> None:
        """No progress possible for stall_timeout_s: say why, then fail or pause as the job config says."""
        if cfg.get("on_stall", "pause") == "fail":
            raise JobFailed(f"no progress: {reason}")
        if self.paused:
            self.notice = f"paused: {reason}"
            return
        self.paused, self.notice = True, f"paused: {reason}"
        log.warning("job %s paused: %s; resumes by itself when devices return", self.job_id, reason)
        try:
            self.ctx.store.update_job(self.job_id, status="paused", error=f"paused: {reason}")
        except sqlite3.Error:
            log.exception("could not record the pause of job %s", self.job_id)
        self.ctx.send_event(self.job_id, {"type": "job_paused", "job_id": self.job_id, "reason": reason})

    def _unstall(self, online: int) -> None:
        if not self.paused:
            return
        self.paused, self.notice = False, None
        log.info("job %s resumed: %d eligible device(s) online again", self.job_id, online)
        try:
            self.ctx.store.update_job(self.job_id, status="running", error=None)
        except sqlite3.Error:
            log.exception("could not record the resumption of job %s", self.job_id)
        self.ctx.send_event(self.job_id, {"type": "job_resumed", "job_id": self.job_id})

    def _finish(self, job: dict[str, Any], reason: str | None = None) -> None:
        """The job is done: all rounds ran, or (``reason``) the next round would exceed its privacy budget."""
        eng = self.ctx
        self.scoring.finish(job, self.stop_event)
        eng.store.update_job(self.job_id, status="finished", reason=reason)
        if reason:
            log.info("job %s finished early: %s", self.job_id, reason)
        eng.send_event(self.job_id, {"type": "job_finished", "job_id": self.job_id, "round": job["current_round"],
                                     "reason": reason,
                                     "version": job["current_version"],
                                     "model_path": eng.model_path(self.job_id, job["current_version"])})
        log.info("job %s finished after %d rounds, final version %s", self.job_id, job["current_round"],
                 job["current_version"][:12])
        if eng.exports is not None and eng.config.export_onnx:
            try:
                report = eng.exports.export(job, job["current_version"])
                log.info("job %s: ONNX export at %s", self.job_id, report.get("path"))
            except Exception as exc:  # noqa: BLE001 - export is best effort; the job itself succeeded
                log.warning("job %s: ONNX export failed: %s", self.job_id, exc)
