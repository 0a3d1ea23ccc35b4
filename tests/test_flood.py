"""Floods cost the attacker, not the coordinator: junk is counted not stored, accepted and refused bytes stay
apart, per-device rate limits, bounded intake queue, header decoder failures, HTTP body and MQTT packet limits."""
from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests

from coordinator.api.app import MAX_JSON_BYTES, create_app
from coordinator.api.uploads import MAX_WEIGHTS_BYTES
from coordinator.mqtt.bridge import ByteBoundedQueue
from coordinator.rounds import validation as V
from coordinator.rounds.engine import EngineConfig
from coordinator.rounds.rate_limit import RateLimiter
from edge_sdk.protocol import topics
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.wire import MAC_BYTES, MAGIC, V2, decode_update
from edge_sdk.tls import tls_context
from tests.test_validation import Env
from tests.wire_frames import v3_frame, v3_header


def _frame(head: bytes, payload: bytes = b"") -> bytes:
    """A wire v2 frame around JSON ``head`` with a valid CRC (the MAC is never reached: the header fails first)."""
    body = struct.pack("<3sBI", MAGIC, V2, len(head)) + head + payload + b"\x00" * MAC_BYTES
    return body + struct.pack("<I", zlib.crc32(body))


# ------------------------------------------------------------------------------------- header decoding
@pytest.mark.parametrize("head, fragment", [
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (b'{"num_samples": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (json.dumps({"job_id": "j", "round": 1, "client_id": "c", "base_version": "v", "codec": {}, "num_samples": 1,
                 "numel": 1, "metrics": {"loss": 10**400}}).encode(), "not a finite number"),
])
def test_header_decoder_failures_are_protocol_errors(head, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        decode_update(_frame(head))


@pytest.mark.parametrize("head, fragment", [  # wire v3: no nesting, no unbounded numbers; lengths bound it
    (v3_header(metrics=b"\xff" + b"\x00\xff" + b"m" * 255 + b"\x00" * 4), "runs past the header's end"),
    (v3_header(metrics=b"\x01\x01\x00\x00\x80\x7f"), "not a finite number"),
    (b"\xff" * 65_535, "'job_id' is not valid UTF-8"),
])
def test_v3_header_decoder_failures_are_protocol_errors(head, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        decode_update(v3_frame(head))


def test_deeply_nested_header_is_a_malformed_rejection_on_the_update_path(tmp_path):
    env = Env(tmp_path)
    try:
        env.start()
        verdict = env.engine.submit("a", _frame(b"[" * 30_000 + b"]" * 30_000))
        assert verdict.code == V.MALFORMED and "nested" in verdict.reason
        assert env.acks("a")[-1]["code"] == V.MALFORMED
        verdict = env.engine.submit("a", v3_frame(v3_header(metrics=b"\x01\x09" + b"\x00" * 4)))  # v3 likewise
        assert verdict.code == V.MALFORMED and "unknown metric tag 9" in verdict.reason
        assert env.acks("a")[-1]["code"] == V.MALFORMED
    finally:
        env.engine.shutdown()
        env.store.close()


# --------------------------------------------------------------------------------- junk accounting
def test_junk_is_counted_not_stored_and_uplink_counts_accepted_updates_only(tmp_path):
    env = Env(tmp_path, max_update_bytes=64 * 1024)
    try:
        rnd = env.start()
        rng = np.random.default_rng(0)
        junk = [b"\x00" * (65 * 1024)] + [rng.bytes(int(n)) for n in rng.integers(10, 4000, size=200)]
        junk.append(env.message("a", np.zeros(env.numel, np.float32), key=b"stolen? " * 4))
        for raw in junk:
            assert env.engine.submit("a", raw).code in V.UNAUTHENTICATED
        stale = env.message("b", np.zeros(env.numel, np.float32), round=7)  # authenticated but wrong round
        assert env.engine.submit("b", stale).code == V.STALE_ROUND
        good = {c: env.message(c, rng.normal(size=env.numel).astype(np.float32)) for c in "abc"}
        for c, raw in good.items():
            assert env.engine.submit(c, raw).accepted
        assert env.engine.wait_idle("job-t", 10)

        rows = env.store.list_updates("job-t")  # 3 accepted + the authenticated stale one; no junk rows
        assert sorted((r["client_id"], r["status"]) for r in rows) == [("a", "accepted"), ("b", "accepted"),
                                                                        ("b", "rejected"), ("c", "accepted")]
        (r1,) = env.store.get_rounds("job-t")
        accepted_bytes = sum(len(raw) for raw in good.values())
        assert r1["junk"] == len(junk) and r1["junk_bytes"] == sum(len(j) for j in junk)
        assert r1["uplink_bytes"] == accepted_bytes
        assert r1["compression_ratio"] == pytest.approx(4.0 * env.numel / (accepted_bytes / 3))
        traffic = env.store.job_traffic("job-t")
        assert traffic["junk"] == len(junk) and traffic["uplink_bytes"] == accepted_bytes
        assert rnd.junk == len(junk)
    finally:
        env.engine.shutdown()
        env.store.close()


def test_demo_rows_keep_rejected_bytes_out_of_the_compression_ratio():
    from coordinator.cli.demo import _round_rows

    numel = 1000
    rows = [{"round": 1, "attempt": 1, "status": "closed", "accepted": 9, "rejected": 1, "junk": 562,
             "uplink_bytes": 9 * 40, "rejected_bytes": 40, "junk_bytes": 64 << 20, "eval": {"accuracy": 0.99}}]
    (rec,) = _round_rows(rows, numel)
    assert rec["dense_bytes"] / rec["uplink_bytes"] == pytest.approx(100.0)  # like for like: accepted only
    assert rec["rejected_bytes"] == 40 + (64 << 20) and rec["junk"] == 562


# ------------------------------------------------------------------------------------------ rate limit
def test_token_bucket_refills_and_evicts():
    now = [0.0]
    rl = RateLimiter(rate_per_s=2.0, burst=3, max_clients=2, clock=lambda: now[0])
    assert [rl.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    assert rl.allow("a") == (False, False, pytest.approx(0.5))  # second refusal: not 'first' any more
    now[0] += 0.5
    assert rl.allow("a")[0] and not rl.allow("a")[0]
    rl.allow("b")
    rl.allow("c")  # evicts the least recently used ('a'): the table never grows past max_clients
    assert len(rl._buckets) == 2 and "a" not in rl._buckets


def test_flooding_device_is_rate_limited_with_a_readable_code_and_one_ack(tmp_path):
    env = Env(tmp_path)
    env.engine.config = EngineConfig(update_rate_per_s=0.001, update_burst=3)
    from coordinator.rounds.rate_limit import RateLimiter as RL
    env.engine.rate_limiter = RL(0.001, 3)
    try:
        rnd = env.start()
        verdicts = [env.engine.submit("a", b"junk" * 10) for _ in range(50)]
        assert [v.code for v in verdicts[:3]] == [V.MALFORMED] * 3
        assert all(v.code == V.RATE_LIMITED for v in verdicts[3:])
        assert "retry in" in verdicts[3].reason
        acks = env.acks("a")
        assert [a["code"] for a in acks] == [V.MALFORMED] * 3 + [V.RATE_LIMITED]  # the flood buys one ack
        assert rnd.junk == 50 and env.store.list_updates("job-t") == []
        # another device is unaffected
        assert env.engine.submit("b", env.message("b", np.ones(env.numel, np.float32))).accepted
    finally:
        env.engine.shutdown()
        env.store.close()


# ------------------------------------------------------------------------------------------ intake queue
def test_intake_queue_is_bounded_in_bytes():
    q = ByteBoundedQueue(max_bytes=1000)
    q.put(("a", b"x" * 600))
    done = threading.Event()

    def second() -> None:
        q.put(("b", b"y" * 600))
        done.set()

    threading.Thread(target=second, daemon=True).start()
    assert not done.wait(0.3) and q.bytes == 600  # would exceed the budget: the producer waits
    assert q.get()[0] == "a"
    assert done.wait(5) and q.bytes == 600
    q.get()
    q.put(("big", b"z" * 5000))  # larger than the budget, but alone: admitted
    assert q.get()[0] == "big" and q.bytes == 0


# ------------------------------------------------------------------------------------------ HTTP bodies
class _Unreadable(io.RawIOBase):
    def read(self, *_a):  # noqa: D401 - proves the limit fires before anything reads the body
        raise AssertionError("the body was read")


def test_oversize_content_length_is_refused_before_the_body_is_read(tmp_path):
    app = create_app({"data_dir": tmp_path, "evaluate": False})
    status, body = _call(app, "/api/v1/jobs", _Unreadable(), CONTENT_LENGTH=str(1 << 30))  # type: ignore[arg-type]
    assert status.startswith("413") and "limit" in json.loads(body)["error"]


def test_only_a_multipart_job_gets_the_upload_body_limit(tmp_path):
    app = create_app({"data_dir": tmp_path, "evaluate": False})
    multipart = "multipart/form-data; boundary=x"
    cases = [("/api/v1/clients", multipart, MAX_JSON_BYTES + 1),  # an upload limit only where uploads go
             ("/api/v1/jobs", "application/json", MAX_JSON_BYTES + 1),  # a JSON job keeps the small limit
             ("/api/v1/jobs", multipart, MAX_WEIGHTS_BYTES + 1)]
    for path, ctype, size in cases:
        status, body = _call(app, path, _Unreadable(), CONTENT_TYPE=ctype,  # type: ignore[arg-type]
                             CONTENT_LENGTH=str(size))
        assert status.startswith("413") and f"{size} bytes" in json.loads(body)["error"], (path, ctype)
    job = (b'--x\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"model": {"arch": "small_cnn"}}\r\n'
           b'--x\r\nContent-Disposition: form-data; name="weights"; filename="w.pt"\r\n'
           b"Content-Type: application/octet-stream\r\n\r\n" + b"w" * MAX_JSON_BYTES + b"\r\n--x--\r\n")
    token = app.extensions["fedsight"].credentials.path("operator-token").read_text().strip()
    status, body = _call(app, "/api/v1/jobs", io.BytesIO(job), CONTENT_TYPE=multipart, CONTENT_LENGTH=str(len(job)),
                         HTTP_AUTHORIZATION=f"Bearer {token}")
    assert status.startswith("400") and "not a state_dict" in json.loads(body)["error"]  # over 1 MiB, read by the app


def _call(app, path: str, body: io.BytesIO, **extra: str) -> tuple[str, bytes]:
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "CONTENT_TYPE": "application/json", "wsgi.input": body,
           "SERVER_NAME": "h", "SERVER_PORT": "1", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
           "wsgi.errors": io.StringIO(), **extra}
    status: list[str] = []
    out = b"".join(app(env, lambda s, h, *a: status.append(s)))
    return status[0], out


def test_chunked_body_without_length_is_capped(tmp_path):
    app = create_app({"data_dir": tmp_path, "evaluate": False})
    big = io.BytesIO(b" " * (MAX_JSON_BYTES + 4096))
    status, _ = _call(app, "/api/v1/jobs", big, HTTP_TRANSFER_ENCODING="chunked")
    assert status.startswith("413") and big.tell() <= MAX_JSON_BYTES + 1  # stopped reading at the limit
    secret = app.extensions["fedsight"].credentials.path("enroll-secret").read_text().strip()
    body = json.dumps({"name": "d", "enroll_secret": secret}).encode()
    status, out = _call(app, "/api/v1/clients", io.BytesIO(body), HTTP_TRANSFER_ENCODING="chunked")
    assert status.startswith("201"), out


def _raw_http(port: int, request: bytes, ca: object) -> bytes:
    """One raw request over HTTPS (verified against ``ca``), so nothing in between buffers or trims it."""
    ctx = tls_context(str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(request)
        return s.recv(4096)


def test_real_server_refuses_big_bodies_and_embedded_broker_cuts_oversize_packets(tmp_path):
    import paho.mqtt.client as mqtt

    from coordinator.server import start

    handle = start("127.0.0.1", 0, tmp_path, "embedded", broker_port=0, evaluate=False)
    try:
        t0 = time.monotonic()
        reply = _raw_http(handle.port, b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1073741824\r\n\r\n{", handle.ca_file)
        assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 5  # answered without the GiB

        limit = handle.engine.update_size_limit()
        assert limit == 64 << 20  # no job running: the default job limit
        secret = handle.services.credentials.path("enroll-secret").read_text().strip()
        dev = requests.post(f"{handle.url}/api/v1/clients", json={"enroll_secret": secret}, timeout=5,
                            verify=str(handle.ca_file)).json()
        dropped = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=topics.device_mqtt_id(dev["client_id"]))
        c.username_pw_set(dev["mqtt_username"], dev["mqtt_password"])  # a registered device (ACLs are on)
        c.tls_set_context(tls_context(str(handle.ca_file)))  # mqtts by default
        c.on_disconnect = lambda *a: dropped.set()
        c.connect("127.0.0.1", int(handle.broker_url.rsplit(":", 1)[1]))
        c.loop_start()
        try:
            c.publish(topics.update_topic(dev["client_id"]), b"x" * 1024, qos=0).wait_for_publish(5)
            time.sleep(0.3)
            assert not dropped.is_set()  # a normal message passes
            header = bytes([0x30]) + _remaining_length(limit + (1 << 20))
            c.socket().sendall(header + b"t")  # announce an oversize PUBLISH; send (almost) none of it
            assert dropped.wait(10), "the broker kept an oversize packet's connection open"
        finally:
            c.loop_stop()
    finally:
        handle.stop()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_mosquitto_fixture_has_a_max_packet_size(tmp_path):
    import paho.mqtt.client as mqtt

    from tests.support.processes import Mosquitto, make_pki

    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "m", pki, max_packet_size=10_000)
    try:
        dropped = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="big")
        c.username_pw_set(*broker.tester)  # anonymous clients are refused; the tester may use t/#
        c.tls_set_context(tls_context(str(pki.ca)))  # the fixture's only listener is TLS
        c.on_disconnect = lambda *a: dropped.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        try:
            c.publish("t/big", b"x" * 5000, qos=1).wait_for_publish(5)
            assert not dropped.is_set()
            c.publish("t/big", b"x" * 20_000, qos=0)
            assert dropped.wait(10)
        finally:
            c.loop_stop()
    finally:
        broker.stop()


def test_broker_tables_iterate_over_snapshots():
    from coordinator.mqtt.broker import EmbeddedBroker
    from coordinator.mqtt.broker_tables import TABLES, SnapshotDict

    d = SnapshotDict({"a": 1, "b": 2})
    for key in d:  # amqtt adds/removes subscriptions while its loops await: no RuntimeError
        d[key + "x"] = 0
        d.pop("b", None)
    for _k, _v in d.items():
        d.clear()
    assert d == {}
    with EmbeddedBroker(port=0) as broker:
        assert all(isinstance(getattr(broker._broker, t), SnapshotDict) for t in TABLES)
