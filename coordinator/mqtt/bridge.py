"""MQTT bridge: device presence and updates in, tasks / acks / job events out.

Uses the project's one MQTT wrapper (``edge_sdk.transport.MqttTransport``: paho 2.2, MQTT 3.1.1, QoS 1,
persistent session, automatic reconnect) under the fixed client id ``fedsight-coordinator``, so updates
published while the coordinator is briefly away are queued by the broker and delivered on reconnect.
The broker address is a parameter (embedded amqtt, Mosquitto, anything MQTT 3.1.1); ``username``/``password``
are the coordinator's own broker identity (``accounts.coordinator_credentials``); an ``mqtts://`` broker is
verified against ``tls_ca``.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from edge_sdk.protocol import topics
from edge_sdk.transport import BrokerAddress, MqttTransport

from coordinator.mqtt.accounts import COORDINATOR_CLIENT_ID
from coordinator.rounds.engine import RoundEngine

log = logging.getLogger(__name__)

TransportFactory = Callable[..., MqttTransport]
_STOP = ("", b"")
DEFAULT_QUEUE_BYTES = 128 << 20


class ByteBoundedQueue:
    """FIFO bounded by the total bytes it holds, not by a count of items.

    A count bound lets 32 queued messages of 256 MiB each hold 8 GiB. Here ``put`` blocks while the queued
    bytes plus the new message would exceed ``max_bytes``; one message is always admitted into an empty
    queue, so a single message larger than the budget still gets through (alone).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: deque[tuple[str, bytes]] = deque()
        self._cond = threading.Condition()

    def put(self, item: tuple[str, bytes]) -> None:
        size = len(item[1])
        with self._cond:
            while self._items and self.bytes + size > self.max_bytes:
                self._cond.wait()
            self._items.append(item)
            self.bytes += size
            self._cond.notify_all()

    def get(self) -> tuple[str, bytes]:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self.bytes -= len(item[1])
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class MqttBridge:
    """Connects a RoundEngine to a broker and serves as the engine's publisher.

    Updates are handed from paho's network thread to one worker thread through a queue bounded in bytes
    (``max_queue_bytes``): the network thread stays free to PUBACK promptly (amqtt drops a QoS 1 delivery
    not acked within 5 s) while a full queue still pushes back on the broker instead of buffering without
    limit. Rate-limited and oversize messages are refused on the network thread (``engine.screen``: a
    lookup, no parsing) and never take queue space.
    """

    def __init__(self, engine: RoundEngine, broker: str | BrokerAddress, client_id: str = COORDINATOR_CLIENT_ID,
                 transport_factory: TransportFactory = MqttTransport,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | Path | None = None) -> None:
        self.engine = engine
        self._queue = ByteBoundedQueue(max_queue_bytes)
        self._worker = threading.Thread(target=self._work, name="update-worker", daemon=True)
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.transport = transport_factory(self.address, client_id, self._on_message,
                                           subscriptions=[topics.STATUS_WILDCARD, topics.UPDATE_WILDCARD,
                                                          topics.SECAGG_WILDCARD],
                                           persistent=True, username=username, password=password,
                                           on_connect=self._on_connected, tls_ca=tls_ca)

    @property
    def connected(self) -> bool:
        return self.transport.connected

    def start(self, timeout: float = 15.0) -> None:
        """Connect (raises ConnectionError if the broker is unreachable) and route the engine's output here."""
        self._worker.start()
        self.transport.start(timeout)
        self.engine.publisher = self
        log.info("MQTT bridge connected to %s", self.address.url())

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.transport.stop()
        except Exception:  # noqa: BLE001 - shutting down; nothing useful to do
            log.debug("error while disconnecting the bridge", exc_info=True)
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self.engine.submit(*item, screened=True)  # never raises

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        return self.transport.publish(topic, payload, qos=qos, retain=retain)

    def _on_connected(self) -> None:
        """After every (re)connect ask all devices to re-announce: with the re-subscription's retained statuses
        this rebuilds presence even when a restarted broker lost its retained messages or fired stale wills."""
        self.transport.publish(topics.PRESENCE_QUERY, b"", qos=1, retain=False)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Runs on paho's network thread; ``engine.submit`` never raises, so neither does this."""
        try:
            client_id, kind = topics.parse_client_topic(topic)
        except ValueError:
            log.debug("ignoring message on %s", topic)
            return
        if kind == topics.STATUS:
            self.engine.on_status(client_id, payload)
        elif kind == topics.UPDATE:
            if self.engine.screen(client_id, len(payload)) is None:
                self._queue.put((client_id, payload))
        elif kind == topics.SECAGG:  # small frames, filed with one HMAC check: no queue needed; same rate limit
            if self.engine.screen(client_id, len(payload)) is None:
                self.engine.submit_secagg(client_id, payload)
