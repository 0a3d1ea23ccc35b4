"""Latest-wins background writes: the newest state reaches disk without the caller waiting for it.

``ResidualStore`` (write-behind mode) hands each round's residual here instead of writing it before the
device may publish its update. One daemon thread writes a temp file and renames it into place.

Ordering rides on the owner's lock: ``submit`` and ``cancel`` are called with it held; the writer takes it
only to pick work up and to rename a finished temp file into place, and renames only when nothing newer
was submitted or cancelled meanwhile, so a superseded state never lands on disk after a newer decision.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class DeferredWriter:
    """Writes the newest submitted array to its path on a background thread (started on first use)."""

    def __init__(self, lock: threading.Lock, write_tmp: Callable[[np.ndarray], Path],
                 name: str = "fedsight-residual-writer") -> None:
        self._cond = threading.Condition(lock)
        self._write_tmp = write_tmp  # writes a complete temp file and returns its path
        self._name = name
        self._gen = 0
        self._pending: tuple[int, Path, np.ndarray] | None = None
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def submit(self, path: Path, arr: np.ndarray) -> None:
        """Queue ``arr`` (never mutated afterwards by the caller) for ``path``; the owner's lock is held."""
        self._gen += 1
        self._pending = (self._gen, path, arr)
        if self._thread is None or not self._thread.is_alive():
            self._closing = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def cancel(self) -> None:
        """Drop the queued write, and make an in-flight one discard its file; the owner's lock is held."""
        self._gen += 1
        self._pending = None
        self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being written; False when ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then let the thread end."""
        done = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return done

    def _run(self) -> None:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                gen, path, arr = self._pending
                self._pending, self._busy = None, True
                try:
                    self._cond.release()
                    try:
                        tmp: Path | None = self._write_tmp(arr)
                    except Exception as exc:  # noqa: BLE001 - e.g. disk full: memory keeps it, next round retries
                        log.warning("could not persist %s: %s", path.name, exc)
                        tmp = None
                    finally:
                        self._cond.acquire()
                    if tmp is not None:
                        self._land(tmp, path, current=gen == self._gen)
                finally:
                    self._busy = False
                    self._cond.notify_all()

    @staticmethod
    def _land(tmp: Path, path: Path, current: bool) -> None:
        try:
            if current:
                os.replace(tmp, path)
            else:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not move %s into place: %s", path.name, exc)
            tmp.unlink(missing_ok=True)
