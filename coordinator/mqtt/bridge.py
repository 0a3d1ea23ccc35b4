"""MQTT bridge: device presence and updates in, tasks / acks / job events out.

Uses the project's one MQTT wrapper (``edge_sdk.transport.MqttTransport``: paho 2.2, MQTT 3.1.1, QoS 1,
persistent session, automatic reconnect) under the fixed client id ``fedsight-coordinator``, so updates
published while the coordinator is briefly away are queued by the broker and delivered on reconnect.
The broker address is a parameter (embedded amqtt, Mosquitto, anything MQTT 3.1.1); an ``mqtts://`` broker is
verified against ``tls_ca``.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from edge_sdk.protocol import topics
from edge_sdk.transport import BrokerAddress, MqttTransport

from coordinator.rounds.engine import RoundEngine

log = logging.getLogger(__name__)

COORDINATOR_CLIENT_ID = "fedsight-coordinator"
TransportFactory = Callable[..., MqttTransport]
_STOP = ("", b"")


class MqttBridge:
    """Connects a RoundEngine to a broker and serves as the engine's publisher.

    Updates are handed from paho's network thread to one worker thread through a bounded queue: the
    network thread stays free to PUBACK promptly (amqtt drops a QoS 1 delivery not acked within 5 s) while
    a full queue still pushes back on the broker instead of buffering without limit.
    """

    def __init__(self, engine: RoundEngine, broker: str | BrokerAddress, client_id: str = COORDINATOR_CLIENT_ID,
                 transport_factory: TransportFactory = MqttTransport, queue_size: int = 32,
                 tls_ca: str | Path | None = None) -> None:
        self.engine = engine
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._worker = threading.Thread(target=self._work, name="update-worker", daemon=True)
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.transport = transport_factory(self.address, client_id, self._on_message,
                                           subscriptions=[topics.STATUS_WILDCARD, topics.UPDATE_WILDCARD],
                                           persistent=True, tls_ca=tls_ca)

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
            self.engine.submit(*item)  # never raises

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        return self.transport.publish(topic, payload, qos=qos, retain=retain)

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
            self._queue.put((client_id, payload))
