"""Model files (full versions and patches between them) and ONNX exports, for operators and member devices."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from flask import jsonify, request, send_file

from coordinator.api.blueprint import ApiError, api, job_or_404 as _job
from coordinator.api.blueprint import caller as _caller, json_body as _body, services as _svc
from coordinator.api.model_patches import patch_for
from coordinator.auth import access
from coordinator.storage.exports import ExportFailed
from coordinator.storage.model_store import is_version


def _send_model(job: dict[str, Any], version: str, immutable: bool) -> Any:
    svc = _svc()
    if not is_version(version) or svc.store.get_model_version(job["id"], version) is None:
        raise ApiError(404, f"job {job['id']} has no model version {version[:80]!r}")
    path = svc.models.path(version)
    if not path.is_file():
        raise ApiError(500, f"model version {version} is recorded but its file is missing from the model store")
    resp = send_file(path, mimetype="application/octet-stream", conditional=True, etag=version,
                     download_name=f"{job['id']}-{version[:12]}.fsm", max_age=None)
    resp.headers["X-Model-Version"] = version
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable" if immutable else "private, no-cache"
    if resp.status_code in (200, 206) and resp.content_length:
        svc.store.add_downlink(job["id"], version, int(resp.content_length))
    return resp


@api.get("/jobs/<job_id>/model")
def current_model(job_id: str) -> Any:
    job = _job(job_id)
    access.require_member(_svc(), _caller(), job["id"])
    return _send_model(job, job["current_version"], immutable=False)


@api.get("/jobs/<job_id>/models")
def list_models(job_id: str) -> Any:
    _job(job_id)
    return jsonify(models=_svc().store.list_model_versions(job_id))


@api.get("/jobs/<job_id>/models/<version>")
def get_model(job_id: str, version: str) -> Any:
    job = _job(job_id)
    access.require_member(_svc(), _caller(), job["id"])
    return _send_model(job, version, immutable=True)


@api.get("/jobs/<job_id>/models/<version>/delta")
def model_delta(job_id: str, version: str) -> Any:
    job = _job(job_id)
    access.require_member(_svc(), _caller(), job["id"])
    svc = _svc()
    base = request.args.get("from", "")
    for v in (base, version):
        if not is_version(v) or svc.store.get_model_version(job_id, v) is None:
            raise ApiError(404, f"job {job_id} has no model version {v[:80]!r} (query 'from' names the base)")
    patch = patch_for(svc.models, base, version)
    if patch is None:
        raise ApiError(404, f"no patch from {base[:12]} to {version[:12]}: tensor layouts differ or it would not "
                            "be much smaller; download the full version")
    resp = send_file(io.BytesIO(patch), mimetype="application/octet-stream", conditional=True,
                     etag=f"{base}-{version}", download_name=f"{base[:12]}-{version[:12]}.fsp", max_age=None)
    resp.headers["X-Model-Version"] = version
    resp.headers["X-Patch-From"] = base
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    if resp.status_code in (200, 206) and resp.content_length:
        svc.store.add_downlink(job["id"], version, int(resp.content_length))
    return resp


# -------------------------------------------------------------------------------------------------- onnx

def _export(job: dict[str, Any], version: str | None) -> dict[str, Any]:
    svc = _svc()
    version = version or job["current_version"]
    if not is_version(version) or svc.store.get_model_version(job["id"], version) is None:
        raise ApiError(404, f"job {job['id']} has no model version {version[:80]!r}")
    report = svc.exports.find(job["id"], version)
    if report is None:
        try:
            report = svc.exports.export(job, version)
        except ExportFailed as exc:
            raise ApiError(500, str(exc)) from None
    return report


@api.get("/jobs/<job_id>/onnx")
def get_onnx(job_id: str) -> Any:
    job = _job(job_id)
    report = _export(job, request.args.get("version"))
    path = Path(report["path"])
    resp = send_file(path, mimetype="application/octet-stream", conditional=True,
                     download_name=f"{job['id']}-{path.stem[:12]}.onnx", max_age=None)
    resp.headers["X-Model-Version"] = path.stem
    return resp


@api.get("/jobs/<job_id>/onnx/report")
def get_onnx_report(job_id: str) -> Any:
    """The export's report (onnx_sha256, parity, metadata), so a device can verify the file before using it."""
    report = _export(_job(job_id), request.args.get("version"))
    return jsonify({k: v for k, v in report.items() if k not in ("path", "report_path")})


@api.post("/jobs/<job_id>/export")
def export_onnx(job_id: str) -> Any:
    job = _job(job_id)
    body = _body({"version"}, required=False)
    version = body.get("version")
    if version is not None and not isinstance(version, str):
        raise ApiError(400, "'version' must be a string")
    return jsonify(_export(job, version))
