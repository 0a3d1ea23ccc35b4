"""Who may call which REST endpoint: default deny, with explicit public and device-usable endpoints.

Endpoints are named as Flask names them (``api.<view function>``). Anything not listed needs the operator
token, so an endpoint added later is operator-only until someone decides otherwise. A device token opens the
device endpoints only for the device itself: its own records, and the models of jobs that selected it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.auth.credentials import sha256_text
from coordinator.auth.refused import Refused
from coordinator.services import Services

log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset({"api.health", "api.register_client"})
DEVICE_ENDPOINTS = frozenset({"api.current_model", "api.get_model", "api.model_delta", "api.get_client",
                              "api.client_updates", "api.broker_credentials",
                              "api.job_preprocessing"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fedsight"'}


@dataclass(frozen=True)
class Caller:
    operator: bool = False
    device: str | None = None  # client id of an authenticated, unrevoked device


def bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def identify(svc: Services, authorization: str, endpoint: str | None) -> Caller:
    """The caller behind an ``Authorization`` header, or Refused (401/403) if it may not call ``endpoint``."""
    token = bearer(authorization)
    if token is not None and svc.credentials.is_operator(token):
        return Caller(operator=True)
    client = svc.store.client_by_token_hash(sha256_text(token)) if token is not None else None
    caller = Caller(device=client["id"] if client else None)
    if endpoint is None or endpoint in PUBLIC_ENDPOINTS:  # unknown routes: let them 404
        return caller
    if token is None:
        raise Refused(401, "authentication required: send 'Authorization: Bearer <token>' (operator token from "
                           "$FEDSIGHT_TOKEN or <data-dir>/operator-token; devices use their registration token)",
                      _CHALLENGE)
    if caller.device is None:
        raise Refused(401, "unknown or revoked token", _CHALLENGE)
    if endpoint not in DEVICE_ENDPOINTS:
        log.warning("device %s refused operator endpoint %s", caller.device, endpoint)
        raise Refused(403, "this endpoint needs the operator token; device tokens cannot use it")
    return caller


def require_member(svc: Services, caller: Caller, job_id: str) -> None:
    """A device may fetch a job's models only once the job has selected it."""
    if not caller.operator and (caller.device is None or not svc.store.client_in_job(caller.device, job_id)):
        raise Refused(403, f"client {caller.device!r} is not taking part in job {job_id}")


def require_self_or_operator(caller: Caller, client_id: str) -> None:
    if not caller.operator and caller.device != client_id:
        raise Refused(403, "a device may read only its own records")
