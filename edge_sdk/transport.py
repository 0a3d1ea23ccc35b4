"""MQTT transport for devices and the coordinator: QoS 1, persistent sessions, automatic reconnect.

A thin layer over paho-mqtt so the rest of the code never touches paho directly: subscriptions are
re-established on every reconnect, a last-will marks the device offline, and large publishes can be
awaited so a caller knows its update left the device.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from .tls import tls_context

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """``mqtts://host:port`` (TLS, default port 8883), ``mqtt://host:port`` (plain, 1883) or ``host:port``
        -> address; ValueError with a hint otherwise."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "tcp", "mqtts") or not parsed.hostname:
            raise ValueError(f"broker URL {url!r} not understood: use mqtts://HOST:PORT (or mqtt:// without TLS)")
        tls = parsed.scheme == "mqtts"
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)

    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class BrokerRefused(ConnectionError):
    """The broker answered the CONNECT with a refusal (wrong or revoked credentials, client id not ours)."""


class MqttTransport:
    """One MQTT connection with a fixed subscription set and a single message callback.

    ``username``/``password``: the broker identity (devices get theirs at registration); brokers run with
    ACLs refuse anonymous connections. An ``mqtts://`` broker is verified against ``tls_ca`` (a PEM CA file,
    e.g. the coordinator's ``ca.pem``; None: the system's trusted CAs), with hostname checking: the broker's
    certificate must name the host in the URL.
    """

    def __init__(self, broker: str | BrokerAddress, client_id: str, on_message: MessageHandler,
                 subscriptions: Iterable[str] = (), will: tuple[str, bytes] | None = None,
                 persistent: bool = True, keepalive: int = 30, username: str | None = None,
                 password: str | None = None, tls_ca: str | Path | None = None,
                 on_connect: Callable[[], None] | None = None, max_reconnect_delay: float = 2.0) -> None:
        self.broker = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        if tls_ca is not None and not self.broker.tls:
            raise ValueError(f"tls_ca given but {self.broker.url()} is plain MQTT; use mqtts://")
        self._subs = list(subscriptions)
        self._handler = on_message
        self._connect_hook = on_connect  # runs after every (re)connect, once subscriptions are re-sent
        self._connected = threading.Event()
        self._refused: str | None = None  # the broker's reason when it turned the CONNECT down
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=not persistent, protocol=mqtt.MQTTv311)
        self._client.max_inflight_messages_set(20)
        # A short cap keeps recovery after a broker restart within a few seconds (issue 10: <= 5 s).
        self._client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(max_reconnect_delay)))
        if username is not None:  # the broker account registration handed out (brokers that enforce ACLs)
            self._client.username_pw_set(username, password)
        if self.broker.tls:
            self._client.tls_set_context(tls_context(tls_ca))
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._keepalive = keepalive

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; raises ConnectionError if the broker is unreachable."""
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except ssl.SSLError as exc:
            raise ConnectionError(f"TLS handshake with MQTT broker {self.broker.url()} failed: {exc}. Is the CA "
                                  "file the one that signed the broker's certificate, and does it name "
                                  f"{self.broker.host}?") from exc
        except OSError as exc:
            raise ConnectionError(f"cannot reach MQTT broker at {self.broker.url()}: {exc}. "
                                  "Is the coordinator (or Mosquitto) running?") from exc
        self._refused = None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused is not None or time.monotonic() > deadline:
                self.stop()
                if self._refused is None:
                    hint = "" if self.broker.tls else " (a TLS listener? then use mqtts://)"
                    raise ConnectionError(f"MQTT broker at {self.broker.url()} did not accept the connection{hint}")
                raise BrokerRefused(f"MQTT broker at {self.broker.url()} refused the connection ({self._refused}); "
                                    "check the broker username/password")

    def stop(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                wait: float | None = None) -> bool:
        """Publish; with ``wait`` block until the broker acknowledged it (QoS 1) or time ran out."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            return False
        if wait is not None:
            try:
                info.wait_for_publish(timeout=wait)
            except (RuntimeError, ValueError) as exc:
                log.warning("publish to %s not confirmed: %s", topic, exc)
                return False
            return info.is_published()
        return True

    def add_subscription(self, topic: str) -> None:
        if topic not in self._subs:
            self._subs.append(topic)
            if self.connected:
                self._client.subscribe(topic, qos=1)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object = None) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            log.error("MQTT connection refused: %s", reason)
            return
        for topic in self._subs:
            client.subscribe(topic, qos=1)
        self._connected.set()
        log.debug("connected to %s", self.broker.url())
        if self._connect_hook is not None:
            try:
                self._connect_hook()
            except Exception:  # a hook bug must never kill the network thread
                log.exception("on_connect hook failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object = None) -> None:
        self._connected.clear()
        log.info("disconnected from MQTT broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, msg.payload)
        except Exception:  # a handler bug must never kill the network thread
            log.exception("message handler failed for topic %s", msg.topic)

