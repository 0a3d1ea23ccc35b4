"""Make amqtt's broker tables safe to iterate across ``await``s.

Why: amqtt 0.12.1 iterates its subscription table (and the session and retained-message tables) in loops that
``await`` inside (``_run_broadcast``, retained-message delivery, subscription cleanup), so a client that
subscribes, unsubscribes or disconnects meanwhile raises ``RuntimeError: dictionary changed size during
iteration`` inside the broker; under a flood of connections that drops broadcasts. Iterating a snapshot
instead is what those loops need: a subscription added mid-broadcast simply misses that one message.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration views are copies taken when the loop starts."""

    def __iter__(self) -> Iterator[Any]:
        return iter(list(super().keys()))

    def keys(self) -> list[Any]:  # type: ignore[override]
        return list(super().keys())

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(super().values())

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return list(super().items())


TABLES = ("_sessions", "_subscriptions", "_retained_messages")


def snapshot_tables(broker: Any) -> None:
    """Swap a freshly built ``amqtt.broker.Broker``'s tables for :class:`SnapshotDict` copies."""
    for name in TABLES:
        table = getattr(broker, name, None)
        if isinstance(table, dict) and not isinstance(table, SnapshotDict):
            setattr(broker, name, SnapshotDict(table))
