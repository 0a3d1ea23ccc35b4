"""Broker identities and ACLs on Mosquitto, managed live through its dynamic-security plugin.

The coordinator administers the plugin over MQTT (``$CONTROL/dynamic-security/v1``) with an operator-made admin
identity (``mosquitto_ctrl dynsec init``); the broker is never restarted and stores only salted PBKDF2 hashes.
At start it provisions three kinds of dynsec objects (all prefixed ``fedsight-``): the role
``fedsight-coordinator`` and the client of the same name bound to client id ``fedsight-coordinator``; the shared
role ``fedsight-devices`` (job events); and per device a client (username = client id, bound to client id
``fedsight-<id>``) with its own role ``fedsight-device-<id>``. Grants come from :mod:`acl`.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from edge_sdk.transport import BrokerAddress, MqttTransport

from coordinator.mqtt import acl
from coordinator.mqtt.accounts import (BrokerAccountError, Credentials, check_device_id, device_mqtt_client_id,
                                       device_username)

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
COORDINATOR_ROLE = "fedsight-coordinator"
DEVICES_ROLE = "fedsight-devices"
_ACL_TYPES = (("publish", "publishClientSend"), ("subscribe", "subscribePattern"), ("receive", "publishClientReceive"))


def device_role(client_id: str) -> str:
    return f"fedsight-device-{client_id}"


def role_acls(grants: acl.Grants) -> list[dict[str, Any]]:
    """Grants as dynsec ACL entries (``subscribePattern``: a subscription may be no wider than the filter)."""
    return [{"acltype": kind, "topic": topic, "allow": True}
            for field, kind in _ACL_TYPES for topic in getattr(grants, field)]


class DynsecError(BrokerAccountError):
    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"Mosquitto dynamic-security refused {command}: {error}")
        self.command, self.error = command, error


class DynsecAccounts:
    """:class:`BrokerAccounts` over Mosquitto dynsec. ``start()`` connects the admin identity; thread-safe."""

    def __init__(self, broker: str | BrokerAddress, admin_username: str, admin_password: str,
                 timeout: float = 10.0, tls_ca: str | Path | None = None) -> None:
        self.admin_username = admin_username
        self.timeout = timeout
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._transport = MqttTransport(broker, f"fedsight-admin-{secrets.token_hex(4)}", self._on_response,
                                        subscriptions=[RESPONSE_TOPIC], persistent=False,
                                        username=admin_username, password=admin_password, tls_ca=tls_ca)

    def start(self) -> DynsecAccounts:
        try:
            self._transport.start(self.timeout)
        except ConnectionError as exc:
            raise BrokerAccountError(f"{exc} (as the broker admin {self.admin_username!r}: check "
                                     "--broker-admin and FEDSIGHT_BROKER_ADMIN_PASSWORD)") from None
        self.command({"command": "getDefaultACLAccess"})  # fails fast without the plugin or admin rights
        return self

    def stop(self) -> None:
        self._transport.stop()

    # ------------------------------------------------------------------ BrokerAccounts
    def add_device(self, client_id: str, password: str) -> None:
        check_device_id(client_id)
        username = device_username(client_id)
        self._ensure_role(device_role(client_id), acl.own_grants(client_id))
        client = {"username": username, "password": password, "clientid": device_mqtt_client_id(client_id),
                  "roles": [{"rolename": device_role(client_id)}, {"rolename": DEVICES_ROLE}]}
        try:
            self.command({"command": "createClient", "textname": "FedSight device", **client})
        except DynsecError as exc:
            if "exist" not in exc.error.lower():
                raise
            self._check_ours(username)
            self.command({"command": "modifyClient", **client})
        log.info("broker account for device %s added", client_id)

    def remove_device(self, client_id: str) -> None:
        username = device_username(client_id)
        try:
            self._check_ours(username)
        except DynsecError as exc:
            if "not found" not in exc.error.lower():
                raise
        else:
            self.command({"command": "deleteClient", "username": username})  # also disconnects it
        self._ignore_missing({"command": "deleteRole", "rolename": device_role(client_id)})
        log.info("broker account for device %s removed", client_id)

    # ------------------------------------------------------------------ provisioning
    def provision(self, coordinator: Credentials) -> None:
        """Check the broker's defaults and (re)create the coordinator's identity and the shared device role."""
        defaults = self.command({"command": "getDefaultACLAccess"})[0].get("data", {}).get("acls", [])
        too_open = sorted(d["acltype"] for d in defaults
                          if d.get("acltype") in ("publishClientSend", "subscribe") and d.get("allow"))
        if too_open:
            raise BrokerAccountError(f"Mosquitto dynamic-security allows {', '.join(too_open)} by default, so "
                                     "device ACLs would not confine anything; set it to deny with "
                                     f"`mosquitto_ctrl dynsec setDefaultACLAccess {too_open[0]} deny`")
        self._ensure_role(COORDINATOR_ROLE, acl.COORDINATOR_GRANTS)
        self._ensure_role(DEVICES_ROLE, acl.EVENTS_GRANTS)
        client = {"username": coordinator.username, "password": coordinator.password,
                  "clientid": coordinator.client_id, "roles": [{"rolename": COORDINATOR_ROLE}]}
        try:
            self.command({"command": "createClient", "textname": "FedSight coordinator", **client})
        except DynsecError as exc:
            if "exist" not in exc.error.lower():
                raise
            self.command({"command": "modifyClient", **client})
        log.info("Mosquitto dynamic-security provisioned for the coordinator (%s)", coordinator.username)

    def _ensure_role(self, rolename: str, grants: acl.Grants) -> None:
        """Create the role, or bring an existing one's ACLs to exactly ``grants``."""
        wanted = role_acls(grants)
        try:
            self.command({"command": "createRole", "rolename": rolename, "acls": wanted})
            return
        except DynsecError as exc:
            if "exist" not in exc.error.lower():
                raise
        have = self.command({"command": "getRole", "rolename": rolename})[0]["data"]["role"].get("acls", [])
        key = lambda a: (a["acltype"], a["topic"], bool(a.get("allow")))  # noqa: E731
        want_keys = {key(a) for a in wanted}
        changes = [{"command": "removeRoleACL", "rolename": rolename, "acltype": a["acltype"], "topic": a["topic"]}
                   for a in have if key(a) not in want_keys]
        have_keys = {key(a) for a in have}
        changes += [{"command": "addRoleACL", "rolename": rolename, **a} for a in wanted if key(a) not in have_keys]
        if changes:
            self.command(*changes)

    def _check_ours(self, username: str) -> None:
        """Refuse to touch a dynsec client that is not a FedSight device (e.g. the admin, another app's user)."""
        data = self.command({"command": "getClient", "username": username})[0].get("data", {})
        roles = {r.get("rolename") for r in data.get("client", {}).get("roles", [])}
        if DEVICES_ROLE not in roles:
            raise BrokerAccountError(f"broker username {username!r} belongs to an identity that is not a FedSight "
                                     "device; choose another client id")

    def _ignore_missing(self, cmd: dict[str, Any]) -> None:
        try:
            self.command(cmd)
        except DynsecError as exc:
            if "not found" not in exc.error.lower():
                raise

    # ------------------------------------------------------------------ the control channel
    def command(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """Send commands in one request; their responses in order, or DynsecError for the first that failed."""
        corr = secrets.token_hex(8)
        done: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
        body = [{**c, "correlationData": f"{corr}-{i}"} for i, c in enumerate(commands)]
        with self._lock:
            self._pending[corr] = done
        try:
            if not self._transport.publish(CONTROL_TOPIC, json.dumps({"commands": body}), wait=self.timeout):
                raise BrokerAccountError("the broker did not take the dynamic-security command (not connected?)")
            if not done[0].wait(self.timeout):
                raise BrokerAccountError(f"no dynamic-security response in {self.timeout:.0f} s: is "
                                         "mosquitto_dynamic_security.so loaded, and may the admin identity use it?")
        finally:
            with self._lock:
                self._pending.pop(corr, None)
        responses = done[1]
        for cmd, resp in zip(commands, responses):
            if resp.get("error"):
                raise DynsecError(cmd["command"], str(resp["error"]))
        return responses

    def _on_response(self, topic: str, payload: bytes) -> None:
        try:
            responses = json.loads(payload)["responses"]
            corr = str(responses[0].get("correlationData", "")).rsplit("-", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            log.warning("unreadable dynamic-security response on %s", topic)
            return
        with self._lock:
            waiter = self._pending.get(corr)
        if waiter is not None:
            waiter[1].extend(responses)
            waiter[0].set()
