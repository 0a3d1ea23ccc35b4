"""Sign (1-bit) values, Golomb-Rice positions and density warm-up: sizes, exactness, hostile input."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol import codecs, quant, sparse_index
from edge_sdk.protocol.errors import ProtocolError

NUMEL, SIZES = 50_000, [20_000, 30_000]
TERNARY = {"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice"}


def _vec(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(NUMEL).astype(np.float32)


def test_sign_values_are_block_mean_with_sign_and_exact_size() -> None:
    x = np.array([1.0, -3.0, 0.5, -0.0, 2.5], dtype=np.float32)
    raw, sent = quant.quantize("sign", x)
    scale = np.float32(np.abs(x).mean())
    assert sent.tolist() == [scale, -scale, scale, -scale, scale]  # -0.0 keeps its sign bit
    assert len(raw) == quant.block_size("sign", 5) == 4 + 1
    assert np.array_equal(quant.dequantize("sign", raw, 5), sent)
    x = _vec()[:1000]
    raw, sent = quant.quantize("sign", x)
    assert len(raw) == 4 * 4 + 125  # 4 float32 scales (256-value blocks) + 1000 sign bits
    assert np.array_equal(np.abs(sent[:256]), np.full(256, np.float32(np.abs(x[:256]).astype(np.float64).mean())))


def test_sign_payload_rejects_padding_bits_and_bad_scales() -> None:
    raw = bytearray(quant.quantize("sign", np.ones(5, np.float32))[0])
    raw[-1] |= 0x80  # a sign bit beyond k = 5
    with pytest.raises(ProtocolError, match="padding"):
        quant.dequantize("sign", bytes(raw), 5)
    for bad in (np.float32(-1.0), np.float32(np.inf)):
        raw = bytearray(quant.quantize("sign", np.ones(5, np.float32))[0])
        raw[:4] = bad.tobytes()
        with pytest.raises(ProtocolError, match="scale"):
            quant.dequantize("sign", bytes(raw), 5)


@settings(max_examples=150, deadline=None)
@given(numel=st.integers(1, 5000), data=st.data())
def test_rice_round_trips_any_index_set(numel: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, numel))
    idx = np.sort(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).choice(numel, k, replace=False))
    raw = sparse_index.encode_rice(idx.astype(np.int64))
    assert len(raw) == sparse_index.rice_size(idx) <= sparse_index.max_raw_size(sparse_index.RICE, k, numel)
    assert np.array_equal(sparse_index.decode_rice(raw, k, numel), idx)


def test_rice_cost_is_near_the_entropy_of_the_positions() -> None:
    """~log2(1/d) + 1.5 bits per position, well under varint's whole bytes; this is what 0.3 % density costs."""
    numel, k = 1_000_000, 3000
    idx = np.sort(np.random.default_rng(3).choice(numel, k, replace=False)).astype(np.int64)
    bits = 8 * sparse_index.rice_size(idx) / k
    assert bits <= math.log2(numel / k) + 2.0
    assert sparse_index.rice_size(idx) < 0.75 * sparse_index.varint_size(idx)


def test_ternary_codec_round_trip_size_and_flag() -> None:
    vec = _vec()
    payload, sent = codecs.encode(TERNARY, vec, SIZES)
    dec = codecs.decode(TERNARY, payload, NUMEL, SIZES)
    assert np.array_equal(dec.indices, sent.indices) and np.array_equal(dec.values, sent.values)
    assert payload[1] & codecs.F_INDEX_RICE and not payload[1] & codecs.F_INDEX_BITMAP
    k = math.ceil(0.003 * NUMEL)
    assert len(np.unique(np.abs(sent.values))) == 1  # one block of 150 values: one magnitude
    auto = {**TERNARY, "index_coding": "auto"}
    assert len(payload) < len(codecs.encode(auto, vec, SIZES)[0])
    # header 14 B + rice positions + one scale + k sign bits: about 1.6 bytes per kept value
    assert len(payload) <= 14 + sparse_index.rice_size(sent.indices) + 4 + math.ceil(k / 8)
    assert len(payload) < 1.6 * k + 20


def test_error_feedback_with_sign_values_keeps_the_sum() -> None:
    """sent + residual == everything a device meant to send, so 1-bit values lose nothing over rounds."""
    residual = np.zeros(NUMEL, np.float32)
    total_true = np.zeros(NUMEL, np.float64)
    total_sent = np.zeros(NUMEL, np.float64)
    for r in range(5):
        delta = _vec(r) * 0.01
        corrected = delta + residual
        _, sent = codecs.encode(TERNARY, corrected, SIZES)
        dense = sent.to_dense(NUMEL)
        residual = corrected - dense
        total_true += delta
        total_sent += dense
    assert np.allclose(total_sent + residual, total_true, atol=1e-5)


def test_rice_flag_needs_a_spec_that_allows_it() -> None:
    payload, _ = codecs.encode(TERNARY, _vec(), SIZES)
    with pytest.raises(ProtocolError, match="rice index flag"):
        codecs.decode({**TERNARY, "index_coding": "auto"}, payload, NUMEL, SIZES)
    both = bytearray(payload)
    both[1] |= codecs.F_INDEX_BITMAP
    with pytest.raises(ProtocolError, match="rice index flag"):
        codecs.decode(TERNARY, bytes(both), NUMEL, SIZES)


@pytest.mark.parametrize(("raw", "k", "reason"), [
    (b"", 1, "empty"),
    (bytes([40, 0]), 1, "parameter"),
    (bytes([0]) + b"\xff" * 4, 1, "truncated"),               # a unary run with no terminating zero
    (bytes([2, 0b00000000, 0b1]), 1, "trailing"),           # one code (index 0), then a stray bit
    (bytes([0]) + b"\xff" * 8 + b"\x00", 1, "out of range"),  # index 64 >= numel 50
    (bytes([0, 0]), 0, "not empty"),
])
def test_hostile_rice_blocks(raw: bytes, k: int, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        sparse_index.decode_rice(raw, k, 50)


def test_warmup_schedule_spends_density_early_then_holds() -> None:
    spec = {"name": "topk", "density": 0.01, "values": "sign", "warmup_rounds": 4, "warmup_density": 0.16}
    dens = [codecs.round_spec(spec, r)["density"] for r in range(1, 8)]
    assert dens == [0.16, 0.08, 0.04, 0.02, 0.01, 0.01, 0.01]
    plain = codecs.round_spec(spec, 3)
    assert "warmup_rounds" not in plain and codecs.validate_spec(plain) == plain
    no_warmup = {"name": "topk", "density": 0.01}
    assert codecs.round_spec(no_warmup, 1) == no_warmup


@pytest.mark.parametrize(("extra", "reason"), [
    ({"warmup_rounds": -1}, "warmup_rounds"), ({"warmup_rounds": 1.5}, "warmup_rounds"),
    ({"warmup_density": 0.001}, "warmup_density"), ({"warmup_density": 2.0}, "warmup_density"),
    ({"warmup_density": "x"}, "warmup_density"), ({"index_coding": "golomb"}, "index_coding"),
])
def test_bad_new_options_are_refused(extra: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        codecs.validate_spec({"name": "topk", "density": 0.01, **extra})
