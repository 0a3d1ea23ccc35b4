"""A maximum MQTT packet size for the embedded amqtt broker, which has no such setting of its own.

Why: amqtt 0.12.1 reads whatever body length a packet's fixed header announces (up to the protocol's
256 MB), so one client can make the broker buffer and forward a 256 MB message to the coordinator. Mosquitto
has ``max_packet_size``; here the same check is hooked into amqtt's fixed-header parser: a packet that
announces more than the limit closes the connection before a byte of its body is read (as Mosquitto does).

The limit is looked up per packet through a callable, so it can follow the running jobs' limits, and is
keyed by the broker's event loop, so several embedded brokers in one process keep their own limits.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MQTT_OVERHEAD_BYTES = 64 * 1024  # topic name, packet id and slack on top of an update's own size

_limits: dict[asyncio.AbstractEventLoop, Callable[[], int]] = {}
_install_lock = threading.Lock()
_installed = False


class PacketTooLarge(Exception):
    """Not an ``MQTTError`` on purpose: amqtt's reader loop skips those and would then misparse the unread
    body; any other exception ends the connection."""


def set_limit(loop: asyncio.AbstractEventLoop, limit: Callable[[], int] | None) -> None:
    """Bound the packets of the broker running on ``loop`` (None removes the bound)."""
    _install()
    if limit is None:
        _limits.pop(loop, None)
    else:
        _limits[loop] = limit


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        from amqtt.mqtt.packet import MQTTFixedHeader

        original = MQTTFixedHeader.from_stream.__func__  # type: ignore[attr-defined]

        async def from_stream(cls: Any, reader: Any) -> Any:
            header = await original(cls, reader)
            if header is not None:
                try:
                    limit_of = _limits.get(asyncio.get_running_loop())
                except RuntimeError:
                    limit_of = None
                limit = limit_of() if limit_of is not None else None
                if limit is not None and header.remaining_length > limit:
                    log.warning("closing an MQTT connection: packet of %d bytes > max packet size %d",
                                header.remaining_length, limit)
                    raise PacketTooLarge(f"packet of {header.remaining_length} bytes > limit {limit}")
            return header

        MQTTFixedHeader.from_stream = classmethod(from_stream)  # type: ignore[method-assign,assignment]
        _installed = True
