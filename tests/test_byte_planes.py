"""Byte-plane dense payloads (codec flag bit 6): lossless, smaller than plain zlib, hostile input refused."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.rounds.jobspec import JobSpecError, normalize_job
from edge_sdk.protocol import byte_planes, codecs
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.errors import ProtocolError

PLANES = {"name": "dense", "planes": True}
N = 20_000


def trained_delta(n: int = N, seed: int = 0) -> np.ndarray:
    """A delta the way a device computes it: float32 weights after local steps minus the weights before."""
    rng = np.random.default_rng(seed)
    before = (rng.standard_normal(n) * 0.05).astype(np.float32)
    after = before + (rng.standard_normal(n) * 1e-3).astype(np.float32)
    frozen = rng.random(n) < 0.1  # coordinates without a gradient this round
    after[frozen] = before[frozen]
    return after - before


def dense_payload(flags: int, count: int, values: bytes) -> bytes:
    return struct.pack("<cBII", b"D", flags, count, len(values)) + values


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_bit_exact_and_flagged(dtype: str) -> None:
    vec = trained_delta()
    vec[:4] = [-0.0, 1e-42, -3e-39, 0.0]  # signed zero and subnormals survive the shuffle
    spec = {**PLANES, "dtype": dtype}
    payload, sent = codecs.encode(spec, vec, [N // 2, N // 2])
    assert payload[1] & codecs.F_VALUES_PLANES and payload[1] & codecs.F_VALUES_ZLIB
    got = codecs.decode(spec, payload, N, [N // 2, N // 2])
    width = np.uint32 if dtype == "float32" else np.uint16
    assert np.array_equal(got.values.astype(dtype).view(width), sent.values.astype(dtype).view(width))
    if dtype == "float32":
        assert np.array_equal(got.values.view(np.uint32), vec.view(np.uint32))


def test_planes_are_smaller_than_plain_zlib_on_a_trained_delta() -> None:
    vec = trained_delta()
    plain, _ = codecs.encode({"name": "dense"}, vec, [N])
    planes, _ = codecs.encode(PLANES, vec, [N])
    assert not plain[1] & codecs.F_VALUES_PLANES
    assert len(planes) < 0.9 * len(plain) < 0.9 * 4 * N


def test_split_and_join_are_inverse_and_group_bytes_by_significance() -> None:
    block = np.array([0x04030201, 0x08070605], "<u4").tobytes()
    assert byte_planes.split(block, 4) == bytes([1, 5, 2, 6, 3, 7, 4, 8])
    assert byte_planes.join(byte_planes.split(block, 4), 4) == block


def test_small_or_incompressible_blocks_keep_the_old_layout() -> None:
    small = trained_delta(500)
    payload, _ = codecs.encode(PLANES, small, [500])
    assert not payload[1] & codecs.F_VALUES_PLANES  # 2 kB: plain path
    noise = np.frombuffer(np.random.default_rng(1).bytes(4 * N), np.uint32)
    noise = (noise & np.uint32(0x807FFFFF) | np.uint32(0x3F000000)).view(np.float32)  # random mantissas and signs
    assert np.isfinite(noise).all()
    payload, sent = codecs.encode(PLANES, noise, [N])
    assert codecs.decode(PLANES, payload, N, [N]).values.tobytes() == sent.values.tobytes()


def test_spec_without_planes_encodes_as_before_and_planes_is_encoder_only() -> None:
    vec = trained_delta()
    plain = codecs.encode({"name": "dense"}, vec, [N])[0]
    assert plain == codecs.encode({**PLANES, "planes": False}, vec, [N])[0] and not plain[1] & codecs.F_VALUES_PLANES
    planes, _ = codecs.encode(PLANES, vec, [N])
    assert codecs.decode({"name": "dense"}, planes, N, [N]).values.tobytes() == vec.tobytes()  # any dense decoder
    assert codec_digest(PLANES) == codec_digest({"name": "dense"})  # a device encoding without it is on-codec
    assert codec_digest(PLANES) != codec_digest({"name": "dense", "dtype": "float16", "planes": True})


def test_validate_spec_planes_key() -> None:
    assert codecs.validate_spec(PLANES) == {"name": "dense", "dtype": "float32", "error_feedback": False,
                                            "planes": True}
    with pytest.raises(ProtocolError, match="planes must be a bool"):
        codecs.validate_spec({"name": "dense", "planes": 1})
    with pytest.raises(ProtocolError, match="unknown key"):
        codecs.validate_spec({"name": "topk", "planes": True})


GOOD = np.arange(1, 2049, dtype="<f4").tobytes()
HOSTILE = [
    ("planes-without-zlib", dense_payload(codecs.F_VALUES_PLANES, 2048, GOOD), "without the zlib bit"),
    ("short-planes", dense_payload(0x44, 2048, zlib.compress(byte_planes.split(GOOD, 4)[:-4])),
     "inflates to 8188 bytes, expected 8192"),
    ("planes-bomb", dense_payload(0x44, 2048, zlib.compress(bytes(10**6))), "zlib bomb"),
    ("planes-corrupt", dense_payload(0x44, 2048, b"not zlib"), "corrupt zlib"),
    ("planes-nan", dense_payload(0x44, 2048, zlib.compress(byte_planes.split(
        GOOD[:-4] + np.array([np.nan], "<f4").tobytes(), 4))), "non-finite values"),
]


@pytest.mark.parametrize(("payload", "reason"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_plane_payloads_rejected_with_reason(payload: bytes, reason: str) -> None:
    good = dense_payload(0x44, 2048, zlib.compress(byte_planes.split(GOOD, 4)))
    assert codecs.decode(PLANES, good, 2048, [2048]).values.tobytes() == GOOD
    with pytest.raises(ProtocolError, match=reason):
        codecs.decode(PLANES, payload, 2048, [2048])


def test_plane_flag_on_a_sparse_payload_is_refused() -> None:
    spec = {"name": "topk", "density": 0.01}
    payload, _ = codecs.encode(spec, trained_delta(1000), [1000])
    forged = payload[:1] + bytes([payload[1] | codecs.F_VALUES_PLANES | codecs.F_VALUES_ZLIB]) + payload[2:]
    with pytest.raises(ProtocolError, match="byte-plane flag set on a topk payload"):
        codecs.decode(spec, forged, 1000, [1000])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_plane_payloads_only_raise_protocol_error(data: st.DataObject) -> None:
    vec = trained_delta(2048, seed=data.draw(st.integers(0, 1000)))
    payload = bytearray(codecs.encode(PLANES, vec, [2048])[0])
    assert payload[1] & codecs.F_VALUES_PLANES
    for _ in range(data.draw(st.integers(1, 3))):
        if payload and data.draw(st.booleans()):
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload[pos] ^= data.draw(st.integers(1, 255))
        else:
            del payload[data.draw(st.integers(0, len(payload))):]
    try:
        dec = codecs.decode(PLANES, bytes(payload), 2048, [2048])
    except ProtocolError as err:
        assert err.reason
        return
    assert dec.values.shape == (2048,) and np.isfinite(dec.values).all()


def test_new_dense_jobs_get_planes_and_can_opt_out() -> None:
    base = {"model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1}, "rounds": 2}
    assert normalize_job(base)["codec"]["planes"] is True
    assert normalize_job({**base, "codec": {"name": "dense", "planes": False}})["codec"]["planes"] is False
    assert "planes" not in normalize_job({**base, "codec": {"name": "topk", "density": 0.01}})["codec"]
    with pytest.raises(JobSpecError, match="planes must be a bool"):
        normalize_job({**base, "codec": {"name": "dense", "planes": "yes"}})
