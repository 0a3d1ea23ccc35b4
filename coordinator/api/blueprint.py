"""The ``/api/v1`` blueprint and what every route module shares: services, JSON errors, argument parsing, auth.

Routes live in modules named for what they serve (``app.py`` jobs and health, ``models.py`` model files and
ONNX exports, ``clients.py`` devices); all register on this one blueprint, so endpoint names stay ``api.<view>``,
which is what ``coordinator/auth/access.py`` keys its default-deny rules on.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, g, request

from coordinator.auth import access
from coordinator.services import Services

api = Blueprint("api", __name__, url_prefix="/api/v1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def services() -> Services:
    return current_app.extensions["fedsight"]


def json_body(allowed: set[str] | None, required: bool = True) -> dict[str, Any]:
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


def int_arg(name: str, default: int | None, lo: int = 0, hi: int = 1 << 31) -> int | None:
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


def job_or_404(job_id: str) -> dict[str, Any]:
    job = services().store.get_job(job_id)
    if job is None:
        raise ApiError(404, f"unknown job {job_id[:80]!r}")
    return job


# --------------------------------------------------------------------------------------------------- auth

@api.before_request
def _authenticate() -> None:
    """Default deny (coordinator/auth/access.py): who is calling, and may they call this endpoint at all."""
    g.caller = access.identify(services(), request.headers.get("Authorization", ""), request.endpoint)


def caller() -> access.Caller:
    return g.get("caller", access.Caller())
