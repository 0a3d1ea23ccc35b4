"""Device enrollment and revocation: the only ways device credentials come into being and go away.

Enrollment needs the fleet's enrollment secret (or the operator token), is rate-limited per remote
address (failed guesses count), and the coordinator assigns the id, so no one can pick an id that collides
with the coordinator's MQTT identity or squats another device's. The response is the only time the device
token, device key and MQTT password exist outside the device.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any

from coordinator.auth.credentials import sha256_text
from coordinator.auth.rate_limit import retry_after
from coordinator.auth.refused import Refused
from coordinator.mqtt.accounts import RESERVED_IDS, device_username, new_secret
from coordinator.services import Services

log = logging.getLogger(__name__)


def throttle(svc: Services, remote_addr: str) -> None:
    """Take one registration token for this address (every attempt, good or bad), or Refused 429."""
    wait = svc.enroll_limiter.acquire(remote_addr)
    if wait:
        log.debug("registration from %s refused: rate limit", remote_addr)  # a flood must not flood the log too
        raise Refused(429, f"too many registrations from this address; retry in {retry_after(wait)} s",
                      {"Retry-After": retry_after(wait)})


def enroll(svc: Services, body: dict[str, Any], remote_addr: str, by_operator: bool) -> dict[str, Any]:
    """Register one device from a ``POST /clients`` body (after :func:`throttle`); its credentials or Refused."""
    if "client_id" in body:
        chosen = body["client_id"]
        reserved = f", and {chosen!r} is reserved for the coordinator's broker identity" \
            if isinstance(chosen, str) and chosen in RESERVED_IDS else ""
        raise Refused(400, f"'client_id' cannot be chosen: the coordinator assigns device ids{reserved}")
    secret = body.get("enroll_secret")
    if not by_operator and not (isinstance(secret, str) and svc.credentials.enroll_ok(secret)):
        log.warning("registration from %s refused: %s enrollment secret", remote_addr,
                    "missing" if secret is None else "wrong")
        raise Refused(403, "registration needs the fleet's enrollment secret in 'enroll_secret' (the coordinator "
                           "wrote it to <data-dir>/enroll-secret)")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise Refused(400, "'name' must be a string of at most 200 characters")
    client_id = f"c-{secrets.token_hex(6)}"
    token = secrets.token_urlsafe(32)
    svc.store.create_client(client_id, name or client_id, sha256_text(token))
    creds = {"client_id": client_id, "token": token, "name": name or client_id,
             "device_key": svc.credentials.device_key(client_id).hex()}
    if svc.broker_accounts is not None:
        try:
            creds.update(issue_broker_secret(svc, client_id))
        except Exception as exc:  # noqa: BLE001 - the broker's failure: undo the registration, say why
            svc.store.revoke_client(client_id)
            log.exception("broker account for %s could not be created", client_id)
            raise Refused(503, f"could not create the device's broker account: {exc}") from None
    log.info("registered client %s from %s", client_id, remote_addr)
    return creds


def revoke(svc: Services, client_id: str) -> None:
    """Token, device key and broker account stop working at once; records stay; the id is never reused."""
    if not svc.store.revoke_client(client_id):
        raise Refused(404, f"unknown (or already revoked) client {client_id[:80]!r}")
    if svc.broker_accounts is not None:
        try:
            svc.broker_accounts.remove_device(client_id)
        except Exception:  # noqa: BLE001 - the REST credentials and the MAC key are already dead
            log.exception("broker account of revoked client %s could not be removed", client_id)
    log.warning("revoked client %s", client_id)


def issue_broker_secret(svc: Services, client_id: str) -> dict[str, str | None]:
    """A fresh broker secret for a registered device, replacing any earlier one (``mqtt_username`` is the
    device's client id; it connects as MQTT client ``fedsight-<client_id>``). Nulls for an unmanaged broker;
    the broker's error (BrokerAccountError, ValueError) propagates."""
    if svc.broker_accounts is None:
        return {"mqtt_username": None, "mqtt_password": None}
    password = new_secret()
    svc.broker_accounts.add_device(client_id, password)
    return {"mqtt_username": device_username(client_id), "mqtt_password": password}
