"""MqttTransport against a real Mosquitto broker (TLS listener): delivery, persistent sessions, last will, TLS."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time

import pytest

from edge_sdk.transport import BrokerAddress, MqttTransport
from tests.support.processes import Mosquitto, child_env, make_pki


def collector() -> tuple[queue.Queue, object]:
    q: queue.Queue = queue.Queue()
    return q, lambda topic, payload: q.put((topic, payload))


def test_broker_address_parsing() -> None:
    assert BrokerAddress.parse("mqtt://127.0.0.1:1999") == BrokerAddress("127.0.0.1", 1999)
    assert BrokerAddress.parse("localhost").port == 1883
    assert BrokerAddress.parse("mqtts://broker.lan") == BrokerAddress("broker.lan", 8883, tls=True)
    assert BrokerAddress.parse("mqtts://10.0.0.2:9883").url() == "mqtts://10.0.0.2:9883"
    assert BrokerAddress.parse("mqtt://h:1").url() == "mqtt://h:1"
    with pytest.raises(ValueError, match="plain MQTT"):
        MqttTransport("mqtt://127.0.0.1:1", "x", lambda *_: None, tls_ca="ca.pem")
    try:
        BrokerAddress.parse("http://x:1")
    except ValueError as exc:
        assert "mqtts://HOST:PORT" in str(exc)
    else:
        raise AssertionError("http scheme accepted")


def test_unreachable_broker_says_what_to_do() -> None:
    t = MqttTransport("mqtt://127.0.0.1:1", "x", lambda *_: None)
    try:
        t.start(timeout=2)
    except ConnectionError as exc:
        assert "cannot reach MQTT broker" in str(exc)
    else:
        raise AssertionError("connected to a closed port")


def test_publish_subscribe_and_persistent_session(mosquitto: Mosquitto) -> None:
    q, handler = collector()
    sub = MqttTransport(mosquitto.url, "t-sub", handler, subscriptions=["t/in"], **mosquitto.login,
                        tls_ca=mosquitto.ca)
    pub = MqttTransport(mosquitto.url, "t-pub", lambda *_: None, **mosquitto.login, tls_ca=mosquitto.ca)
    sub.start(), pub.start()
    blob = bytes(range(256)) * 4096  # 1 MiB binary payload survives intact
    assert pub.publish("t/in", blob, wait=10)
    assert q.get(timeout=10) == ("t/in", blob)
    sub.stop()
    # QoS 1 messages published while the subscriber is offline wait in its persistent session.
    assert pub.publish("t/in", b"while-away", wait=10)
    back = MqttTransport(mosquitto.url, "t-sub", handler, subscriptions=["t/in"], **mosquitto.login,
                         tls_ca=mosquitto.ca)
    back.start()
    assert q.get(timeout=10) == ("t/in", b"while-away")
    back.stop(), pub.stop()


def test_last_will_marks_a_killed_device_offline(mosquitto: Mosquitto) -> None:
    q, handler = collector()
    watcher = MqttTransport(mosquitto.url, "t-watch", handler, subscriptions=["dev/status"], **mosquitto.login,
                            tls_ca=mosquitto.ca)
    watcher.start()
    code = (
        "import sys, time\n"
        "from edge_sdk.transport import MqttTransport\n"
        f"t = MqttTransport({mosquitto.url!r}, 't-dying', lambda *a: None, will=('dev/status', b'offline'),"
        f" keepalive=2, username={mosquitto.tester[0]!r}, password={mosquitto.tester[1]!r},"
        f" tls_ca={str(mosquitto.ca)!r})\n"
        "t.start(); t.publish('dev/status', b'online', retain=True, wait=5); print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=child_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    assert q.get(timeout=10) == ("dev/status", b"online")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    assert q.get(timeout=15) == ("dev/status", b"offline")
    assert time.monotonic() - started < 15
    watcher.stop()


def test_plain_mqtt_to_the_tls_listener_is_refused(mosquitto: Mosquitto) -> None:
    plain = MqttTransport(f"mqtt://127.0.0.1:{mosquitto.port}", "t-plain", lambda *_: None)
    with pytest.raises(ConnectionError, match="did not accept the connection"):
        plain.start(timeout=3)


def test_tls_with_a_foreign_ca_is_refused(mosquitto: Mosquitto, tmp_path) -> None:
    foreign = make_pki(tmp_path / "other-ca")  # valid certificates, but not the CA that signed the broker's
    client = MqttTransport(mosquitto.url, "t-foreign", lambda *_: None, tls_ca=foreign.ca)
    with pytest.raises(ConnectionError, match="TLS handshake .* failed.*CERTIFICATE_VERIFY_FAILED"):
        client.start(timeout=5)
    trusting = MqttTransport(mosquitto.url, "t-trusting", lambda *_: None, **mosquitto.login, tls_ca=mosquitto.ca)
    trusting.start(timeout=10)  # the same broker with the right CA: the refusal was about trust
    trusting.stop()
