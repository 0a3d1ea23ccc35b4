"""MQTT topic layout, version 1 — the only place topic strings are built or parsed.

Every per-device topic lives under ``fedsight/v1/clients/<client_id>/`` so a broker ACL can confine a device
to its own subtree (it may publish only its own ``status``, ``update`` and ``secagg``, read only its ``task``,
``ack`` and ``relay``). ``secagg``/``relay`` carry the secure-aggregation messages (``secagg_wire``).
"""
from __future__ import annotations

import re

PREFIX = "fedsight/v1"
STATUS = "status"
TASK = "task"
UPDATE = "update"
ACK = "ack"
SECAGG = "secagg"  # device -> coordinator: secure-aggregation keys, shares, masked input, reveals
RELAY = "relay"  # coordinator -> device: roster, relayed shares, unmask requests
CLIENT_KINDS = (STATUS, TASK, UPDATE, ACK, SECAGG, RELAY)

STATUS_WILDCARD = f"{PREFIX}/clients/+/{STATUS}"
# The coordinator publishes here (not retained) after each (re)connect; every device answers by re-publishing
# its retained ``status``, so presence is rebuilt even when the broker lost its retained messages.
PRESENCE_QUERY = f"{PREFIX}/presence/query"
UPDATE_WILDCARD = f"{PREFIX}/clients/+/{UPDATE}"
SECAGG_WILDCARD = f"{PREFIX}/clients/+/{SECAGG}"

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CLIENT_TOPIC_RE = re.compile(rf"^{re.escape(PREFIX)}/clients/([^/]+)/([a-z]+)$")


def valid_id(value: str) -> bool:
    """Ids appear inside topics, so they may not contain MQTT wildcards or separators."""
    return bool(_ID_RE.match(value))


def device_mqtt_id(client_id: str) -> str:
    """The MQTT client id of a device: ``fedsight-<client_id>`` (its broker username is the client id itself).
    Registration only hands out ids starting ``c-``, so no device can take the coordinator's
    ``fedsight-coordinator``; the broker binds each username to this client id."""
    if not valid_id(client_id):
        raise ValueError(f"invalid client id {client_id!r}")
    return f"fedsight-{client_id}"


def _client(client_id: str, kind: str) -> str:
    if not valid_id(client_id):
        raise ValueError(f"invalid client id {client_id!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return f"{PREFIX}/clients/{client_id}/{kind}"


def status_topic(client_id: str) -> str:
    return _client(client_id, STATUS)


def task_topic(client_id: str) -> str:
    return _client(client_id, TASK)


def update_topic(client_id: str) -> str:
    return _client(client_id, UPDATE)


def ack_topic(client_id: str) -> str:
    return _client(client_id, ACK)


def secagg_topic(client_id: str) -> str:
    return _client(client_id, SECAGG)


def relay_topic(client_id: str) -> str:
    return _client(client_id, RELAY)


def job_events_topic(job_id: str) -> str:
    if not valid_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"{PREFIX}/jobs/{job_id}/events"


def parse_client_topic(topic: str) -> tuple[str, str]:
    """``fedsight/v1/clients/<id>/<kind>`` -> ``(id, kind)``; ValueError for anything else."""
    m = _CLIENT_TOPIC_RE.match(topic)
    if not m or m.group(2) not in CLIENT_KINDS or not valid_id(m.group(1)):
        raise ValueError(f"not a fedsight client topic: {topic!r}")
    return m.group(1), m.group(2)


JOB_EVENTS_WILDCARD = f"{PREFIX}/jobs/+/events"
_JOB_TOPIC_RE = re.compile(rf"^{re.escape(PREFIX)}/jobs/([^/]+)/events$")


def parse_job_topic(topic: str) -> str:
    """``fedsight/v1/jobs/<id>/events`` -> job id; ValueError otherwise."""
    m = _JOB_TOPIC_RE.match(topic)
    if not m:
        raise ValueError(f"not a fedsight job topic: {topic!r}")
    return m.group(1)
