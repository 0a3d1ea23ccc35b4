"""Wire format v3 (MAC-signed; v2 still decoded), FSM1 model files and topic layout: round trips and hostile input.

The v3 header's own byte table, encoder refusals and v2 compatibility: tests/test_wire_v3.py."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol import topics
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.modelfile import dump_model, flatten, float_layout, load_model, sha256_hex, unflatten
from edge_sdk.protocol.wire import MAC_BYTES, UpdateHeader, decode_update, encode_update, verify_update
from tests.wire_frames import v2_frame, v3_frame, v3_header

KEY = bytes(range(32))
MAC = b"\x00" * MAC_BYTES


def header(**kw: object) -> UpdateHeader:
    base = dict(job_id="job1", round=3, client_id="dev-1", base_version="ab" * 32,
                codec_digest=codec_digest({"name": "dense", "dtype": "float32"}), num_samples=17, numel=4,
                metrics={"loss": 0.5}, attempt=2)
    base.update(kw)
    return UpdateHeader(**base)  # type: ignore[arg-type]


@given(payload=st.binary(max_size=4096), rnd=st.integers(0, 10**6), n=st.integers(1, 10**6))
@settings(max_examples=60, deadline=None)
def test_update_round_trip(payload: bytes, rnd: int, n: int) -> None:
    h = header(round=rnd, num_samples=n)
    raw = encode_update(h, payload, KEY)
    got_h, got_p = decode_update(raw)
    assert got_h == h and got_p == payload
    assert verify_update(raw, KEY)


def reframe(body: bytes) -> bytes:
    """Re-append a valid CRC so a test reaches the checks behind it."""
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m[:-1], "checksum"),
    (lambda m: m[:5], "truncated"),
    (lambda m: b"XXX" + m[3:], "magic"),
    (lambda m: m[:3] + b"\x07" + m[4:], "unsupported wire version"),
    (lambda m: m[:20] + bytes([m[20] ^ 0xFF]) + m[21:], "checksum"),
    (lambda m: reframe(m[:4] + struct.pack("<H", 60_000) + m[6:-4]), "header length"),
    (lambda m: reframe(m[:4] + struct.pack("<H", 40) + m[6:-4]), "runs past the header's end"),
    (lambda m: reframe(m[:4] + struct.pack("<H", struct.unpack_from("<H", m, 4)[0] + 3) + m[6:-4]),
     "does not match its fields"),
    (lambda m: v2_frame(b"{x}", b"payload"), "not valid JSON"),  # a v2 frame: its JSON header
    (lambda m: v2_frame(b"[]"), "JSON object"),
])
def test_hostile_messages_rejected_with_reason(mutate, reason: str) -> None:
    good = encode_update(header(), b"\x00" * 16, KEY)
    with pytest.raises(ProtocolError, match=reason):
        decode_update(mutate(good))


def test_header_field_types_checked() -> None:
    with pytest.raises(ProtocolError, match="num_samples"):  # the encoder refuses what the decoder would
        encode_update(header(num_samples=0), b"", KEY)
    with pytest.raises(ProtocolError, match="num_samples"):
        decode_update(v3_frame(v3_header(num_samples=0), key=KEY))
    with pytest.raises(ProtocolError, match="job_id"):
        decode_update(v2_frame(b'{"job_id":1}'))


def test_oversize_rejected_before_parsing() -> None:
    msg = encode_update(header(), b"\x00" * 2000, KEY)
    with pytest.raises(ProtocolError, match="too large"):
        decode_update(msg, max_bytes=1000)


def test_non_finite_metric_rejected() -> None:
    for bits in (struct.pack("<f", float("nan")), struct.pack("<f", float("inf")), b"\x00\x00\x80\xff"):
        with pytest.raises(ProtocolError, match="finite"):
            decode_update(v3_frame(v3_header(metrics=b"\x01\x01" + bits)))
    with pytest.raises(ProtocolError, match="finite"):
        encode_update(header(metrics={"loss": float("nan")}), b"", KEY)
    fields = {"job_id": "j", "round": 1, "attempt": 1, "client_id": "c", "base_version": "ab" * 32,
              "codec": {"name": "dense"}, "num_samples": 1, "numel": 1, "metrics": {"loss": float("nan")}}
    with pytest.raises(ProtocolError, match="finite"):  # v2: NaN in the JSON
        decode_update(v2_frame(fields))


def test_update_carries_no_secret() -> None:
    """Nothing in the message can be reused (v3 has no field a secret could go in); a v2 header that tries
    to carry a token is refused."""
    raw = encode_update(header(), b"\x01" * 64, KEY)
    assert b"token" not in raw and KEY not in raw and KEY.hex().encode() not in raw
    fields = {"job_id": "job1", "round": 3, "attempt": 2, "client_id": "dev-1", "base_version": "ab" * 32,
              "codec": {"name": "dense"}, "num_samples": 17, "numel": 4, "metrics": {"loss": 0.5}}
    assert decode_update(v2_frame(fields, key=KEY))[0] == header()
    with pytest.raises(ProtocolError, match="token"):
        decode_update(v2_frame({**fields, "token": "secret"}, key=KEY))


@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_mac_covers_every_byte_and_needs_the_key(pos: int, bit: int) -> None:
    raw = encode_update(header(), b"\x05" * 200, KEY)
    assert verify_update(raw, KEY) and not verify_update(raw, bytes(32)) and not verify_update(raw, KEY[:-1] + b"x")
    signed_end = len(raw) - 4 - MAC_BYTES
    i = pos % signed_end
    flipped = raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:-4]
    assert not verify_update(reframe(flipped), KEY)  # a valid CRC does not make a tampered message authentic


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
            "bn.running_mean": rng.standard_normal(4).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
            "fc.weight": rng.standard_normal((10, 4)).astype(np.float16)}


def test_model_file_is_deterministic_and_round_trips() -> None:
    arrays, meta = sample_arrays(), {"arch": "small_cnn", "round": 0}
    data = dump_model(arrays, meta)
    assert dump_model(arrays, dict(reversed(list(meta.items())))) == data  # meta key order is irrelevant
    loaded, got_meta = load_model(data)
    assert got_meta == meta and list(loaded) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(loaded[k], arrays[k])
        assert loaded[k].dtype == arrays[k].dtype and loaded[k].shape == arrays[k].shape
    assert sha256_hex(dump_model(loaded, got_meta)) == sha256_hex(data)


def test_flatten_covers_float_entries_only() -> None:
    arrays = sample_arrays()
    vec = flatten(arrays)
    assert vec.dtype == np.float32 and vec.size == 36 + 4 + 40
    assert [n for n, _ in float_layout(arrays)] == ["conv.weight", "bn.running_mean", "fc.weight"]
    back = unflatten(vec + 1, arrays)
    assert back["bn.num_batches_tracked"] == 7
    np.testing.assert_allclose(back["conv.weight"], arrays["conv.weight"] + 1, rtol=1e-6)
    with pytest.raises(ProtocolError, match="float parameters"):
        unflatten(vec[:-1], arrays)


@pytest.mark.parametrize("data, reason", [
    (b"nope", "magic"),
    (b"FSM1" + struct.pack("<I", 999) + b"{}", "truncated"),
    (b"FSM1" + struct.pack("<I", 2) + b"{}", "malformed"),
])
def test_bad_model_files(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        load_model(data)


def test_truncated_model_file() -> None:
    data = dump_model(sample_arrays(), {})
    with pytest.raises(ProtocolError, match="truncated"):
        load_model(data[:-3])
    with pytest.raises(ProtocolError, match="trailing"):
        load_model(data + b"x")


def test_topics_layout() -> None:
    assert topics.update_topic("dev-1") == "fedsight/v1/clients/dev-1/update"
    assert topics.parse_client_topic("fedsight/v1/clients/dev-1/update") == ("dev-1", "update")
    assert topics.parse_job_topic(topics.job_events_topic("j1")) == "j1"
    for bad in ("fedsight/v1/clients/a/b/update", "fedsight/v1/clients/x/unknown", "other/topic"):
        with pytest.raises(ValueError):
            topics.parse_client_topic(bad)
    for bad_id in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            topics.update_topic(bad_id)
