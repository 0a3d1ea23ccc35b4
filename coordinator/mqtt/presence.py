"""Which devices are online, as told by their retained MQTT ``status`` messages.

The broker keeps each device's last status (retained) and publishes its last will ("offline") when the
connection drops, so subscribing to the status wildcard gives the coordinator a live view even after it
restarts. Kept in memory; the store only records last-seen for operators.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientStatus:
    online: bool
    jobs: frozenset[str] | None  # None: willing to join any job
    ts: float
    ready: bool = True  # False: connected but no local samples yet, so not worth selecting


class Presence:
    """Thread-safe map client_id -> last status; waiters are woken when anyone comes online."""

    def __init__(self) -> None:
        self._status: dict[str, ClientStatus] = {}
        self._cond = threading.Condition()

    def update(self, client_id: str, online: bool, jobs: list[str] | None = None, ready: bool = True) -> None:
        with self._cond:
            self._status[client_id] = ClientStatus(online, frozenset(jobs) if jobs is not None else None, time.time(),
                                                   ready)
            self._cond.notify_all()

    def update_from_payload(self, client_id: str, payload: bytes) -> ClientStatus | None:
        """Apply a status message; an empty payload (cleared retained message) means offline.
        Returns the new status, or None if the payload was not understood (it is then ignored)."""
        if not payload:
            self.update(client_id, False)
            return self.get(client_id)
        try:
            msg: Any = json.loads(payload)
            state = msg["state"]
            jobs = msg.get("jobs")
            ready = msg.get("ready", True)
            if state not in ("online", "offline") or not isinstance(ready, bool) or not (
                    jobs is None or (isinstance(jobs, list) and all(isinstance(j, str) for j in jobs))):
                raise ValueError("bad state, ready or jobs")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable status from %s: %s", client_id, exc)
            return None
        self.update(client_id, state == "online", jobs, ready)
        return self.get(client_id)

    def touch(self, client_id: str) -> bool:
        """Proof of life (an authenticated message arrived): mark online, keeping its jobs and readiness.
        Returns True if the client was not known to be online before."""
        with self._cond:
            old = self._status.get(client_id)
            if old is not None and old.online:
                return False
            self._status[client_id] = ClientStatus(True, old.jobs if old else None, time.time(),
                                                   old.ready if old else True)
            self._cond.notify_all()
            return True

    def get(self, client_id: str) -> ClientStatus | None:
        with self._cond:
            return self._status.get(client_id)

    def is_online(self, client_id: str) -> bool:
        status = self.get(client_id)
        return bool(status and status.online)

    def online_for(self, job_id: str) -> list[str]:
        """Online clients willing to work on ``job_id`` (sorted, for reproducible selection)."""
        with self._cond:
            return sorted(cid for cid, s in self._status.items()
                          if s.online and s.ready and (s.jobs is None or job_id in s.jobs))

    def wait_change(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def snapshot(self) -> dict[str, ClientStatus]:
        with self._cond:
            return dict(self._status)
