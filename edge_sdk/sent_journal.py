"""What this device already sent, kept on disk so a restart never trains and sends a round twice.

Per job the journal holds the last round attempt the device answered and, until the coordinator acks it,
the exact update bytes (the "outbox"). After a crash, a broker restart or a lost ack the device re-publishes
those same bytes instead of training again: the coordinator either accepts them (it never got them) or
rejects them as a duplicate / stale round, so an update is never counted twice and never silently lost.
Files are written then renamed, so a crash leaves either the old or the new entry, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    job_id: str
    round: int
    attempt: int
    message: bytes


def _key(job_id: str) -> str:
    return hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32]


class SentJournal:
    """Thread-safe per-job record of the last update sent, with its bytes until acked."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def _meta_path(self, job_id: str) -> Path:
        return self.directory / f"sent-{_key(job_id)}.json"

    def _outbox_path(self, job_id: str) -> Path:
        return self.directory / f"sent-{_key(job_id)}.upd"

    def _meta(self, job_id: str) -> dict | None:
        try:
            meta = json.loads(self._meta_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("job_id") == job_id else None

    def already_sent(self, job_id: str, round_: int, attempt: int) -> bool:
        """True if this device already answered this round attempt, or a later one (a task re-delivered after
        a restart, or one that waited in a queue, must never produce a second or an out-of-date update)."""
        with self._lock:
            meta = self._meta(job_id)
        if not meta:
            return False
        return (int(meta.get("round", 0)), int(meta.get("attempt", 0))) >= (round_, attempt)

    def record(self, job_id: str, round_: int, attempt: int, message: bytes) -> None:
        """Persist the update bytes before they are published (outbox first, then the meta that points at it)."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write(self._outbox_path(job_id), message)
            meta = {"job_id": job_id, "round": round_, "attempt": attempt, "acked": False}
            self._write(self._meta_path(job_id), json.dumps(meta).encode())

    def acked(self, job_id: str, round_: int) -> None:
        """The coordinator answered (accepted, duplicate or stale): nothing left to re-send for this round."""
        with self._lock:
            meta = self._meta(job_id)
            if not meta or meta.get("round") != round_ or meta.get("acked"):
                return
            meta["acked"] = True
            self._write(self._meta_path(job_id), json.dumps(meta).encode())
            self._outbox_path(job_id).unlink(missing_ok=True)

    def pending(self) -> list[Pending]:
        """Updates sent but never acked (to re-publish after a reconnect or restart)."""
        out: list[Pending] = []
        with self._lock:
            if not self.directory.is_dir():
                return out
            for path in sorted(self.directory.glob("sent-*.json")):
                try:
                    meta = json.loads(path.read_text())
                    if meta.get("acked"):
                        continue
                    data = path.with_suffix(".upd").read_bytes()
                    out.append(Pending(str(meta["job_id"]), int(meta["round"]), int(meta["attempt"]), data))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring unreadable outbox entry %s: %s", path, exc)
        return out

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".sent-", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
