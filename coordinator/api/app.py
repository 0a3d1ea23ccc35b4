"""REST API under ``/api/v1`` (Flask app factory). Every error is JSON ``{"error": "<readable reason>"}``.

Default deny: every endpoint needs ``Authorization: Bearer <operator token>`` unless
``coordinator/auth/access.py`` lists it as public (health; registration, which checks the enrollment secret
itself) or device-usable (a device's own records, the models of jobs that selected it). An endpoint added
later is therefore operator-only until someone decides otherwise.
"""
from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException


from coordinator.privacy.budget import summary_from_rounds
from coordinator.api.body_limit import BodyLimit
from coordinator.auth import access, enrollment
from coordinator.auth.paths import PathRefused, confine
from coordinator.auth.refused import Refused
from coordinator.mqtt.accounts import BrokerAccountError
from coordinator.api.uploads import MAX_WEIGHTS_BYTES, UploadError, multipart_job
from coordinator.rounds.engine import JobStateError
from coordinator.storage.exports import ExportFailed
from coordinator.rounds.jobspec import JobSpecError, initial_model, normalize_job, weights_record
from coordinator.api.model_patches import patch_for
from coordinator.storage.model_store import is_version
from coordinator.services import Services, build_services

log = logging.getLogger(__name__)

API_VERSION = "v1"
MAX_JSON_BYTES = 1 << 20
# each round's compression_ratio is 4 x numel over the mean accepted message, not a measured dense message
COMPRESSION_BASIS = "vs raw fp32: 4 bytes x numel per accepted update / mean accepted message size"

api = Blueprint("api", __name__, url_prefix="/api/v1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _svc() -> Services:
    return current_app.extensions["fedsight"]


def _body(allowed: set[str] | None, required: bool = True) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - (allowed or set()))
    if allowed is not None and unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(sorted(allowed)) or 'none'}")
    return body


def _int_arg(name: str, default: int | None, lo: int = 0, hi: int = 1 << 31) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name!r} must be in [{lo}, {hi}]")
    return value


def _job(job_id: str) -> dict[str, Any]:
    job = _svc().store.get_job(job_id)
    if job is None:
        raise ApiError(404, f"unknown job {job_id[:80]!r}")
    return job


def _job_view(job: dict[str, Any]) -> dict[str, Any]:
    view = {k: job[k] for k in ("id", "name", "status", "current_round", "current_version", "config", "error",
                                "created_at", "updated_at")}
    view["rounds"] = job["config"]["rounds"]
    rnd = _svc().engine.current_round(job["id"])
    view["open_round"] = None if rnd is None else {
        "round": rnd.round, "attempt": rnd.attempt, "selected": sorted(rnd.selected), "accepted": rnd.accepted,
        "rejected": rnd.rejected, "deadline": rnd.deadline, **rnd.traffic()}
    view["traffic"] = _svc().store.job_traffic(job["id"])
    view["notice"] = _svc().engine.notice(job["id"])  # why it is not progressing now (stalled, disk full)
    view["reason"] = job.get("reason")  # why it finished early (privacy budget reached)
    if job["config"].get("privacy"):  # epsilon spent so far, from the stored round records
        view["privacy"] = summary_from_rounds(job["config"]["privacy"], _svc().store.get_rounds(job["id"]))
    return view


# --------------------------------------------------------------------------------------------------- auth

@api.before_request
def _authenticate() -> None:
    """Default deny (coordinator/auth/access.py): who is calling, and may they call this endpoint at all."""
    g.caller = access.identify(_svc(), request.headers.get("Authorization", ""), request.endpoint)


def _caller() -> access.Caller:
    return g.get("caller", access.Caller())


# ------------------------------------------------------------------------------------------------ health

@api.get("/health")
def health() -> Any:
    from edge_sdk import __version__

    svc = _svc()
    return jsonify(status="ok", version=__version__, api=API_VERSION, broker_url=svc.broker_url,
                   public_url=svc.engine.config.public_url,
                   jobs_running=sum(1 for j in svc.store.list_jobs("running") if svc.engine.is_running(j["id"])))


# -------------------------------------------------------------------------------------------------- jobs

def _job_request() -> tuple[dict[str, Any], bytes | None, str]:
    """(job body, uploaded weights, their file name): plain JSON, or multipart with the weights file."""
    if request.mimetype != "multipart/form-data":
        return _body(None), None, ""  # normalize_job names unknown fields itself, with their path
    try:
        return multipart_job(request)
    except UploadError as exc:
        raise ApiError(400, str(exc)) from None


@api.post("/jobs")
def create_job() -> Any:
    svc = _svc()
    body, weights, filename = _job_request()
    try:
        config = normalize_job(body)
        if config["model"]["weights"] is not None:
            if weights is not None or svc.weights_dir is None:
                raise JobSpecError("'model.weights' names a file on the coordinator, which needs its --weights-dir; "
                                   "otherwise send the weights file itself with the job (multipart field 'weights', "
                                   "as `fedsight job create --weights FILE` does)")
            config["model"]["weights"] = str(confine(config["model"]["weights"], svc.weights_dir))
        job_id = f"job-{secrets.token_hex(4)}"
        data = initial_model(job_id, config, weights)
    except (JobSpecError, PathRefused) as exc:
        log.warning("job rejected: %s", exc)
        raise ApiError(400, str(exc)) from None
    if weights is not None:
        config["model"]["weights"] = weights_record(weights, filename)
    version = svc.models.put(data)
    job = svc.store.create_job(job_id, config["name"], config, version, len(data))
    log.info("created job %s (%s, %d rounds, initial version %s)", job_id, config["model"]["arch"],
             config["rounds"], version[:12])
    resp = jsonify(_job_view(job))
    resp.status_code = 201
    resp.headers["Location"] = f"/api/v1/jobs/{job_id}"
    return resp


@api.get("/jobs")
def list_jobs() -> Any:
    status = request.args.get("status")
    return jsonify(jobs=[_job_view(j) for j in _svc().store.list_jobs(status)])


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    return jsonify(_job_view(_job(job_id)))


@api.get("/jobs/<job_id>/preprocessing")
def job_preprocessing(job_id: str) -> Any:
    """What a device needs to prepare frames before its first task (no other job details; devices may read it)."""
    cfg = _job(job_id)["config"]
    model = cfg["model"]
    return jsonify(model={"image_size": model["image_size"], "in_channels": model["in_channels"]},
                   normalization=cfg.get("normalization"), input_scale=cfg.get("input_scale"))


@api.post("/jobs/<job_id>/start")
def start_job(job_id: str) -> Any:
    return _transition(job_id, _svc().engine.start_job)


@api.post("/jobs/<job_id>/stop")
def stop_job(job_id: str) -> Any:
    return _transition(job_id, _svc().engine.stop_job)


def _transition(job_id: str, action: Callable[[str], Any]) -> Any:
    """Start or stop: 404 for an unknown job, 409 when its state does not allow it."""
    _job(job_id)
    _body(set(), required=False)
    try:
        action(job_id)
    except JobStateError as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify(_job_view(_job(job_id)))


@api.get("/jobs/<job_id>/rounds")
def job_rounds(job_id: str) -> Any:
    _job(job_id)
    return jsonify(rounds=_svc().store.get_rounds(job_id), compression_ratio_basis=COMPRESSION_BASIS)


@api.get("/jobs/<job_id>/updates")
def job_updates(job_id: str) -> Any:
    _job(job_id)
    status = request.args.get("status")
    if status not in (None, "accepted", "rejected"):
        raise ApiError(400, "query parameter 'status' must be 'accepted' or 'rejected'")
    rows = _svc().store.list_updates(job_id, _int_arg("round", None), status, _int_arg("limit", 1000, 1, 100_000),
                                     _int_arg("offset", 0))
    return jsonify(updates=rows)


@api.get("/jobs/<job_id>/metrics")
def job_metrics(job_id: str) -> Any:
    _job(job_id)
    return jsonify(metrics=_svc().store.list_metrics(job_id))


# ------------------------------------------------------------------------------------------------ models

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


# ----------------------------------------------------------------------------------------------- clients

def _client_view(row: Mapping[str, Any]) -> dict[str, Any]:
    view = {k: row[k] for k in ("id", "name", "created_at", "last_seen")}
    status = _svc().engine.presence.get(row["id"])
    view["online"] = bool(status and status.online)
    view["ready"] = bool(status and status.online and status.ready)  # online with local data: selectable
    return view


@api.post("/clients")
def register_client() -> Any:
    """Enroll a device: needs the enrollment secret (or the operator token); the coordinator picks the id."""
    by_operator = _caller().operator
    remote = request.remote_addr or "unknown"
    if not by_operator:  # rate-limit before reading the body, so floods cost nothing more
        enrollment.throttle(_svc(), remote)
    body = _body({"name", "enroll_secret", "client_id"}, required=False)
    resp = jsonify(enrollment.enroll(_svc(), body, remote, by_operator))
    resp.status_code = 201
    resp.headers["Cache-Control"] = "no-store"
    return resp


@api.post("/clients/<client_id>/broker-credentials")
def broker_credentials(client_id: str) -> Any:
    """Issue a registered device a new broker secret (lost credentials, or registered before broker ACLs)."""
    caller = _caller()
    if not caller.operator and caller.device != client_id:
        raise ApiError(403, "a device may only renew its own broker credentials")
    if _svc().store.get_client(client_id) is None:
        raise ApiError(404, f"unknown (or revoked) client {client_id[:80]!r}")
    _body(set(), required=False)
    try:
        issued = enrollment.issue_broker_secret(_svc(), client_id)
    except (BrokerAccountError, ValueError) as exc:
        log.error("broker account for %s not created: %s", client_id, exc)
        raise ApiError(503, f"the broker account of client {client_id!r} could not be created ({exc}); "
                            "retry later") from None
    resp = jsonify(client_id=client_id, **issued)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@api.get("/clients")
def list_clients() -> Any:
    return jsonify(clients=[_client_view(c) for c in _svc().store.list_clients()])


def _own_client(client_id: str) -> Mapping[str, Any]:
    access.require_self_or_operator(_caller(), client_id)
    row = _svc().store.get_client(client_id)
    if row is None:
        raise ApiError(404, f"unknown client {client_id[:80]!r}")
    return row


@api.get("/clients/<client_id>")
def get_client(client_id: str) -> Any:
    return jsonify(_client_view(_own_client(client_id)))


@api.get("/clients/<client_id>/updates")
def client_updates(client_id: str) -> Any:
    _own_client(client_id)
    return jsonify(updates=_svc().store.list_client_updates(client_id, _int_arg("limit", 100, 1, 10_000)))


@api.delete("/clients/<client_id>")
def revoke_client(client_id: str) -> Any:
    """Revoke a device: its token, device key and broker account stop working; its records stay."""
    enrollment.revoke(_svc(), client_id)
    return jsonify(id=client_id, revoked=True)


# ------------------------------------------------------------------------------------------------ errors

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    resp = jsonify(error=message)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app.

    ``config`` keys: ``services`` (a prebuilt :class:`Services`, as the server passes) or ``data_dir`` (build
    them here; the engine then has no MQTT publisher), plus optional ``public_url``, ``broker_url`` and any
    Flask settings (upper-case keys).
    """
    config = dict(config or {})
    svc = config.pop("services", None)
    if svc is None:
        if "data_dir" not in config:
            raise ValueError("create_app needs 'services' or 'data_dir'")
        svc = build_services(config.pop("data_dir"), public_url=config.pop("public_url", "http://127.0.0.1:8080"),
                             broker_url=config.pop("broker_url", None), evaluate=config.pop("evaluate", True))
    app = Flask("fedsight-coordinator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_JSON_BYTES
    app.wsgi_app = BodyLimit(app.wsgi_app, MAX_JSON_BYTES,  # type: ignore[method-assign]
                             uploads={"/api/v1/jobs": MAX_WEIGHTS_BYTES})  # job + weights file (multipart)
    app.config["JSON_SORT_KEYS"] = False
    app.config.update({k: v for k, v in config.items() if k.isupper()})
    app.extensions["fedsight"] = svc
    app.register_blueprint(api)

    @app.errorhandler(ApiError)
    @app.errorhandler(Refused)
    def _api_error(exc: ApiError | Refused) -> Any:
        return _error(exc.status, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    return app
