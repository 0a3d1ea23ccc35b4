"""ONNX exports of global versions, cached on disk next to the model store.

The converter module imports torch and onnx only inside its export functions, so naming files and reading
reports from it costs nothing; a coordinator that never exports never loads them. One lock per version keeps two
simultaneous requests from exporting the same file twice.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from converters.onnx_export import output_paths, read_report

from coordinator.storage.model_store import ModelStore

log = logging.getLogger(__name__)


class ExportFailed(RuntimeError):
    """The export could not be produced; the message is readable by an operator."""


class OnnxExports:
    def __init__(self, root: Path | str, models: ModelStore) -> None:
        self.root = Path(root)
        self.models = models
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def out_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _paths(self, job_id: str, version: str) -> tuple[Path, Path]:
        return output_paths(self.out_dir(job_id), version)

    def find(self, job_id: str, version: str) -> dict[str, Any] | None:
        """The report of an existing export, or None."""
        onnx_path, report_path = self._paths(job_id, version)
        report = read_report(onnx_path, report_path)
        if report is not None:
            report.setdefault("path", str(onnx_path))
        return report

    def export(self, job: dict[str, Any], version: str) -> dict[str, Any]:
        """Export ``version`` of ``job`` (idempotent); raises ExportFailed with the reason."""
        with self._guard:
            lock = self._locks.setdefault(f"{job['id']}/{version}", threading.Lock())
        with lock:
            try:
                from converters.onnx_export import export_model_file
            except Exception as exc:  # noqa: BLE001 - missing torch/onnx is an operator-facing condition
                raise ExportFailed(f"ONNX converter unavailable: {type(exc).__name__}: {exc}") from None
            try:
                data = self.models.get(version)
            except KeyError:
                raise ExportFailed(f"model version {version} is not stored") from None
            try:
                report = export_model_file(data, job, self.out_dir(job["id"]))
            except Exception as exc:  # noqa: BLE001 - converter failures become a readable 500
                log.exception("ONNX export of %s/%s failed", job["id"], version[:12])
                raise ExportFailed(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
            report = dict(report)
            report.setdefault("path", str(self._paths(job["id"], version)[0]))
            return report
