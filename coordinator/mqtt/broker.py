"""Embedded MQTT 3.1.1 broker (amqtt 0.12.1) on its own asyncio loop in a background thread.

For demos and single-machine deployments, so nothing but Python is needed; production deployments point
the coordinator at Mosquitto instead. amqtt has no configurable maximum packet size (it reads whatever
the MQTT remaining-length field announces, up to the protocol's 256 MB); ``max_packet_bytes`` adds one
(``coordinator.mqtt.packet_limit``), which the server points at the running jobs' update limit. We also trim
the default plugin set: the per-packet logger and the $SYS publisher cost time on large payloads and are of
no use here. With ``accounts`` (what the coordinator always passes) the broker refuses anonymous clients and
enforces the FedSight ACLs (``embedded_acl.py``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import Future
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coordinator.mqtt import packet_limit
from coordinator.mqtt.broker_tables import snapshot_tables

if TYPE_CHECKING:
    from coordinator.mqtt.embedded_acl import EmbeddedAccounts

log = logging.getLogger(__name__)

MQTT_MAX_PACKET_BYTES = 268_435_455  # protocol limit of the remaining-length field (MQTT 3.1.1, 2.2.3)


class EmbeddedBroker:
    """``EmbeddedBroker(port=0).start()`` -> listening on ``self.port``; ``stop()`` shuts it down cleanly."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, allow_anonymous: bool = True,
                 max_packet_bytes: int | Callable[[], int] | None = None,
                 accounts: EmbeddedAccounts | None = None, tls: tuple[str, str] | None = None) -> None:
        self.host = host
        # an int, or a callable read per packet (bytes after the fixed header); None: the protocol's 256 MB
        self.max_packet_bytes = max_packet_bytes
        self.port = port
        self.allow_anonymous = allow_anonymous
        self.accounts = accounts  # set: identities + ACLs enforced, allow_anonymous ignored
        self.tls = tls  # (certfile, keyfile): the listener speaks only MQTT over TLS (mqtts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _config(self, port: int) -> dict[str, Any]:
        if self.accounts is not None:
            from coordinator.mqtt.embedded_acl import plugin_config

            plugins = plugin_config(self.accounts)
        else:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": self.allow_anonymous}}
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{port}", "max_connections": 0}
        if self.tls is not None:
            listener.update(ssl=True, certfile=str(self.tls[0]), keyfile=str(self.tls[1]))
        return {
            "listeners": {"default": listener},
            "plugins": plugins,
        }

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if self._thread is not None:
            raise RuntimeError("broker already started")
        port = self.port or _free_port(self.host)
        ready: Future[None] = Future()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start(port))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller of start()
                ready.set_exception(exc)
                self._loop.close()
                return
            ready.set_result(None)
            try:
                self._loop.run_forever()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout)
        except Exception as exc:
            self._thread.join(1.0)
            self._thread = None
            raise RuntimeError(f"embedded MQTT broker could not start on {self.host}:{port}: {exc}") from exc
        self.port = port
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    async def _start(self, port: int) -> None:
        from coordinator.mqtt.embedded_acl import GuardedBroker

        loop = asyncio.get_running_loop()
        limit = self.max_packet_bytes
        if limit is not None:
            packet_limit.set_limit(loop, limit if callable(limit) else (lambda: int(limit)))
        self._broker = GuardedBroker(self._config(port), loop=loop)
        snapshot_tables(self._broker)  # amqtt iterates these across awaits; see broker_tables.py
        await self._broker.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        if self._broker is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except Exception as exc:  # noqa: BLE001 - stop anyway
                log.warning("embedded broker shutdown was not clean: %s", exc)
            loop.call_soon_threadsafe(_cancel_all_and_stop, loop)
        self._thread.join(timeout)
        packet_limit.set_limit(loop, None)
        self._thread = None
        self._broker = None
        log.info("embedded MQTT broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cancel_all_and_stop(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.call_soon(loop.stop)


def _free_port(host: str) -> int:
    """An ephemeral port that was free a moment ago (amqtt cannot report a port it bound to 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
