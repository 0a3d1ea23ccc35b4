"""Where the engine sends tasks, acks and events: the MQTT bridge in production, or one of these stand-ins.

Why its own module: the engine depends only on the ``Publisher`` protocol, so tests and a REST-only app can run a
real engine with no broker.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Protocol


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool: ...


class NullPublisher:
    """Drops everything (an engine without MQTT, e.g. a REST-only test app)."""

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        return True


class MemoryPublisher:
    """Records publishes in order; tests read ``messages`` or ``json_on(topic)``."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        with self._lock:
            self.messages.append((topic, payload.encode() if isinstance(payload, str) else bytes(payload)))
        return True

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p in self.messages if t == topic]
