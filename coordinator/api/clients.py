"""Devices: enrollment, broker credentials, listing, their own records, revocation."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import jsonify, request

from coordinator.api.blueprint import ApiError, api, int_arg as _int_arg
from coordinator.api.blueprint import caller as _caller, json_body as _body, services as _svc
from coordinator.auth import access, enrollment
from coordinator.mqtt.accounts import BrokerAccountError

log = logging.getLogger(__name__)


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
