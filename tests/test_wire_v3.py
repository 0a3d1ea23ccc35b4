"""Wire v3's binary update header byte by byte: layout, size, encoder refusals, every decoder rejection, fuzzing,
and wire v2 frames (devices not yet upgraded) still decoding to the same header."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.spec_text import parse_codec
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.header_v3 import METRIC_NAMES
from edge_sdk.protocol.wire import VERSION, UpdateHeader, decode_update, encode_update, update_mac, verify_update
from edge_sdk.update import wire_metrics
from tests.wire_frames import sign, v2_frame, v3_frame, v3_header

KEY = bytes(range(32))
DEMO_SPEC = parse_codec("topk:0.003:sign:rice:warmup=6/0.25:stats=int8")
F32_HALF = struct.pack("<f", 0.5)


def demo_header(**kw: object) -> UpdateHeader:
    """What a demo device sends: server-made ids, a sha256 base, the demo codec, six rounded metrics."""
    fields = dict(job_id="job-3f9a1c2e", round=12, client_id="c-0123456789ab", base_version="3c" * 32,
                  codec_digest=codec_digest(DEMO_SPEC), num_samples=143, numel=26_202,
                  metrics=wire_metrics({"loss": 0.123456, "accuracy": 0.95833, "train_time_s": 1.2345678,
                                        "eval_loss": 0.3456789, "eval_accuracy": 0.912345, "eval_samples": 36.0}),
                  attempt=1)
    fields.update(kw)
    return UpdateHeader(**fields)  # type: ignore[arg-type]


def test_bytes_follow_the_documented_table() -> None:
    h = demo_header(metrics={"loss": 0.5, "cpu_temp": 41.5})
    raw = encode_update(h, b"PAYLOAD", KEY)
    metrics = b"\x02" + b"\x01" + F32_HALF + b"\x00\x08cpu_temp" + struct.pack("<f", 41.5)
    head = v3_header(round_=12, attempt=1, num_samples=143, numel=26_202, base_version=bytes.fromhex("3c" * 32),
                     digest=codec_digest(DEMO_SPEC), job_id=b"job-3f9a1c2e", client_id=b"c-0123456789ab",
                     metrics=metrics)
    assert raw == v3_frame(head, b"PAYLOAD", KEY)
    assert raw[3] == VERSION == 3 and update_mac(raw) == raw[-36:-4]


def test_demo_frame_overhead_is_157_bytes_against_v2s_json() -> None:
    payload = b"\x00" * 360  # ~ a demo update's sparse part and statistics block
    h = demo_header()
    v3 = len(encode_update(h, payload, KEY)) - len(payload)
    # magic+version+len 6, fixed 56, ids 1+12 and 1+14, metric count 1, six tagged float32 5 each, MAC+CRC 36
    assert v3 == 6 + 56 + 13 + 15 + 1 + 6 * 5 + 36 == 157
    old = {"job_id": h.job_id, "round": h.round, "attempt": 1, "client_id": h.client_id,
           "base_version": h.base_version, "codec": DEMO_SPEC, "num_samples": h.num_samples, "numel": h.numel,
           "metrics": h.metrics}
    v2 = len(v2_frame(old, payload, KEY)) - len(payload)
    assert v3 <= 160 and v2 - v3 >= 300, (v2, v3)
    assert decode_update(v2_frame(old, payload, KEY)) == decode_update(encode_update(h, payload, KEY))


_ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=60)
_values = st.floats(min_value=1e-30, max_value=1e30).map(lambda v: float(f"{v:.4g}"))
_metrics = st.dictionaries(st.sampled_from(METRIC_NAMES) | _ids, st.tuples(st.booleans(), _values), max_size=12)


@given(job=_ids, client=_ids, metrics=_metrics, nums=st.tuples(*[st.integers(1, 2**32 - 1)] * 3),
       rnd=st.integers(0, 2**32 - 1), base=st.binary(min_size=32, max_size=32), payload=st.binary(max_size=300))
@settings(max_examples=80, deadline=None)
def test_round_trip_of_any_ids_and_metrics(job, client, metrics, nums, rnd, base, payload) -> None:
    values = {name: (-v if neg else v) for name, (neg, v) in metrics.items()}
    h = UpdateHeader(job, rnd, client, base.hex(), codec_digest({"name": "dense"}), nums[0], nums[1], values, nums[2])
    if len(job.encode()) > 255 or len(client.encode()) > 255 or any(len(k.encode()) > 255 for k in values):
        with pytest.raises(ProtocolError, match="1-255 UTF-8 bytes"):
            encode_update(h, payload, KEY)
        return
    raw = encode_update(h, payload, KEY)
    assert decode_update(raw) == (h, payload) and verify_update(raw, KEY)


def test_float32_metrics_decode_to_their_shortest_decimal() -> None:
    got = decode_update(encode_update(demo_header(metrics={"a": 0.1, "b": 1 / 3, "c": 3e38, "d": -0.0}), b"", KEY))
    assert got[0].metrics == {"a": 0.1, "b": 0.33333334, "c": 3e38, "d": -0.0}


@pytest.mark.parametrize("change, reason", [
    ({"base_version": "AB" * 32}, "64 lowercase hex"),
    ({"base_version": "ab" * 31}, "64 lowercase hex"),
    ({"base_version": "xy" * 32}, "64 lowercase hex"),
    ({"base_version": 7}, "64 lowercase hex"),
    ({"codec_digest": b"\x00" * 7}, "codec_digest must be 8 bytes"),
    ({"codec_digest": {"name": "dense"}}, "codec_digest must be 8 bytes"),
    ({"job_id": ""}, "job_id must be a string of 1-255"),
    ({"client_id": "é" * 128}, "client_id must be a string of 1-255"),
    ({"client_id": None}, "client_id must be a string"),
    ({"job_id": "\ud800"}, "encodable as UTF-8"),
    ({"round": 2**32}, r"round must be an integer in \[0, 2\*\*32\)"),
    ({"num_samples": -1}, "num_samples must be an integer"),
    ({"numel": True}, "numel must be an integer"),
    ({"attempt": 0}, "attempt at least 1"),
    ({"metrics": {"loss": float("inf")}}, "not a finite number"),
    ({"metrics": {"loss": True}}, "not a finite number"),
    ({"metrics": {"loss": "0.5"}}, "not a finite number"),
    ({"metrics": {"loss": 1e39}}, "beyond float32's range"),
    ({"metrics": {"loss": 10**400}}, "beyond float32's range"),
    ({"metrics": {"": 1.0}}, "metric name must be a string of 1-255"),
    ({"metrics": {f"m{i}": 1.0 for i in range(256)}}, "at most 255 entries"),
])
def test_encoder_refuses_what_the_wire_cannot_carry(change: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        encode_update(demo_header(**change), b"", KEY)


def test_encoder_refuses_a_short_key() -> None:
    with pytest.raises(ProtocolError, match="at least 16 bytes"):
        encode_update(demo_header(), b"", b"k" * 15)


@pytest.mark.parametrize("head, reason", [
    (v3_header(num_samples=0), "num_samples must be positive"),
    (v3_header(numel=0), "numel must be positive"),
    (v3_header(attempt=0), "attempt at least 1"),
    (v3_header(job_id=b""), "'job_id' is empty"),
    (v3_header(client_id=b""), "'client_id' is empty"),
    (v3_header(job_id=b"\xff\xfe"), "'job_id' is not valid UTF-8"),
    (v3_header(metrics=b"\x01\x07" + F32_HALF), "unknown metric tag 7"),
    (v3_header(metrics=b"\x02\x01" + F32_HALF + b"\x00\x04loss" + F32_HALF), "'loss' appears twice"),
    (v3_header(metrics=b"\x01\x00\x00" + F32_HALF), "'metric name' is empty"),
    (v3_header(metrics=b"\x01\x00\x02\xc3\x28" + F32_HALF), "'metric name' is not valid UTF-8"),
    (v3_header(metrics=b"\x03\x01" + F32_HALF), "runs past the header's end"),
    (v3_header(metrics=b"\x01\x01\x00\x00"), "runs past the header's end"),
    (v3_header(metrics=b""), "'metric count' runs past"),
    (v3_header()[:61] + b"\xc8dev", "'client_id' runs past"),  # after fixed 56 + job_id 5: length 200
    (v3_header()[:40], "'fixed fields' runs past"),
    (v3_header() + b"\x00\x00", "header length 75 does not match its fields \\(73 bytes\\)"),
])
def test_every_hostile_header_is_a_readable_protocol_error(head: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_update(v3_frame(head, b"payload", KEY))


@pytest.mark.parametrize("version", [0, 1, 4, 255])
def test_unknown_versions_are_refused(version: int) -> None:
    raw = bytearray(encode_update(demo_header(), b"x", KEY))
    raw[3] = version
    with pytest.raises(ProtocolError, match=f"unsupported wire version {version}"):
        decode_update(sign(bytes(raw[:-36]), KEY))


def test_header_length_past_the_message_and_truncation() -> None:
    head = v3_header()
    with pytest.raises(ProtocolError, match="header length 500 does not fit"):
        decode_update(v3_frame(head, key=KEY, head_len=500))
    with pytest.raises(ProtocolError, match="truncated"):
        decode_update(b"FSU\x03" + b"\x00" * 30)  # shorter than prefix + MAC + CRC
    with pytest.raises(ProtocolError, match="truncated"):
        decode_update(b"FS")


def test_custom_metric_names_travel_spelled_out() -> None:
    got, payload = decode_update(v3_frame(v3_header(metrics=b"\x02\x00\x04cpu%" + F32_HALF + b"\x06" + F32_HALF),
                                          b"p", KEY))
    assert got.metrics == {"cpu%": 0.5, "eval_samples": 0.5} and payload == b"p"


@given(head=st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_fuzzed_headers_are_protocol_errors_or_valid(head: bytes) -> None:
    try:
        h, _ = decode_update(v3_frame(head, b"payload"))
    except ProtocolError:
        return
    assert h.num_samples > 0 and h.numel > 0 and h.attempt > 0 and len(h.base_version) == 64
    assert len(h.codec_digest) == 8 and h.job_id and h.client_id


@given(pos=st.integers(0, 10_000), value=st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_any_changed_header_byte_decodes_cleanly_or_is_refused_and_never_verifies(pos: int, value: int) -> None:
    raw = encode_update(demo_header(), b"\x05" * 40, KEY)
    head_end = 6 + struct.unpack_from("<H", raw, 4)[0]
    i = 4 + pos % (head_end - 4)  # header_len or a header byte
    if raw[i] == value:
        return
    forged = sign(raw[:i] + bytes([value]) + raw[i + 1:-36])  # valid CRC, no key
    try:
        decode_update(forged)
    except ProtocolError:
        return
    assert not verify_update(forged, KEY)


# ------------------------------------------------------------------------------ wire v2, still accepted
V2_FIELDS = {"job_id": "job-3f9a1c2e", "round": 12, "attempt": 1, "client_id": "c-0123456789ab",
             "base_version": "3c" * 32, "codec": {"name": "topk", "density": 0.003, "values": "sign",
                                                  "index_coding": "rice", "stats": "int8", "warmup_rounds": 6,
                                                  "warmup_density": 0.25},
             "num_samples": 143, "numel": 26_202, "metrics": {"loss": 0.1235, "accuracy": 0.9583}}


def test_v2_frames_from_old_devices_decode_to_the_same_header() -> None:
    raw = v2_frame(V2_FIELDS, b"PAY", KEY)
    header, payload = decode_update(raw)
    assert header == demo_header(metrics={"loss": 0.1235, "accuracy": 0.9583}) and payload == b"PAY"
    assert header.codec_digest == codec_digest(DEMO_SPEC)  # the echoed (short) spec names the same codec
    assert verify_update(raw, KEY) and update_mac(raw) == raw[-36:-4]


@pytest.mark.parametrize("change, reason", [
    ({"codec": {"name": "zip"}}, "header field 'codec' is not a codec spec: .*unknown codec name"),
    ({"codec": "dense"}, "header field 'codec' missing or not dict"),
    ({"base_version": 5}, "'base_version' missing or not str"),
    ({"numel": 0}, "numel must be positive"),
    ({"token": "secret"}, "wire v2 never sends secrets"),
])
def test_v2_headers_keep_their_checks(change: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_update(v2_frame({**V2_FIELDS, **change}, b"", KEY))
