"""TLS overhead: what HTTPS and mqtts cost next to plain HTTP and MQTT, on loopback.

The coordinator's own HTTP server (cheroot) and embedded broker (amqtt), each once with and once without the
certificates `fedsight certs` makes (ECDSA P-256): new-connection and keep-alive request latency, a 16 MB
download (a mobilenet-sized model), and a 1 MB MQTT message publish-to-delivery (a dense small_cnn-sized update
is 0.1 MB; top-k updates are KBs).

    python benchmarks/tls_overhead.py
"""
from __future__ import annotations

import json
import queue
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402
from coordinator.api.http_server import HttpServer  # noqa: E402
from coordinator.mqtt.broker import EmbeddedBroker  # noqa: E402
from coordinator.security.certs import ServerTls, ensure_server_cert  # noqa: E402
from edge_sdk.transport import MqttTransport  # noqa: E402

BLOB = bytes(16 << 20)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    body = BLOB if environ["PATH_INFO"] == "/blob" else b"ok"
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return iter([body])


def median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def http_case(tls: ServerTls | None) -> dict[str, float]:
    server = HttpServer(app, "127.0.0.1", 0, tls=tls).start()
    url = f"{server.scheme}://127.0.0.1:{server.port}"
    verify = str(tls.ca) if tls else True
    try:
        fresh = median_ms(lambda: requests.get(f"{url}/ping", verify=verify, timeout=30).raise_for_status(), 50)
        with requests.Session() as s:
            s.get(f"{url}/ping", verify=verify, timeout=30)
            warm = median_ms(lambda: s.get(f"{url}/ping", verify=verify, timeout=30).raise_for_status(), 200)
            blob = median_ms(lambda: s.get(f"{url}/blob", verify=verify, timeout=60).content, 5)
        protocol = _protocol(server.port, tls)
    finally:
        server.stop()
    return {"new_connection_ms": fresh, "keepalive_request_ms": warm, "download_16mb_ms": blob,
            "download_mb_per_s": 16 / (blob / 1000), "protocol": protocol}


def _protocol(port: int, tls: ServerTls | None) -> str:
    """The TLS version a default client negotiates with the server (what devices get)."""
    if tls is None:
        return "plain"
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return str(s.version())


def mqtt_case(tls: ServerTls | None) -> dict[str, float]:
    broker = EmbeddedBroker("127.0.0.1", 0, tls=(str(tls.cert), str(tls.key)) if tls else None).start()
    got: queue.Queue[bytes] = queue.Queue()
    ca = tls.ca if tls else None
    try:
        connect = median_ms(lambda: _connect_and_stop(broker.url, ca), 10)
        sub = MqttTransport(broker.url, "bench-sub", lambda _t, p: got.put(p), subscriptions=["b/x"], tls_ca=ca)
        pub = MqttTransport(broker.url, "bench-pub", lambda *_: None, tls_ca=ca)
        sub.start(), pub.start()
        payload = bytes(1 << 20)

        def roundtrip() -> None:
            pub.publish("b/x", payload, wait=30)
            got.get(timeout=30)

        roundtrip()
        one_mb = median_ms(roundtrip, 20)
        sub.stop(), pub.stop()
    finally:
        broker.stop()
    return {"connect_ms": connect, "publish_1mb_delivered_ms": one_mb}


def _connect_and_stop(url: str, ca: Path | None) -> None:
    t = MqttTransport(url, "bench-conn", lambda *_: None, tls_ca=ca, persistent=False)
    t.start()
    t.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tls = ensure_server_cert(Path(tmp))
        result = {"http": http_case(None), "https": http_case(tls), "mqtt": mqtt_case(None), "mqtts": mqtt_case(tls)}
    out = ROOT / "benchmarks" / "results" / "tls_overhead.json"
    out.write_text(json.dumps(result, indent=2))
    h, s, m, t = result["http"], result["https"], result["mqtt"], result["mqtts"]
    lines = ["| | plain | TLS |", "| --- | --- | --- |",
             f"| REST request on a new connection (median of 50) | {h['new_connection_ms']:.1f} ms | "
             f"{s['new_connection_ms']:.1f} ms |",
             f"| REST request on a kept-alive connection (median of 200) | {h['keepalive_request_ms']:.2f} ms | "
             f"{s['keepalive_request_ms']:.2f} ms |",
             f"| 16 MB model download (median of 5) | {h['download_16mb_ms']:.0f} ms "
             f"({h['download_mb_per_s']:.0f} MB/s) | {s['download_16mb_ms']:.0f} ms "
             f"({s['download_mb_per_s']:.0f} MB/s) |",
             f"| MQTT connect (median of 10) | {m['connect_ms']:.1f} ms | {t['connect_ms']:.1f} ms |",
             f"| 1 MB MQTT message, publish to delivery (median of 20) | {m['publish_1mb_delivered_ms']:.1f} ms | "
             f"{t['publish_1mb_delivered_ms']:.1f} ms |",
             "", "cheroot (HTTP) and amqtt (MQTT) on loopback, ECDSA P-256 certificates from `fedsight certs`, "
             f"{s['protocol']}. Devices keep one MQTT connection and one HTTP session, so the handshake is paid "
             "once per device start, not per round."]
    write_section("tls_overhead", "TLS overhead", "python benchmarks/tls_overhead.py", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
