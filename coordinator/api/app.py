"""REST API under ``/api/v1`` (Flask app factory): jobs and health here, model files in ``models.py``, devices in
``clients.py``, all on the one blueprint of ``blueprint.py``. Every error is JSON ``{"error": "<readable reason>"}``.

Default deny: every endpoint needs ``Authorization: Bearer <operator token>`` unless
``coordinator/auth/access.py`` lists it as public (health; registration, which checks the enrollment secret
itself) or device-usable (a device's own records, the models of jobs that selected it). An endpoint added
later is therefore operator-only until someone decides otherwise.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from coordinator.api import clients as _clients, models as _models  # noqa: F401  (register their routes)
from coordinator.api.blueprint import ApiError, api, int_arg as _int_arg, job_or_404 as _job
from coordinator.api.blueprint import json_body as _body, services as _svc
from coordinator.api.body_limit import BodyLimit
from coordinator.api.uploads import MAX_WEIGHTS_BYTES, UploadError, multipart_job
from coordinator.auth.paths import PathRefused, confine
from coordinator.auth.refused import Refused
from coordinator.privacy.budget import summary_from_rounds
from coordinator.rounds.engine import JobStateError
from coordinator.rounds.jobspec import JobSpecError, initial_model, normalize_job, weights_record
from coordinator.services import build_services

log = logging.getLogger(__name__)

API_VERSION = "v1"
MAX_JSON_BYTES = 1 << 20
# each round's compression_ratio is 4 x numel over the mean accepted message, not a measured dense message
COMPRESSION_BASIS = "vs raw fp32: 4 bytes x numel per accepted update / mean accepted message size"

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
