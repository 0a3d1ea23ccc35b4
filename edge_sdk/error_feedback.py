"""Error feedback for lossy update codecs: what a device did not send this round is added to the next one.

With top-k / rand-k sparsification (and int8 / fp16 rounding) most of an update never leaves the device;
folding that residual into the next update keeps the sum of everything sent equal to the sum of the true
updates (minus the last residual), which is what makes aggressive compression converge.

One residual per device, tied to one job. It is persisted as ``residual-<job key>.npy`` (float32, written
atomically) in the given directory, normally beside the model cache, so an app restart does not lose it.
A store asked about a different job, or about a different ``numel``, discards the old file and starts from
zeros: a residual only makes sense against the model it was computed for.

Write-behind (``write_behind=True``, what ``EdgeClient`` uses): the residual lives in memory and ``update``
only hands it to a background thread that writes the file, so the disk write is off the round's critical
path (the device publishes its update meanwhile). ``flush()`` waits for it (the client flushes on ``stop``).
Crash semantics: ``update`` first deletes the previous round's file, synchronously, so a crash before the
deferred write lands leaves *no* residual and the restarted device starts error feedback from zeros. It
loses the one residual it held (what earlier rounds left unsent), but never resumes a stale one, which
would send again what that round already sent. Without write-behind, ``update`` writes before returning.

Size bound: a residual costs ``4 * numel`` bytes on disk and in memory. When that exceeds ``max_bytes`` the
store *refuses* (logs a warning once per job, keeps nothing, and error feedback is simply off for that job)
rather than trimming: a trimmed residual silently breaks the accounting above, a missing one is explicit.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from .deferred_write import DeferredWriter
from .protocol.codecs import Decoded

log = logging.getLogger(__name__)

_PREFIX = "residual-"


def _job_key(job_id: str) -> str:
    """File-name-safe, fixed-length key for any job id."""
    return hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32]


class ResidualStore:
    """Per-job residual, persisted in ``directory``; thread-safe."""

    def __init__(self, directory: Path | str, max_bytes: int = 64 << 20, write_behind: bool = False) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.write_behind = write_behind
        self._lock = threading.Lock()
        self._job: str | None = None
        self._residual: np.ndarray | None = None
        self._warned: set[str] = set()
        self._writes = DeferredWriter(self._lock, self._write_tmp) if write_behind else None

    def path_for(self, job_id: str) -> Path:
        return self.directory / f"{_PREFIX}{_job_key(job_id)}.npy"

    def _fits(self, job_id: str, numel: int) -> bool:
        if 4 * numel <= self.max_bytes:
            return True
        if job_id not in self._warned:
            self._warned.add(job_id)
            log.warning("residual for job %s needs %d bytes > max_bytes=%d: error feedback disabled for it",
                        job_id, 4 * numel, self.max_bytes)
        return False

    def _drop_files(self, keep: Path | None = None) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(f"{_PREFIX}*.npy"):
            if path != keep:
                path.unlink(missing_ok=True)

    def _read(self, path: Path, numel: int) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            log.warning("discarding unreadable residual %s: %s", path, exc)
            return None
        if arr.dtype != np.float32 or arr.shape != (numel,):
            log.info("discarding residual %s: shape %s/%s does not match numel=%d", path, arr.shape, arr.dtype, numel)
            return None
        if not np.isfinite(arr).all():
            log.warning("discarding non-finite residual %s", path)
            return None
        return arr

    def load(self, job_id: str, numel: int) -> np.ndarray:
        """The residual for ``job_id`` (a copy), or zeros for a new job / size mismatch / unreadable file.

        Residuals of other jobs, and a mismatching one of this job, are deleted.
        """
        with self._lock:
            return self._load(job_id, numel).copy()

    def _load(self, job_id: str, numel: int) -> np.ndarray:
        if self._job == job_id and self._residual is not None and self._residual.size == numel:
            return self._residual
        if self._writes is not None:  # another job (or size) from here on: an older job's write must not land
            self._writes.cancel()
        path = self.path_for(job_id)
        if not self._fits(job_id, numel):
            self._job, self._residual = job_id, None
            self._drop_files()
            return np.zeros(numel, dtype=np.float32)
        arr = self._read(path, numel) if path.is_file() else None
        if arr is not None:
            log.info("resumed error-feedback residual for job %s from %s", job_id, path.name)
        self._drop_files(keep=path if arr is not None else None)
        if arr is None:
            arr = np.zeros(numel, dtype=np.float32)
        self._job, self._residual = job_id, arr
        return arr

    def apply(self, job_id: str, vec: np.ndarray) -> np.ndarray:
        """``vec + residual`` as a new float32 array (the error-corrected update to encode)."""
        vec = np.asarray(vec, dtype=np.float32)
        with self._lock:
            return vec + self._load(job_id, vec.size)

    def update(self, job_id: str, corrected: np.ndarray, sent: Decoded) -> None:
        """Record ``corrected - sent`` as the residual for the next round and persist it (or queue the write)."""
        residual = _unsent(np.asarray(corrected, dtype=np.float32), sent)
        numel = residual.size
        with self._lock:
            if self._writes is not None:
                self._writes.cancel()  # a queued or in-flight write of an older residual must not land
            if not self._fits(job_id, numel):
                self._job, self._residual = job_id, None
                self._drop_files()
                return
            if not np.isfinite(residual).all():
                log.warning("non-finite residual for job %s: resetting error feedback", job_id)
                residual = np.zeros(numel, dtype=np.float32)
            self._job, self._residual = job_id, residual
            path = self.path_for(job_id)
            if self._writes is None:
                self._write(path, residual)
                self._drop_files(keep=path)
                return
            self._drop_files()  # module docstring: no stale residual survives a crash before the write
            self._writes.submit(path, residual)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the newest residual is on disk (write-behind); False if ``timeout`` ran out first."""
        return True if self._writes is None else self._writes.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the background writer (a later ``update`` starts it again)."""
        return True if self._writes is None else self._writes.close(timeout)

    def _write(self, path: Path, arr: np.ndarray) -> None:
        """Write-then-rename so a crash never leaves a half-written residual behind."""
        os.replace(self._write_tmp(arr), path)

    def _write_tmp(self, arr: np.ndarray) -> Path:
        """``arr`` as a complete ``.npy`` beside its final name; the caller renames it into place."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".residual-", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def reset(self) -> None:
        """Forget every residual (memory and disk), e.g. after the device leaves a job."""
        with self._lock:
            if self._writes is not None:
                self._writes.cancel()
            self._job, self._residual = None, None
            self._drop_files()


def _unsent(corrected: np.ndarray, sent: Decoded) -> np.ndarray:
    """``corrected - sent.to_dense(numel)`` (same float32 results) without a dense temporary for sparse codecs."""
    residual = corrected.copy()
    if sent.indices is None:
        if sent.values.size != residual.size:
            raise ValueError(f"dense values have {sent.values.size} elements, numel={residual.size}")
        residual -= sent.values
    else:
        residual[sent.indices] -= sent.values
    return residual
