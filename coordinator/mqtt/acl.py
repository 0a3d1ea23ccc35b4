"""Who may do what on the broker: the one definition of the FedSight topic ACLs.

Both broker back-ends enforce exactly these grants: the embedded amqtt broker checks them in its topic plugin
(``embedded_acl.py``); for Mosquitto they become dynamic-security roles (``dynsec.py``). A device may publish
only its own ``status``, ``update`` and ``secagg``, subscribe to / receive only its own ``task``, ``ack`` and
``relay`` (secure aggregation: the coordinator relays each device only what is addressed to it) plus the job
events (``fedsight/v1/jobs/+/events``: every device may read every job's events, which carry round numbers,
model versions and selected client ids, never model data). Only the coordinator publishes tasks, acks, relays
and events. Everything else is denied.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.protocol import topics


@dataclass(frozen=True)
class Grants:
    """Topic filters one identity may publish to, subscribe with, and receive messages on."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    receive: tuple[str, ...]


COORDINATOR_GRANTS = Grants(publish=(f"{topics.PREFIX}/#",), subscribe=(f"{topics.PREFIX}/#",),
                            receive=(f"{topics.PREFIX}/#",))
# Shared by every device (a dynsec role of its own, so adding a device does not rewrite it).
EVENTS_GRANTS = Grants(publish=(), subscribe=(topics.JOB_EVENTS_WILDCARD,), receive=(topics.JOB_EVENTS_WILDCARD,))


def own_grants(client_id: str) -> Grants:
    """The device-specific part of a device's grants (raises ValueError for an id that cannot be a topic level)."""
    own_in = (topics.task_topic(client_id), topics.ack_topic(client_id), topics.relay_topic(client_id))
    return Grants(publish=(topics.status_topic(client_id), topics.update_topic(client_id),
                           topics.secagg_topic(client_id)),
                  subscribe=own_in, receive=own_in)


def device_grants(client_id: str) -> Grants:
    own = own_grants(client_id)
    return Grants(own.publish + EVENTS_GRANTS.publish, own.subscribe + EVENTS_GRANTS.subscribe,
                  own.receive + EVENTS_GRANTS.receive)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter (``+`` one level, ``#`` the rest)."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False  # MQTT 4.7.2: wildcards at the root never match $-topics
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def filter_covered(requested: str, allowed: str) -> bool:
    """True when every topic ``requested`` can match is matched by ``allowed`` (a subscription is no wider)."""
    if requested.startswith("$") and not allowed.startswith("$"):
        return False
    r_levels, a_levels = requested.split("/"), allowed.split("/")
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#" or (a != "+" and (r == "+" or r != a)):
            return False
    return len(r_levels) == len(a_levels)


def may_publish(grants: Grants, topic: str) -> bool:
    return any(topic_matches(f, topic) for f in grants.publish)


def may_subscribe(grants: Grants, topic_filter: str) -> bool:
    return any(filter_covered(topic_filter, f) for f in grants.subscribe)


def may_receive(grants: Grants, topic: str) -> bool:
    return any(topic_matches(f, topic) for f in grants.receive)
