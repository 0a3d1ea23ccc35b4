"""A live on-device model: the job's current global model as an ONNX session, hot-swapped as versions land.

A camera that classifies frames while the federation keeps improving the model needs three things: the
new version must be the one the coordinator exported and checked (sha256 against the export report, parity
passed, metadata naming the version), a failed or corrupted download must leave the running model alone,
and frames being classified during a swap must neither be dropped nor see half of each model. Each version
lives in its own immutable :class:`_Loaded` (session + version); a swap is one reference assignment, and
:meth:`LiveModel.predict` reads that reference once, so every call runs on exactly one version and says which.

Torch-free (onnxruntime, numpy and the standard library's HTTP client), so inference-only devices can use it.
Updates are driven by job events (:meth:`LiveModel.on_model_updated` / :meth:`on_event`, e.g. wired to
``EdgeClient`` callbacks) and/or by polling (:meth:`start`). All URLs come from the configured coordinator
(:mod:`edge_sdk.coordinator_origin`); redirects are refused, so the device token goes nowhere else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .coordinator_origin import CoordinatorOrigin, UnsafeUrlError, check_version
from .inference import META_PREFIX, OnnxClassifier, Prediction
from .protocol.topics import valid_id

log = logging.getLogger(__name__)

MAX_ONNX_BYTES = 1 << 30


class NoModelYet(RuntimeError):
    """predict() was called before any verified version was loaded (see :meth:`LiveModel.wait_ready`)."""


class VerificationError(RuntimeError):
    """A downloaded version failed a check; the running model is kept."""


@dataclass(frozen=True)
class LiveResult:
    """Predictions for every input of one call, all from the one model version named here."""

    version: str
    round: int
    predictions: list[Prediction]


@dataclass(frozen=True)
class _Loaded:
    version: str
    round: int
    classifier: OnnxClassifier
    report: dict[str, Any]


def _tls(ca_file: str | Path | None) -> ssl.SSLContext:
    """Chain and hostname verified, TLS 1.2+, against the pinned CA (as ``edge_sdk.tls``, which needs requests)."""
    if ca_file is not None and not Path(ca_file).expanduser().is_file():
        raise FileNotFoundError(f"CA file not found: {ca_file} (copy the coordinator's tls/ca.pem here)")
    ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl[:200]} refused (the device token "
                                     "only goes to the configured coordinator)", headers, fp)


def verify_report(report: Any, version: str) -> dict[str, Any]:
    """The export report if it describes ``version`` and a passed parity check, else VerificationError."""
    if not isinstance(report, dict) or report.get("version") != version:
        raise VerificationError(f"export report is for {str((report or {}).get('version'))[:16]!r}, "
                                f"not {version[:12]}")
    sha = report.get("onnx_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise VerificationError("export report has no onnx_sha256")
    parity = report.get("parity") or {}
    diff, tol = parity.get("max_abs_diff"), parity.get("tolerance")
    if parity.get("passed") is not True or not isinstance(diff, (int, float)) or not isinstance(tol, (int, float)) \
            or not math.isfinite(diff) or diff > tol:
        raise VerificationError(f"export of {version[:12]} did not pass its parity check: {parity}")
    return report


class LiveModel:
    """``LiveModel("https://coordinator:8080", job_id, ca_file=...).start()``; then ``live.predict(frames)``.

    ``token``: the device's bearer token (sent only to ``coordinator_url``). ``ca_file``: the coordinator's
    ``ca.pem`` an https coordinator is verified against (chain and hostname; None: the system's CAs). ``cache_dir``: keeps the last good
    version (ONNX + report) so a restarted device classifies at once, before the coordinator is reachable.
    ``on_swap(old_version | None, new_version)`` is called after each swap.
    """

    def __init__(self, coordinator_url: str, job_id: str, *, token: str | None = None,
                 cache_dir: str | Path | None = None, poll_s: float = 30.0, timeout: float = 120.0,
                 intra_op_threads: int | None = None, on_swap: Callable[[str | None, str], None] | None = None,
                 ca_file: str | Path | None = None) -> None:
        self.origin = CoordinatorOrigin(coordinator_url)
        if not valid_id(job_id):
            raise ValueError(f"invalid job id {job_id[:80]!r}")
        self.job_id = job_id
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=_tls(ca_file)))
        self._timeout = timeout
        self._threads = intra_op_threads
        self.poll_s = poll_s
        self.on_swap = on_swap
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._current: _Loaded | None = None
        self._update_lock = threading.Lock()   # one download/verify at a time; predict never takes it
        self._wanted: str | None = None        # newest version announced by an event, not yet loaded
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._worker: threading.Thread | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self.failures = 0
        if self.cache_dir is not None:
            self._load_cached()

    # ------------------------------------------------------------------------------------------ inference
    @property
    def version(self) -> str | None:
        current = self._current
        return current.version if current else None

    @property
    def round(self) -> int | None:
        current = self._current
        return current.round if current else None

    @property
    def classifier(self) -> OnnxClassifier | None:
        current = self._current
        return current.classifier if current else None

    def predict(self, images: Any) -> LiveResult:
        """Classify ``images`` (anything :meth:`OnnxClassifier.predict` takes) with one version, named in the result."""
        current = self._current  # the one read: a swap after this line affects the next call only
        if current is None:
            raise NoModelYet(f"no verified model for job {self.job_id} yet (coordinator {self.origin.base_url})")
        return LiveResult(current.version, current.round, current.classifier.predict(images))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a first version is loaded."""
        return self._ready.wait(timeout)

    # ------------------------------------------------------------------------------------------ updates
    def on_model_updated(self, job_id: str, version: str) -> None:
        """``ClientCallbacks.on_model_updated`` signature: schedule ``version`` (non-blocking)."""
        if job_id == self.job_id:
            self.offer(version)

    def on_job_finished(self, job_id: str) -> None:
        """``ClientCallbacks.on_job_finished`` signature: look up the final version now."""
        if job_id == self.job_id:
            self.offer(None)

    def on_event(self, job_id: str, event: dict[str, Any]) -> None:
        """A job event dict from ``fedsight/v1/jobs/<id>/events``: ``model_updated`` / ``job_finished``."""
        if job_id == self.job_id and event.get("type") in ("model_updated", "job_finished"):
            self.offer(event.get("version") if isinstance(event.get("version"), str) else None)

    def offer(self, version: str | None) -> None:
        """Ask the background worker to load ``version`` (None: whatever is current on the coordinator)."""
        self._wanted = version or ""
        self._wake.set()

    def update(self, version: str | None = None) -> bool:
        """Blocking: fetch, verify and swap in ``version`` (default: the coordinator's current one).

        True if a new version is now live; False if it already was, is older than the live one, or failed
        (then the old model keeps running and ``last_error`` says why)."""
        with self._update_lock:
            try:
                return self._update(version)
            except (VerificationError, UnsafeUrlError, urllib.error.URLError, OSError, ValueError) as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("job %s: keeping model %s; update to %s failed: %s", self.job_id,
                          (self.version or "none")[:12], (version or "current")[:12], self.last_error)
                return False

    def _update(self, version: str | None) -> bool:
        if version is not None:
            check_version(version)
            if version == self.version:
                return False
        query = "" if version is None else f"?version={quote(version)}"
        report = self._get_json(f"/api/v1/jobs/{quote(self.job_id)}/onnx/report{query}")
        target = check_version(report.get("version") if isinstance(report, dict) else None)
        verify_report(report, target)
        current = self._current
        if current is not None and (target == current.version or int(report.get("round") or 0) < current.round):
            return False  # already live, or an older version announced late
        data = self._get_bytes(f"/api/v1/jobs/{quote(self.job_id)}/onnx?version={target}")
        loaded = self._verified(data, report, target)
        self._store_cached(data, report)
        self._swap(loaded)
        return True

    def _verified(self, data: bytes, report: dict[str, Any], version: str) -> _Loaded:
        digest = hashlib.sha256(data).hexdigest()
        if digest != report["onnx_sha256"]:
            raise VerificationError(f"ONNX download of {version[:12]} is corrupt: sha256 {digest[:12]}, "
                                    f"report says {report['onnx_sha256'][:12]} ({len(data)} bytes)")
        try:
            classifier = OnnxClassifier(data, intra_op_threads=self._threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VerificationError(f"ONNX model {version[:12]} does not load: {str(exc)[:200]}") from None
        if classifier.metadata.get(META_PREFIX + "version") != version:
            raise VerificationError(f"ONNX metadata names version {classifier.version!r}, expected {version[:12]}")
        return _Loaded(version, int(report.get("round") or 0), classifier, report)

    def _swap(self, loaded: _Loaded) -> None:
        old = self._current
        self._current = loaded  # atomic: in-flight predict() calls keep the object they already read
        self.swaps += 1
        self.last_error = None
        self._ready.set()
        log.info("job %s: live model %s -> %s (round %d)", self.job_id, old.version[:12] if old else "none",
                 loaded.version[:12], loaded.round)
        if self.on_swap is not None:
            self.on_swap(old.version if old else None, loaded.version)

    # ------------------------------------------------------------------------------------------ worker
    def start(self) -> LiveModel:
        """Background worker: loads announced versions at once, and polls every ``poll_s`` (0: events only)."""
        if self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._work, name=f"live-model-{self.job_id}", daemon=True)
            self._worker.start()
            self.offer(None)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(self._timeout)
            self._worker = None

    def _work(self) -> None:
        while not self._stop.is_set():
            woke = self._wake.wait(self.poll_s if self.poll_s > 0 else None)
            if self._stop.is_set():
                return
            self._wake.clear()
            wanted, self._wanted = self._wanted, None
            try:
                self.update((wanted or None) if woke else None)
            except Exception:  # noqa: BLE001 - e.g. an on_swap hook that raised: the worker must keep going
                log.exception("job %s: live model update failed unexpectedly", self.job_id)

    # ------------------------------------------------------------------------------------------ HTTP
    def _get(self, path: str, limit: int) -> bytes:
        url = self.origin.url(path)
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with self._opener.open(request, timeout=self._timeout) as resp:
                data = resp.read(limit + 1)
        except urllib.error.HTTPError as exc:
            body = exc.read(500).decode("utf-8", "replace") if exc.fp else ""
            raise VerificationError(f"GET {path} -> HTTP {exc.code}: {body.strip()[:300]}") from None
        if len(data) > limit:
            raise VerificationError(f"GET {path}: response larger than {limit} bytes")
        return data

    def _get_json(self, path: str) -> Any:
        return json.loads(self._get(path, 1 << 22))

    def _get_bytes(self, path: str) -> bytes:
        return self._get(path, MAX_ONNX_BYTES)

    # ------------------------------------------------------------------------------------------ disk cache
    def _cache_paths(self) -> tuple[Path, Path]:
        assert self.cache_dir is not None
        return self.cache_dir / f"{self.job_id}.onnx", self.cache_dir / f"{self.job_id}.onnx.json"

    def _store_cached(self, data: bytes, report: dict[str, Any]) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        onnx_path, report_path = self._cache_paths()
        for path, payload in ((onnx_path, data), (report_path, json.dumps(report).encode())):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, path)

    def _load_cached(self) -> None:
        onnx_path, report_path = self._cache_paths()
        if not (onnx_path.is_file() and report_path.is_file()):
            return
        try:
            report = json.loads(report_path.read_text())
            version = check_version(report.get("version"))
            self._swap(self._verified(onnx_path.read_bytes(), verify_report(report, version), version))
        except (VerificationError, UnsafeUrlError, OSError, ValueError) as exc:
            log.warning("job %s: ignoring cached model in %s: %s", self.job_id, self.cache_dir, exc)

