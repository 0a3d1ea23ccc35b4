"""RoundEngine: owns the job threads and is the single entry point for everything devices send.

``submit(topic_client_id, raw)`` is the whole coordinator update path (DESIGN.md): it never raises, every
outcome is stored, logged and acked, and a rejected update never touches the round's aggregate. Outgoing
messages go through a :class:`Publisher` so tests can capture them without a broker.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_sdk.protocol import topics
from edge_sdk.protocol.wire import UpdateHeader, update_mac

from coordinator.rounds import validation
from coordinator.storage.exports import OnnxExports
from coordinator.rounds.publishers import MemoryPublisher, NullPublisher, Publisher  # noqa: F401 - re-exported
from coordinator.rounds.context import EngineConfig, RunnerContext
from coordinator.rounds.jobspec import DEFAULT_MAX_UPDATE_BYTES
from coordinator.rounds.rate_limit import RateLimiter
from coordinator.storage.model_store import ModelStore
from coordinator.mqtt.presence import Presence
from coordinator.rounds.journal import RoundJournal
from coordinator.rounds.open_round import OpenRound
from coordinator.rounds.replay import ReplayGuard
from coordinator.rounds.runner import JobRunner
from coordinator.secagg.flow import file_message
from coordinator.storage.store import Store
from coordinator.rounds.validation import Rejected

log = logging.getLogger(__name__)


class JobStateError(RuntimeError):
    """A start/stop that the job's current status does not allow."""


@dataclass(frozen=True)
class Verdict:
    status: str  # "accepted" | "rejected"
    code: str | None = None
    reason: str | None = None
    job_id: str | None = None
    round: int | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


def ephemeral_device_keys() -> Callable[[str], bytes]:
    """Device keys under a throw-away master key (an engine built without ``Credentials``, e.g. in tests)."""
    master = secrets.token_bytes(32)
    return lambda client_id: hmac.new(master, client_id.encode("utf-8"), hashlib.sha256).digest()


class RoundEngine:
    """``device_key(client_id)`` gives the key a device signs its updates with (``Credentials.device_key``)."""

    def __init__(self, store: Store, models: ModelStore, publisher: Publisher | None = None,
                 config: EngineConfig | None = None, presence: Presence | None = None,
                 evaluator: Any = None, exports: OnnxExports | None = None,
                 device_key: Callable[[str], bytes] | None = None, journal: RoundJournal | None = None) -> None:
        self.store = store
        self.journal = journal
        self.device_key = device_key or ephemeral_device_keys()
        self._replays = ReplayGuard()
        self.models = models
        self.publisher: Publisher = publisher or NullPublisher()
        self.config = config or EngineConfig()
        self.presence = presence or Presence()
        self.evaluator = evaluator
        self.exports = exports
        self._runners: dict[str, JobRunner] = {}
        self._lock = threading.RLock()
        self.rate_limiter = RateLimiter(self.config.update_rate_per_s, self.config.update_burst)
        self.unfiled_junk = {"messages": 0, "bytes": 0}  # junk no open round could be charged with
        self._intake_open = threading.Event()  # cleared while a restart re-opens rounds (hold_updates)
        self._intake_open.set()

    def hold_updates(self) -> None:
        """Make ``submit`` wait (not reject) until :meth:`release_updates`: the server holds updates the broker
        queued for us while we were down until ``resume`` has re-opened their rounds."""
        self._intake_open.clear()

    def release_updates(self) -> None:
        self._intake_open.set()

    # ------------------------------------------------------------------------------------------- jobs

    def start_job(self, job_id: str, restore: bool = False) -> None:
        """Start (or resume) a job's round loop; KeyError if unknown, JobStateError if not startable.

        ``restore``: after a coordinator restart, re-open the interrupted round from the journal instead of
        aborting it (see ``coordinator/rounds/recovery.py``)."""
        with self._lock:
            job = self.store.get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            if job["status"] == "finished":
                raise JobStateError(f"job {job_id} is finished; create a new job to train further")
            if job_id in self._runners:
                raise JobStateError(f"job {job_id} is already running")
            if not restore:
                self.store.abort_open_rounds(job_id, reason="superseded by a restart of the job")
                if self.journal is not None:
                    self.journal.drop_spool(job_id)
            self.store.update_job(job_id, status="running", error=None)
            runner = JobRunner(self._context(), job_id, self._runner_done, restore=restore)
            self._runners[job_id] = runner
            runner.start()
        log.info("job %s started at round %d", job_id, job["current_round"] + 1)

    def stop_job(self, job_id: str, timeout: float = 30.0) -> None:
        with self._lock:
            job = self.store.get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            runner = self._runners.get(job_id)
            if runner is None:
                if job["status"] not in ("running", "paused"):
                    raise JobStateError(f"job {job_id} is not running (status {job['status']})")
                self.store.update_job(job_id, status="stopped")
                return
            runner.stop()
        if not runner.join(timeout):
            log.warning("job %s did not stop within %.0fs", job_id, timeout)

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._runners

    def resume(self) -> list[str]:
        """Restart jobs the store says are running or paused (after a coordinator restart); their interrupted
        rounds are re-aggregated from the journal."""
        resumed = []
        for job in self.store.list_jobs():
            if job["status"] not in ("running", "paused"):
                self.store.abort_open_rounds(job["id"], reason="coordinator restarted")
            elif not self.is_running(job["id"]):
                self.start_job(job["id"], restore=True)
                resumed.append(job["id"])
        return resumed

    def notice(self, job_id: str) -> str | None:
        """Why a running job is not progressing right now (stalled, storage full), or None."""
        with self._lock:
            runner = self._runners.get(job_id)
        return runner.notice if runner else None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job thread; their jobs stay 'running' in the store and resume on the next start."""
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.stop(interrupted=True)
        for r in runners:
            r.join(timeout)

    def _context(self) -> RunnerContext:
        return RunnerContext(store=self.store, models=self.models, config=self.config, presence=self.presence,
                             evaluator=self.evaluator, exports=self.exports, send_task=self.send_task,
                             send_event=self.send_event, eligible_clients=self.eligible_clients,
                             model_path=self.model_path, journal=self.journal, send_relay=self.send_relay)

    def _runner_done(self, runner: JobRunner) -> None:
        with self._lock:
            if self._runners.get(runner.job_id) is runner:
                del self._runners[runner.job_id]

    def current_round(self, job_id: str) -> OpenRound | None:
        with self._lock:
            runner = self._runners.get(job_id)
        return runner.current if runner else None

    def wait_idle(self, job_id: str, timeout: float) -> bool:
        """Block until the job's thread has exited (tests, CLI)."""
        with self._lock:
            runner = self._runners.get(job_id)
        return runner is None or runner.join(timeout)

    # ------------------------------------------------------------------------------------ outbound

    @staticmethod
    def model_path(job_id: str, version: str) -> str:
        """Where devices download a version, relative to the coordinator URL they were configured with."""
        return f"/api/v1/jobs/{job_id}/models/{version}"

    def _publish_json(self, topic: str, obj: dict[str, Any]) -> None:
        try:
            self.publisher.publish(topic, json.dumps(obj, separators=(",", ":")), qos=1, retain=False)
        except Exception:  # noqa: BLE001 - a broker hiccup must not kill a round; MQTT redelivers on reconnect
            log.exception("publish to %s failed", topic)

    def send_task(self, client_id: str, task: dict[str, Any]) -> None:
        self._publish_json(topics.task_topic(client_id), task)

    def send_relay(self, client_id: str, frame: bytes) -> None:
        try:
            self.publisher.publish(topics.relay_topic(client_id), frame, qos=1, retain=False)
        except Exception:  # noqa: BLE001 - as _publish_json: the round's phase timeout covers a lost message
            log.exception("relay to %s failed", client_id)

    def send_event(self, job_id: str, event: dict[str, Any]) -> None:
        self._publish_json(topics.job_events_topic(job_id), event)

    # ------------------------------------------------------------------------------------- presence

    def on_status(self, client_id: str, payload: bytes) -> None:
        status = self.presence.update_from_payload(client_id, payload)
        if status is not None and status.online:
            self._resend_task(client_id)
        if status is not None:
            try:
                self.store.set_client_state(client_id, "online" if status.online else "offline", status.ts)
            except Exception:  # noqa: BLE001
                log.exception("could not record status of %s", client_id)

    def _resend_task(self, client_id: str) -> None:
        """A selected client that (re)appears mid-round gets its task again: it may have been lost with a
        broker restart or a device restart. The device's journal stops it from answering the same attempt twice."""
        with self._lock:
            rounds = [r.current for r in self._runners.values() if r.current is not None]
        for rnd in rounds:
            if (rnd.task and not rnd.closed and client_id in rnd.selected
                    and client_id not in rnd.accepted_clients):
                self.send_task(client_id, rnd.task)

    def eligible_clients(self, job_id: str) -> list[str]:
        """Online (per retained status), registered, and willing to work on ``job_id``."""
        registered = self.store.client_ids()
        return [cid for cid in self.presence.online_for(job_id) if cid in registered]

    # -------------------------------------------------------------------------------------- inbound

    def _key_of(self, client_id: str) -> bytes | None:
        """The device key of a registered, unrevoked client; None otherwise."""
        return self.device_key(client_id) if self.store.get_client(client_id) is not None else None

    def _message_limit(self) -> int:
        """Largest message any running job accepts (per-job limits are re-checked after the header)."""
        with self._lock:
            rounds = [r.current for r in self._runners.values() if r.current is not None]
        limit = max((r.max_update_bytes for r in rounds), default=self.config.max_message_bytes)
        return min(limit, self.config.max_message_bytes)

    def update_size_limit(self) -> int:
        """Largest update the open rounds accept (the default job limit between rounds): what the broker's
        maximum packet size follows, so an oversize publish is cut off at the broker."""
        with self._lock:
            rounds = [r.current for r in self._runners.values() if r.current is not None]
        limit = max((r.max_update_bytes for r in rounds), default=DEFAULT_MAX_UPDATE_BYTES)
        return min(limit, self.config.max_message_bytes)

    def _round_of_client(self, client_id: str) -> OpenRound | None:
        """The open round that selected this client: where to file a message we cannot even parse."""
        with self._lock:
            rounds = [r.current for r in self._runners.values() if r.current is not None]
        return next((r for r in rounds if client_id in r.selected), None)

    def screen(self, topic_client_id: str, nbytes: int) -> Verdict | None:
        """Checks that cost nothing but a lookup, made before a message is queued or parsed: the sender's
        rate and the size limit. A refusal is counted as junk and acked (a rate-limit refusal once per burst,
        so a flood does not buy a flood of acks); None means go ahead."""
        admitted, first, wait_s = self.rate_limiter.allow(topic_client_id)
        if admitted:
            limit = self._message_limit()
            if nbytes <= limit:
                return None
            return self._refuse(topic_client_id, None, nbytes,
                                self._rejected(validation.OVERSIZE, f"{validation.OVERSIZE}: {nbytes} bytes > limit "
                                                                    f"{limit}", None))
        reason = (f"{validation.RATE_LIMITED}: more than {self.rate_limiter.burst} updates in a burst or "
                  f"{self.rate_limiter.rate:g}/s sustained; retry in {wait_s:.1f}s")
        return self._refuse(topic_client_id, None, nbytes, self._rejected(validation.RATE_LIMITED, reason, None),
                            ack=first)

    def submit(self, topic_client_id: str, raw: bytes, screened: bool = False) -> Verdict:
        """Validate, aggregate, record and ack one update message. Never raises.

        ``screened``: :meth:`screen` already admitted this message (the MQTT bridge screens before queueing)."""
        if not self._intake_open.wait(self.config.resume_hold_s):
            log.warning("updates still held after %.0f s; handling them anyway", self.config.resume_hold_s)
        nbytes = len(raw)
        if not screened:
            refused = self.screen(topic_client_id, nbytes)
            if refused is not None:
                return refused
        header: UpdateHeader | None = None
        rnd: OpenRound | None = None
        try:
            header, payload = validation.parse_message(raw, self._message_limit())
            rnd = self._accept_parsed(topic_client_id, header, raw, payload, nbytes)
            verdict = Verdict("accepted", job_id=header.job_id, round=header.round)
        except Rejected as rej:
            verdict = self._rejected(rej.code, rej.reason, header)
        except Exception as exc:  # noqa: BLE001 - the update path must survive any payload
            log.exception("internal error while handling an update from %s", topic_client_id)
            verdict = self._rejected(validation.INTERNAL_ERROR, f"{validation.INTERNAL_ERROR}: {type(exc).__name__}",
                                     header)
        if not verdict.accepted:
            return self._refuse(topic_client_id, header, nbytes, verdict)
        self._record(topic_client_id, verdict, header, rnd, nbytes)
        self._ack(topic_client_id, verdict)
        return verdict

    def submit_secagg(self, topic_client_id: str, raw: bytes) -> str | None:
        """One secure-aggregation message (keys, shares, masked input, reveal); never raises. A rejection is
        stored and acked with its reason, as for updates; None means it was filed."""
        reason, job_id, round_ = file_message(self, topic_client_id, raw)
        if reason is not None:
            self._ack(topic_client_id, Verdict("rejected", "secure_aggregation", reason, job_id, round_))
        return reason

    def _ack(self, client_id: str, verdict: Verdict) -> None:
        ack = {"job": verdict.job_id, "round": verdict.round, "status": verdict.status, "reason": verdict.reason}
        if verdict.code:
            ack["code"] = verdict.code
        self._publish_json(topics.ack_topic(client_id), ack)

    def _refuse(self, client_id: str, header: UpdateHeader | None, nbytes: int, verdict: Verdict,
                ack: bool = True) -> Verdict:
        """File a rejection: junk (unauthenticated) is only counted, an authenticated sender's is stored."""
        junk = verdict.code in validation.UNAUTHENTICATED
        rnd = self._file_rejection(client_id, header, nbytes, junk)
        if junk:
            log.debug("junk on %s's update topic (%d bytes): %s", client_id, nbytes, verdict.reason)
        else:
            log.info("rejected update from %s (%d bytes): %s", client_id, nbytes, verdict.reason)
            self._record(client_id, verdict, header, rnd, nbytes)
        if ack:
            self._ack(client_id, verdict)
        return verdict

    @staticmethod
    def _rejected(code: str, reason: str, header: UpdateHeader | None) -> Verdict:
        return Verdict("rejected", code, reason, header.job_id if header else None, header.round if header else None)

    def _accept_parsed(self, topic_client_id: str, header: UpdateHeader, raw: bytes, payload: bytes,
                       nbytes: int) -> OpenRound:
        validation.check_client(header, raw, topic_client_id, self._key_of)
        tag = update_mac(raw)
        if self._replays.seen(tag):
            raise Rejected(validation.REPLAYED, "this exact message was already accepted once")
        if self.presence.touch(header.client_id):  # an authenticated message is proof of life
            log.info("client %s is alive (update received) although presence said offline", header.client_id)
        with self._lock:
            runner = self._runners.get(header.job_id)
        if runner is None:
            job = self.store.get_job(header.job_id)
            raise Rejected(validation.WRONG_JOB, f"job {header.job_id[:64]!r} " + (
                "does not exist" if job is None else f"is not running (status {job['status']})"))
        rnd = runner.current
        with rnd.cond if rnd is not None else _NO_LOCK:
            validation.check_round(header, nbytes, rnd)
            assert rnd is not None
            decoded = validation.decode_payload(header, payload, rnd)
            self._spool(rnd, header.client_id, raw)
            rnd.add(header.client_id, decoded, header.num_samples, nbytes, header.metrics)
            self._replays.remember(tag)
        return rnd

    def _spool(self, rnd: OpenRound, client_id: str, raw: bytes) -> None:
        """Durable before acked: an update that cannot be written is refused with 'retry later', never
        accepted into memory only (it would be lost by a crash while the device believes it delivered)."""
        if self.journal is None:
            return
        with self._lock:
            runner = self._runners.get(rnd.job_id)
        try:
            self.journal.save_update(rnd.job_id, rnd.round, rnd.attempt, client_id, raw)
        except OSError as exc:
            log.error("cannot store an update of %s for job %s round %d: %s", client_id, rnd.job_id, rnd.round, exc)
            if runner is not None:
                runner.notice = (f"round {rnd.round}: cannot store incoming updates ({type(exc).__name__}: {exc}); "
                                 "devices are told to send them again later")
            raise Rejected(validation.UNAVAILABLE, f"coordinator storage is failing ({exc.strerror or exc}); "
                                                   "the update was not counted, send it again later") from None
        if runner is not None and runner.notice and "cannot store incoming updates" in runner.notice:
            runner.notice = None

    def _file_rejection(self, client_id: str, header: UpdateHeader | None, nbytes: int,
                        junk: bool = False) -> OpenRound | None:
        """Count a rejected message against the round it was meant for (rejected or junk count and bytes)."""
        rnd: OpenRound | None = None
        if header is not None:
            rnd = self.current_round(header.job_id)
            if rnd is not None and rnd.round != header.round:
                rnd = None
        if rnd is None and (header is None or junk):
            rnd = self._round_of_client(client_id)
        if rnd is None:
            if junk:
                with self._lock:
                    self.unfiled_junk["messages"] += 1
                    self.unfiled_junk["bytes"] += nbytes
            return None
        rnd.count_rejected(nbytes, junk)
        return rnd

    def _record(self, client_id: str, verdict: Verdict, header: UpdateHeader | None, rnd: OpenRound | None,
                nbytes: int) -> None:
        try:
            self.store.add_update(
                client_id=client_id, status=verdict.status, reason=verdict.reason, bytes_=nbytes,
                job_id=verdict.job_id or (rnd.job_id if rnd else None),
                round_=verdict.round if verdict.round is not None else (rnd.round if rnd else None),
                attempt=rnd.attempt if rnd else None, num_samples=header.num_samples if header else None,
                base_version=header.base_version[:64] if header else None,
                metrics=header.metrics if header and verdict.accepted else None)
        except Exception:  # noqa: BLE001 - bookkeeping failure must not undo an accepted update
            log.exception("could not store the update record from %s", client_id)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
