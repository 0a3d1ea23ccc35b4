"""Server-side evaluation off the round's critical path: one scoring thread per job.

Why: a round used to close only after its new version was scored, so every round waited for the whole
held-out set to run through the model (0.1 s for 360 digits on MobileNetV3, seconds for an operator's
224 px folder on a CPU server) while every device sat idle. Now the round commits as soon as the version is
stored, the next round is announced at once, and the version is scored here while devices train.

Versions are scored in order. When scoring falls behind (evaluation slower than a round), a queued version is
replaced by the newer one and recorded as skipped with its reason, so the lag never grows past one round. The
job's last version is always scored: the runner drains this queue before it marks the job finished.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("coordinator.rounds.runner")


@dataclass(frozen=True)
class Scoring:
    """One committed version waiting to be scored."""

    round: int
    attempt: int
    version: str
    data: bytes
    cfg: dict[str, Any]


class BackgroundEvaluation:
    """Scores committed versions on its own thread; ``record`` stores each result (or why there is none)."""

    def __init__(self, job_id: str, evaluate: Callable[[bytes, dict[str, Any]], dict[str, Any] | None],
                 record: Callable[[Scoring, dict[str, Any]], None]) -> None:
        self.job_id = job_id
        self._evaluate = evaluate
        self._record = record
        self._cond = threading.Condition()
        self._next: Scoring | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, item: Scoring) -> None:
        """Queue ``item``; a version still waiting is superseded by it (recorded as skipped)."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"job {self.job_id}: evaluation thread is closed")
            replaced, self._next = self._next, item
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=f"eval-{self.job_id}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if replaced is not None:
            self._safe_record(replaced, {
                "status": "skipped", "reason": f"scoring fell behind; round {item.round}'s newer version was "
                                               "scored instead (evaluation takes longer than a round)"})

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being scored; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._next is None and not self._busy, timeout)

    def close(self, reason: str | None) -> None:
        """Stop taking work; a version still queued is recorded as not run, with ``reason`` (None: not recorded,
        its round stays pending). The version being scored right now (if any) finishes and is recorded."""
        with self._cond:
            self._closed = True
            dropped, self._next = self._next, None
            self._cond.notify_all()
        if dropped is not None and reason is not None:
            self._safe_record(dropped, {"status": "not_run", "reason": reason})

    def _main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None or self._closed)
                if self._next is None:
                    return
                item, self._next, self._busy = self._next, None, True
            try:
                result = self._evaluate(item.data, item.cfg)
                if result is not None:
                    self._safe_record(item, result)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _safe_record(self, item: Scoring, result: dict[str, Any]) -> None:
        try:
            self._record(item, result)
        except Exception:  # noqa: BLE001 - e.g. the store closed at shutdown; scoring is advisory
            log.exception("job %s: could not record the evaluation of round %d", self.job_id, item.round)
