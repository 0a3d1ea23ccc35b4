"""Broker identities: the device accounts interface, identity naming, and the coordinator's own secret.

Every device connects with its own broker username (its FedSight client id) and a secret issued at
registration, under the MQTT client id ``fedsight-<client_id>``; the broker binds the two, so no identity can
take another's client id. The coordinator's bridge has an identity of its own, generated at first start into
a 0600 file in the data directory. Implementations of :class:`BrokerAccounts`: ``EmbeddedAccounts``
(embedded_acl.py, the built-in broker) and ``DynsecAccounts`` (dynsec.py, Mosquitto's dynamic security).
Registration (``coordinator/auth/enrollment.py``) creates a device's account, revocation removes it;
``Services.broker_accounts is None`` means an unmanaged broker: registration then returns no MQTT credentials.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_sdk.protocol import topics

log = logging.getLogger(__name__)

COORDINATOR_CLIENT_ID = "fedsight-coordinator"
COORDINATOR_USERNAME = "fedsight-coordinator"
DEVICE_CLIENT_ID_PREFIX = "fedsight-"  # EdgeClient connects as fedsight-<client_id>
CREDENTIALS_FILE = "mqtt-coordinator.json"
# Ids whose username or MQTT client id would be the coordinator's.
RESERVED_IDS = frozenset({"coordinator", COORDINATOR_USERNAME})


class BrokerAccounts(Protocol):
    """Per-device broker accounts; enrollment and revocation call these (``coordinator/auth/enrollment.py``)."""

    def add_device(self, client_id: str, password: str) -> None: ...

    def remove_device(self, client_id: str) -> None: ...


class BrokerAccountError(RuntimeError):
    """The broker did not accept an account change (unreachable, refused, or the name is not ours)."""


def device_username(client_id: str) -> str:
    return client_id


def device_mqtt_client_id(client_id: str) -> str:
    return f"{DEVICE_CLIENT_ID_PREFIX}{client_id}"


def check_device_id(client_id: str) -> None:
    """ValueError (readable) for an id that cannot be a device identity."""
    if not topics.valid_id(client_id):
        raise ValueError(f"invalid client id {client_id[:80]!r}: use 1-64 letters, digits, '_', '-' or '.'")
    if client_id in RESERVED_IDS:
        raise ValueError(f"client id {client_id!r} is reserved for the coordinator's broker identity")


def new_secret() -> str:
    """A broker password: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    client_id: str = COORDINATOR_CLIENT_ID


def coordinator_credentials(data_dir: Path | str) -> Credentials:
    """The bridge's broker identity: read from ``<data_dir>/mqtt-coordinator.json``, created (0600) at first use."""
    path = Path(data_dir) / CREDENTIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; restricting it to its owner (0600)", path)
            path.chmod(0o600)
        try:
            data = json.loads(path.read_text())
            return Credentials(str(data["username"]), str(data["password"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a coordinator credentials file ({exc}); delete it to generate "
                             "a new one") from None
    creds = Credentials(COORDINATOR_USERNAME, new_secret())
    with os.fdopen(fd, "w") as f:
        json.dump({"username": creds.username, "password": creds.password}, f)
    log.info("generated the coordinator's broker credentials in %s", path)
    return creds
