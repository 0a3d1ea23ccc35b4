"""Broker identities and ACLs for the embedded amqtt broker (amqtt 0.12 plugin API).

:class:`EmbeddedAccounts` is the account table (hashed secrets in a 0600 JSON file in the data dir, so devices
keep their identity across coordinator restarts). Two amqtt plugins consult it live: the auth plugin refuses
anonymous clients, wrong secrets, client ids that are not the username's own and last wills on topics the
identity may not publish to; the topic plugin applies :mod:`acl` to every publish, subscribe and delivery, so a
removed device can do nothing even on a connection that is still open.

amqtt 0.12 looks up (and, for clean sessions, deletes) the stored session of a CONNECT's client id *before*
any auth plugin runs, so anyone could knock a connected client off by reusing its id. :class:`GuardedBroker`
authenticates the CONNECT first and refuses it before any stored session is touched.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from coordinator.mqtt import acl
from coordinator.mqtt.accounts import (BrokerAccountError, Credentials, check_device_id, device_mqtt_client_id,
                                       device_username)

log = logging.getLogger(__name__)

# The secrets are 256 random bits, so the hash only has to be one-way, not slow; a slow hash would stall the
# broker's event loop on every connect.
_HASH = "sha256"
_ITERATIONS = 1000


def hash_secret(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac(_HASH, password.encode("utf-8"), salt, _ITERATIONS)
    return f"pbkdf2_{_HASH}${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_secret(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        got = hashlib.pbkdf2_hmac(scheme.removeprefix("pbkdf2_"), password.encode("utf-8"),
                                  base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


class EmbeddedAccounts:
    """:class:`BrokerAccounts` for the embedded broker; thread-safe (REST threads write, the broker loop reads)."""

    def __init__(self, path: Path | str, coordinator: Credentials) -> None:
        self.path = Path(path)
        self.coordinator = coordinator
        self._coordinator_hash = hash_secret(coordinator.password)
        self._lock = threading.Lock()
        self._devices: dict[str, str] = {}  # username -> hash
        if self.path.exists():
            try:
                self._devices = dict(json.loads(self.path.read_text())["devices"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path} is not a broker accounts file ({exc})") from None

    # ------------------------------------------------------------------ BrokerAccounts
    def add_device(self, client_id: str, password: str) -> None:
        check_device_id(client_id)
        with self._lock:
            self._devices[device_username(client_id)] = hash_secret(password)
            self._save()
        log.info("broker account for device %s added", client_id)

    def remove_device(self, client_id: str) -> None:
        with self._lock:
            if self._devices.pop(device_username(client_id), None) is None:
                return
            self._save()
        log.info("broker account for device %s removed", client_id)

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "devices": self._devices}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise BrokerAccountError(f"cannot save broker accounts to {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ checks used by the plugins
    def grants_for(self, username: str | None) -> acl.Grants | None:
        """The live grants of an identity; None for anonymous or unknown (e.g. removed) identities."""
        if username is None:
            return None
        if username == self.coordinator.username:
            return acl.COORDINATOR_GRANTS
        with self._lock:
            known = username in self._devices
        return acl.device_grants(username) if known else None

    def refusal(self, username: str | None, password: str | None, client_id: str | None,
                will_topic: str | None) -> str | None:
        """Why a CONNECT must be refused, or None to accept it."""
        if not username:
            return "anonymous clients are not allowed"
        if username == self.coordinator.username:
            stored, own_id = self._coordinator_hash, self.coordinator.client_id
        else:
            with self._lock:
                stored = self._devices.get(username)
            own_id = device_mqtt_client_id(username)
        if stored is None or not verify_secret(password or "", stored):
            return f"bad username or password for {username[:64]!r}"
        if client_id != own_id:
            return f"{username[:64]!r} may only connect as client id {own_id!r}, not {str(client_id)[:80]!r}"
        grants = self.grants_for(username)
        if will_topic is not None and (grants is None or not acl.may_publish(grants, will_topic)):
            return f"{username[:64]!r} may not set a last will on {will_topic[:120]!r}"
        return None


class FedsightAuthPlugin(BaseAuthPlugin):
    """Accepts a CONNECT only with a known identity, its secret and its own client id."""

    @dataclass
    class Config:
        accounts: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        accounts: EmbeddedAccounts = self.config.accounts
        will = session.will_topic if session.will_flag else None
        password = session.password.decode() if isinstance(session.password, bytes) else session.password
        why = accounts.refusal(session.username, password, session.client_id, will)
        if why is not None:
            log.warning("refused MQTT connection from %s:%s: %s", session.remote_address, session.remote_port, why)
            return False
        return True


class FedsightTopicPlugin(BaseTopicPlugin):
    """Applies the FedSight grants to every publish, subscribe and delivery."""

    @dataclass
    class Config:
        accounts: Any = None

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if session is None or topic is None:
            return False
        grants = self.config.accounts.grants_for(session.username)
        if grants is None:
            allowed = False
        elif action == Action.PUBLISH:
            allowed = acl.may_publish(grants, topic)
        elif action == Action.SUBSCRIBE:
            allowed = acl.may_subscribe(grants, topic)
        else:
            allowed = acl.may_receive(grants, topic)
        if not allowed and action != Action.RECEIVE:
            log.warning("denied %s of %r to %r", action, topic[:120], session.username)
        return allowed


def plugin_config(accounts: EmbeddedAccounts) -> dict[str, Any]:
    """The amqtt ``plugins`` section that enforces ``accounts`` (replaces the anonymous-auth default)."""
    return {f"{__name__}.FedsightAuthPlugin": {"accounts": accounts},
            f"{__name__}.FedsightTopicPlugin": {"accounts": accounts}}


class GuardedBroker(Broker):
    """amqtt's Broker, but a CONNECT is authenticated before the stored session of its client id is touched."""

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        if not await self._authenticate(session, None):  # type: ignore[arg-type]
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"connection from {remote_address}:{remote_port} not authorized")
        # From here on as amqtt 0.12.1 Broker._initialize_client_session.
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(existing, attr, getattr(session, attr))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0) if self.config else 0
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session
