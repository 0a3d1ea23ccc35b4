"""The device side of a secure-aggregation round over MQTT: after local training, run the protocol with the
coordinator on the device's own ``secagg`` (send) and ``relay`` (receive) topics.

Nothing but protocol messages leaves the device: the masked update (uniform-looking ring elements), keys,
sealed shares and, at the end, the shares the coordinator is owed. Training metrics and the sample count are
not sent (each would describe this one device); the wire v2 update path is not used at all.
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol import topics
from edge_sdk.protocol.errors import ProtocolError

from .device import SecAggDevice
from .terms import RosterRefused, RoundTerms
from .update import encode_secure, round_indices

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]


class SecAggAborted(RuntimeError):
    """The coordinator ended the round (too few devices, a failed phase) or it went silent."""


class SecAggRefused(SecAggAborted):
    """This device would not take part: the task or the roster does not keep the job's privacy promise."""


class SecureRounds:
    """Owned by one EdgeClient; ``on_relay`` is fed from the MQTT thread, ``run`` runs on the task worker."""

    def __init__(self, client_id: str, device_key: bytes, publish: Publish) -> None:
        self.client_id = client_id
        self._key = device_key
        self._publish = publish
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=64)
        self._taken: set[tuple[str, int, int]] = set()  # rounds this device already ran (a re-sent task)

    def on_relay(self, payload: bytes) -> None:
        try:
            self._inbox.put_nowait(bytes(payload))
        except queue.Full:
            log.warning("secure aggregation: relay inbox full; dropping a message")

    def run(self, task: dict[str, Any], spec: dict, delta: np.ndarray, residuals: ResidualStore | None,
            stats: np.ndarray | None) -> int:
        """Run the protocol for ``task`` with this device's ``delta``; returns the bytes sent. Raises
        SecAggAborted (or ProtocolError for a malformed coordinator message) when the round cannot finish."""
        job_id, rnd, attempt = str(task["job_id"]), int(task["round"]), int(task.get("attempt", 1))
        if (job_id, rnd, attempt) in self._taken:
            raise SecAggAborted("this device already took part in this round attempt (the task was re-sent)")
        self._taken.add((job_id, rnd, attempt))
        sa = (task.get("config") or {}).get("secure_aggregation") or {}
        phase_s = float(sa.get("phase_timeout_s", 30.0))
        roster_s = float(task.get("deadline_s", 60.0)) + phase_s  # the coordinator waits for slow trainers
        try:  # what the roster is checked against: the job's settings and this device's own k
            terms = RoundTerms.from_task(sa, int(round_indices(spec, int(np.asarray(delta).size)).size))
        except ValueError as exc:
            raise self._refuse(job_id, rnd, attempt, str(exc)) from None
        dev = SecAggDevice(self.client_id, job_id, rnd, attempt, terms)
        sent = self._send(dev.advertise())
        roster = self._await(dev, sw.ROSTER, roster_s)
        try:
            shares_msg = dev.share(roster)
        except RosterRefused as exc:  # nothing more is sent: no shares, no masked input
            raise self._refuse(job_id, rnd, attempt, exc.reason) from None
        sent += self._send(shares_msg)
        dev.receive_inbox(self._await(dev, sw.INBOX, 2 * phase_s))
        assert dev.fixed is not None
        dp = bool((task.get("config") or {}).get("dp"))  # DP job: the roster's clip is privacy's bound
        encoded, _ = encode_secure(spec, delta, dev.fixed, residuals, job_id, stats, dp=dp)
        sent += self._send(dev.mask(encoded))
        sent += self._send(dev.reveal(self._await(dev, sw.UNMASK, 2 * phase_s)))
        log.info("job %s round %d attempt %d: secure aggregation done (%d bytes sent, k=%d)", job_id, rnd, attempt,
                 sent, dev.k)
        return sent

    @staticmethod
    def _refuse(job_id: str, rnd: int, attempt: int, reason: str) -> SecAggRefused:
        log.warning("job %s round %d attempt %d: not taking part in secure aggregation: %s", job_id, rnd, attempt,
                    reason)
        return SecAggRefused(reason)

    def _send(self, msg: sw.SecAggMessage) -> int:
        frame = sw.encode(msg, self._key)
        if not self._publish(topics.secagg_topic(self.client_id), frame):
            log.warning("secure aggregation: %s not confirmed by the broker", msg.name)
        return len(frame)

    def _await(self, dev: SecAggDevice, kind: int, timeout_s: float) -> sw.SecAggMessage:
        """The next relay message for this round; messages of other rounds are skipped (late, stale)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SecAggAborted(f"no {sw.KIND_NAMES[kind]} from the coordinator within {timeout_s:.0f} s")
            try:
                raw = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            try:
                msg = sw.decode(raw)
            except ProtocolError as exc:
                log.warning("secure aggregation: ignoring a malformed relay message: %s", exc)
                continue
            if (msg.job_id, msg.round, msg.attempt) != (dev.job_id, dev.round, dev.attempt):
                log.info("secure aggregation: skipping a %s for job %s round %d attempt %d", msg.name, msg.job_id,
                         msg.round, msg.attempt)
                continue
            if msg.kind == sw.ABORT:
                raise SecAggAborted(f"coordinator aborted the round: {msg.fields.get('reason')}")
            return msg
