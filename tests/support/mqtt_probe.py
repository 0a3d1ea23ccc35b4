"""A raw paho client for ACL tests: records the CONNACK, SUBACK reason codes and every message it receives."""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_sdk.tls import tls_context
from edge_sdk.transport import BrokerAddress


class Probe:
    """Connects once (no automatic reconnect) and keeps what the broker answered."""

    def __init__(self, url: str, client_id: str, username: str | None = None, password: str | None = None,
                 mqtt5: bool = False, will: tuple[str, bytes] | None = None, clean: bool = True,
                 tls_ca: str | Path | None = None) -> None:
        address = BrokerAddress.parse(url)
        self.mqtt5 = mqtt5
        kwargs = {} if mqtt5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311, **kwargs)
        if username is not None:
            self.client.username_pw_set(username, password)
        if address.tls:  # mqtts: verified against the test CA, as devices do
            self.client.tls_set_context(tls_context(tls_ca))
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []  # messages wait_for skipped over
        self.connack: mqtt.ReasonCode | None = None
        self.subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self.disconnected = threading.Event()
        self._answered = threading.Event()
        self._sub_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.pubacks: dict[int, mqtt.ReasonCode] = {}  # mid -> PUBACK reason (MQTT 5 says why a publish was dropped)
        self.client.on_publish = lambda _c, _u, mid, reason, _p=None: self.pubacks.__setitem__(mid, reason)
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        if not self._answered.wait(10):
            raise TimeoutError("no CONNACK in 10 s")

    def _on_connect(self, _c: object, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object = None) -> None:
        if self.connack is None:
            self.connack = reason
        self._answered.set()
        if reason.is_failure:
            self.client.disconnect()

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list[mqtt.ReasonCode], _p: object = None) -> None:
        with self._sub_cond:
            self.subacks[mid] = codes
            self._sub_cond.notify_all()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *filters: str) -> list[mqtt.ReasonCode]:
        """Subscribe and return the SUBACK reason codes, one per filter."""
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        with self._sub_cond:
            if not self._sub_cond.wait_for(lambda: mid in self.subacks, 10):
                raise TimeoutError("no SUBACK in 10 s")
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> mqtt.ReasonCode | None:
        """Publish at QoS 1 and return the PUBACK's reason code (None when the broker closed the connection)."""
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(10)
        except RuntimeError:
            return None
        return self.pubacks.get(info.mid) if info.is_published() else None

    def drop(self) -> None:
        """Vanish without DISCONNECT, so the broker sends the last will."""
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self.client.loop_stop()

    def drain(self, settle: float = 0.5) -> list[tuple[str, bytes]]:
        """Everything received so far, after waiting ``settle`` s for stragglers."""
        time.sleep(settle)
        got, self.seen = self.seen, []
        while not self.messages.empty():
            got.append(self.messages.get_nowait())
        return got

    def wait_for(self, topic: str, timeout: float = 10.0) -> bytes:
        """The next message on ``topic`` (others received meanwhile are kept in ``self.seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing on {topic} in {timeout} s")
            try:
                got_topic, payload = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if got_topic == topic:
                return payload
            self.seen.append((got_topic, payload))

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
