"""Codec round trips, selection properties, payload sizes and hostile-payload rejection."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_sdk.protocol import codecs, quant, sparse_index
from edge_sdk.protocol.errors import ProtocolError

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

layouts = st.lists(st.integers(0, 300) | st.integers(1000, 40_000), min_size=1, max_size=6).filter(
    lambda s: sum(s) > 0)
value_kinds = st.sampled_from(["float32", "float16", "int8", "sign"])
densities = st.sampled_from([1e-4, 0.003, 0.05, 0.3, 0.5, 0.77, 1.0])


@st.composite
def specs(draw: st.DrawFn) -> dict:
    name = draw(st.sampled_from(["dense", "topk", "randk"]))
    if name == "dense":
        return {"name": "dense", "dtype": draw(st.sampled_from(["float32", "float16"]))}
    spec = {"name": name, "density": draw(densities), "values": draw(value_kinds), "stochastic": draw(st.booleans())}
    if name == "topk":
        spec["scope"] = draw(st.sampled_from(["global", "per_tensor"]))
        spec["index_coding"] = draw(st.sampled_from(["auto", "rice"]))
        if draw(st.booleans()):
            spec["seed"] = draw(st.integers(0, 2**64 - 1))
    else:
        spec["seed"] = draw(st.integers(0, 2**64 - 1))
    return spec


@st.composite
def vectors(draw: st.DrawFn, numel: int) -> np.ndarray:
    """Either hypothesis-chosen extreme floats or a scaled normal vector with exact zeros and ties."""
    if numel <= 64 and draw(st.booleans()):
        elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
        return draw(arrays(np.float32, numel, elements=elements))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vec = rng.standard_normal(numel).astype(np.float32) * np.float32(10.0 ** draw(st.integers(-30, 30)))
    vec[rng.random(numel) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = 0.0
    return vec


def assert_same(a: codecs.Decoded, b: codecs.Decoded) -> None:
    assert (a.indices is None) == (b.indices is None)
    if a.indices is not None:
        assert np.array_equal(a.indices, b.indices)
        assert a.indices.dtype == np.int64
    assert a.values.dtype == np.float32 and b.values.dtype == np.float32
    assert np.array_equal(a.values.view(np.uint32), b.values.view(np.uint32))


def assert_quantised_close(kind: str, x: np.ndarray, sent: np.ndarray, stochastic: bool) -> None:
    x64, s64 = x.astype(np.float64), sent.astype(np.float64)
    if kind == "float32":
        assert np.array_equal(sent, x)
    elif kind == "float16":
        clipped = np.clip(x64, -quant.FP16_MAX, quant.FP16_MAX)
        assert np.isfinite(sent).all()
        assert (np.abs(s64 - clipped) <= np.maximum(np.abs(clipped) * 2.0**-11, 2.0**-25)).all()
    elif kind == "sign":  # +-(mean |x| of the block), the sign of x (zero counts as positive)
        for start in range(0, x.size, quant.BLOCK):
            xb, sb = x64[start:start + quant.BLOCK], s64[start:start + quant.BLOCK]
            assert np.allclose(np.abs(sb), np.abs(xb).mean(), rtol=1e-5, atol=1e-40)
            assert (np.signbit(sb) == np.signbit(x[start:start + quant.BLOCK])).all()
    else:
        for start in range(0, x.size, quant.BLOCK):
            xb, sb = x64[start:start + quant.BLOCK], s64[start:start + quant.BLOCK]
            scale = float(np.float32(np.abs(x[start:start + quant.BLOCK]).max()) / np.float32(127))
            bound = scale * (1.0 if stochastic else 0.5) + np.abs(xb) * 2.0**-20 + 1e-40
            assert (np.abs(sb - xb) <= bound * (1 + 1e-6)).all()


@FAST
@given(data=st.data(), sizes=layouts, spec=specs())
def test_round_trip_and_tolerance(data: st.DataObject, sizes: list[int], spec: dict) -> None:
    numel = sum(sizes)
    vec = data.draw(vectors(numel))
    payload, sent = codecs.encode(spec, vec, sizes)
    assert_same(codecs.decode(spec, payload, numel, sizes), sent)
    norm = codecs.validate_spec(spec)
    kind = norm.get("values", norm.get("dtype"))
    if spec["name"] == "dense":
        assert sent.indices is None and sent.values.size == numel
        assert_quantised_close(kind, vec, sent.values, False)
        return
    idx = sent.indices
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < numel
    assert idx.size == sum(codecs.expected_counts(spec, sizes))
    assert_quantised_close(kind, vec[idx], sent.values, norm["stochastic"])
    dense = sent.to_dense(numel)
    assert np.array_equal(dense[idx], sent.values) and not np.delete(dense, idx).any()


@FAST
@given(data=st.data(), sizes=layouts, density=densities, scope=st.sampled_from(["global", "per_tensor"]))
def test_topk_keeps_largest_magnitudes(data: st.DataObject, sizes: list[int], density: float, scope: str) -> None:
    numel = sum(sizes)
    vec = data.draw(vectors(numel))
    spec = {"name": "topk", "density": density, "scope": scope}
    _, sent = codecs.encode(spec, vec, sizes)
    mag = np.abs(vec)
    kept = np.zeros(numel, dtype=bool)
    kept[sent.indices] = True
    segments = [(0, numel)] if scope == "global" else []
    offset = 0
    for size in sizes if scope == "per_tensor" else []:
        segments.append((offset, offset + size))
        offset += size
    for lo, hi in segments:
        seg_kept, seg_mag = kept[lo:hi], mag[lo:hi]
        k = min(hi - lo, max(1, math.ceil(density * (hi - lo)))) if hi > lo else 0
        assert seg_kept.sum() == k
        if 0 < k < hi - lo:
            assert seg_mag[seg_kept].min() >= seg_mag[~seg_kept].max()


def test_topk_global_exact_on_known_vector() -> None:
    vec = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 4.0, 0.0, -1.0], dtype=np.float32)
    _, sent = codecs.encode({"name": "topk", "density": 0.375}, vec, [8])
    assert sent.indices.tolist() == [1, 3, 5]
    assert sent.values.tolist() == [-5.0, 3.0, 4.0]


def test_randk_indices_depend_only_on_seed_and_payload_has_no_indices() -> None:
    numel, sizes = 200_003, [100_000, 100_003]
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, numel)).astype(np.float32)
    spec = {"name": "randk", "density": 0.01, "values": "float16", "seed": 42}
    pa, sa = codecs.encode(spec, a, sizes)
    pb, sb = codecs.encode(spec, b, sizes)
    k = math.ceil(0.01 * numel)
    assert np.array_equal(sa.indices, sb.indices) and sa.indices.size == k
    assert np.unique(sa.indices).size == k
    _, sc = codecs.encode({**spec, "seed": 43}, a, sizes)
    assert len(np.intersect1d(sa.indices, sc.indices)) < k // 10
    # header (10 bytes) + k float16 values; the index set never travels
    assert len(pa) <= 10 + 2 * k and len(pa) >= 2 * k * 0.9
    topk_payload, _ = codecs.encode({"name": "topk", "density": 0.01, "values": "float16"}, a, sizes)
    assert len(topk_payload) > len(pa) + k // 2
    assert_same(codecs.decode(spec, pa, numel, sizes), sa)


def test_randk_sampling_is_uniform_enough_and_uses_complement() -> None:
    numel = 1000
    hits = np.zeros(numel)
    for seed in range(400):
        hits[sparse_index.seeded_indices(seed, numel, 50)] += 1
    assert hits.sum() == 400 * 50
    assert abs(hits[:500].sum() / hits.sum() - 0.5) < 0.02  # no half of the range is favoured
    dense = sparse_index.seeded_indices(7, numel, 990)  # complement path
    assert dense.size == 990 and np.unique(dense).size == 990


def test_index_coder_picks_varint_when_sparse_and_bitmap_when_dense() -> None:
    numel = 100_000
    sparse = np.sort(np.random.default_rng(0).choice(numel, 100, replace=False)).astype(np.int64)
    method, raw = sparse_index.encode_indices(sparse, numel)
    assert method == sparse_index.VARINT and len(raw) == sparse_index.varint_size(sparse) < numel // 8
    dense = np.sort(np.random.default_rng(1).choice(numel, 40_000, replace=False)).astype(np.int64)
    method, raw = sparse_index.encode_indices(dense, numel)
    assert method == sparse_index.BITMAP and len(raw) == (numel + 7) // 8 < sparse_index.varint_size(dense)
    # and the codec records the choice in the flags
    vec = np.zeros(numel, dtype=np.float32)
    vec[dense] = 1.0 + np.arange(dense.size, dtype=np.float32)
    payload, sent = codecs.encode({"name": "topk", "density": 0.4}, vec, [numel])
    assert payload[1] & codecs.F_INDEX_BITMAP and np.array_equal(sent.indices, dense)
    payload, _ = codecs.encode({"name": "topk", "density": 0.001}, vec, [numel])
    assert not payload[1] & codecs.F_INDEX_BITMAP


@FAST
@given(numel=st.integers(1, 5000), data=st.data())
def test_index_codings_round_trip(numel: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, numel))
    idx = np.sort(np.random.default_rng(data.draw(st.integers(0, 2**32))).choice(numel, k, replace=False))
    idx = idx.astype(np.int64)
    assert np.array_equal(sparse_index.decode_varint(sparse_index.encode_varint(idx), k, numel), idx)
    assert np.array_equal(sparse_index.decode_bitmap(sparse_index.encode_bitmap(idx, numel), k, numel), idx)


def test_varint_matches_reference_leb128() -> None:
    idx = np.array([0, 127, 128 + 127, 128 + 127 + 16384, 2**31], dtype=np.int64)
    ref = bytearray()
    for delta in np.diff(idx, prepend=0).tolist():
        while True:
            byte, delta = delta & 0x7F, delta >> 7
            ref.append(byte | (0x80 if delta else 0))
            if not delta:
                break
    assert sparse_index.encode_varint(idx) == bytes(ref)


def test_stochastic_int8_is_deterministic_with_seed_and_unbiased() -> None:
    x = np.full(4096, 0.305, dtype=np.float32)
    x[::256] = 1.27  # scale 0.01 in each block, so 0.305 is 30.5 codes: rounds to 30 or 31
    spec = {"name": "topk", "density": 1.0, "values": "int8", "stochastic": True, "seed": 5}
    p1, s1 = codecs.encode(spec, x, [x.size])
    p2, _ = codecs.encode(spec, x, [x.size])
    assert p1 == p2
    body = s1.values[x == np.float32(0.305)]
    assert set(np.round(body / 0.01).astype(int).tolist()) == {30, 31}
    assert abs(float(body.mean()) - 0.305) < 0.002
    _, det = codecs.encode({**spec, "stochastic": False}, x, [x.size])
    assert np.unique(det.values[x == np.float32(0.305)]).size == 1


def test_dense_float16_clips_and_zero_model_edge_cases() -> None:
    vec = np.array([1e6, -1e6, 1.0, 70000.0], dtype=np.float32)
    payload, sent = codecs.encode({"name": "dense", "dtype": "float16"}, vec, [4])
    assert sent.values.tolist() == [65504.0, -65504.0, 1.0, 65504.0]
    assert len(payload) == 10 + 8
    for spec in ({"name": "dense"}, {"name": "topk"}, {"name": "randk", "seed": 1}):
        payload, sent = codecs.encode(spec, np.zeros(0, np.float32), [0, 0])
        assert_same(codecs.decode(spec, payload, 0, [0, 0]), sent)


def test_compressible_dense_update_is_zlibbed() -> None:
    vec = np.zeros(100_000, dtype=np.float32)
    vec[-100:] = 1.5
    payload, sent = codecs.encode({"name": "dense"}, vec, [vec.size])
    assert payload[1] & codecs.F_VALUES_ZLIB and len(payload) < 10_000
    assert_same(codecs.decode({"name": "dense"}, payload, vec.size, [vec.size]), sent)


def test_encode_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        codecs.encode({"name": "dense"}, np.array([np.nan], np.float32), [1])
    with pytest.raises(ProtocolError, match="layout sizes sum"):
        codecs.encode({"name": "dense"}, np.zeros(3, np.float32), [2])


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"name": "randk", "density": 0.1}, "seed"),
        ({"name": "randk", "density": 0.1, "seed": -1}, "seed"),
        ({"name": "topk", "density": 0.00001}, "density"),
        ({"name": "topk", "density": 1.5}, "density"),
        ({"name": "topk", "density": float("nan")}, "density"),
        ({"name": "topk", "density": True}, "density"),
        ({"name": "topk", "scope": "layer"}, "scope"),
        ({"name": "topk", "values": "int4"}, "values"),
        ({"name": "topk", "densty": 0.1}, "unknown key"),
        ({"name": "dense", "dtype": "int8"}, "dtype"),
        ({"name": "gzip"}, "unknown codec name"),
        ("dense", "must be a dict"),
    ],
)
def test_validate_spec_rejects(spec: object, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        codecs.validate_spec(spec)  # type: ignore[arg-type]
    assert reason in err.value.reason


def test_validate_spec_fills_defaults() -> None:
    assert codecs.validate_spec({"name": "topk"}) == {
        "name": "topk", "density": 0.01, "scope": "global", "values": "float32",
        "stochastic": False, "error_feedback": True}
    assert codecs.validate_spec({"name": "dense"}) == {"name": "dense", "dtype": "float32", "error_feedback": False}
    assert not codecs.uses_error_feedback({"name": "dense"})
    assert codecs.uses_error_feedback({"name": "dense", "dtype": "float16", "error_feedback": True})


# ---- hostile payloads, built byte by byte from the documented layout ----

NUMEL = 1000
SIZES = [600, 400]
TOPK = {"name": "topk", "density": 0.005}  # k = 5
TOPK16 = {**TOPK, "values": "float16"}
INT8 = {**TOPK, "values": "int8"}
PER_T = {**TOPK, "scope": "per_tensor"}  # k = 3 + 2


def sparse_payload(flags: int, count: int, index: bytes, values: bytes, fmt: bytes = b"S") -> bytes:
    return struct.pack("<cBIII", fmt, flags, count, len(index), len(values)) + index + values


def varint(deltas: list[int]) -> bytes:
    return sparse_index.encode_varint(np.cumsum(np.asarray(deltas, dtype=np.int64)))


GOOD_IDX = varint([1, 10, 10, 10, 10])
F32 = np.arange(1, 6, dtype="<f4").tobytes()


def int8_block(scale: float, codes: list[int]) -> bytes:
    return np.array([scale], "<f4").tobytes() + np.array(codes, np.int8).tobytes()


HOSTILE = [
    ("header", TOPK, b"S\x00\x05", "truncated payload header"),
    ("body", TOPK, sparse_payload(0, 5, GOOD_IDX, F32)[:-1], "truncated payload"),
    ("trailing", TOPK, sparse_payload(0, 5, GOOD_IDX, F32) + b"\x00", "trailing garbage"),
    ("dense-to-topk", TOPK, struct.pack("<cBII", b"D", 0, NUMEL, 4 * NUMEL) + bytes(4 * NUMEL),
     "wrong format byte"),
    ("unknown-format", TOPK, sparse_payload(0, 5, GOOD_IDX, F32, fmt=b"X"), "wrong format byte"),
    ("reserved-flags", TOPK, sparse_payload(0x80, 5, GOOD_IDX, F32), "reserved flag bits"),
    ("value-kind", TOPK16, sparse_payload(0, 5, GOOD_IDX, F32), "value coding mismatch"),
    ("k-declared", TOPK, sparse_payload(0, 6, varint([1, 1, 1, 1, 1, 1]), F32 + F32[:4]), "count mismatch"),
    ("k-actual", TOPK, sparse_payload(0, 5, varint([1, 10, 10, 10]), F32), "index count mismatch"),
    ("out-of-range", TOPK, sparse_payload(0, 5, varint([1, 10, 10, 10, 969]), F32), "index out of range"),
    ("delta-too-big", TOPK, sparse_payload(0, 5, varint([1, 1, 1, 1]) + b"\xe8\x07", F32), "index out of range"),
    ("duplicate", TOPK, sparse_payload(0, 5, varint([1, 10, 0, 10, 10]), F32), "duplicate index"),
    ("varint-trunc", TOPK, sparse_payload(0, 5, GOOD_IDX[:-1] + b"\x81", F32), "truncated varint"),
    ("varint-long", TOPK, sparse_payload(0, 5, GOOD_IDX[:-1] + b"\x81\x80\x00", F32), "varint too long"),
    ("varint-noncanon", TOPK, sparse_payload(0, 5, GOOD_IDX[:-1] + b"\x8a\x00", F32), "non-canonical"),
    ("bitmap-len", TOPK, sparse_payload(codecs.F_INDEX_BITMAP, 5, b"\x1f" + bytes(10), F32), "bitmap length"),
    ("bitmap-count", TOPK, sparse_payload(codecs.F_INDEX_BITMAP, 5, b"\x0f" + bytes(124), F32), "index count mismatch"),
    ("values-len", TOPK, sparse_payload(0, 5, GOOD_IDX, F32[:-4]), "values length mismatch"),
    ("nan", TOPK, sparse_payload(0, 5, GOOD_IDX, F32[:-4] + np.array([np.nan], "<f4").tobytes()), "non-finite values"),
    ("inf16", TOPK16, sparse_payload(1, 5, GOOD_IDX, np.array([1, 2, 3, 4, np.inf], "<f2").tobytes()),
     "non-finite values"),
    ("int8-nan-scale", INT8, sparse_payload(2, 5, GOOD_IDX, int8_block(np.nan, [1] * 5)), "non-finite int8 scale"),
    ("int8-inf-scale", INT8, sparse_payload(2, 5, GOOD_IDX, int8_block(np.inf, [1] * 5)), "non-finite int8 scale"),
    ("int8-neg-scale", INT8, sparse_payload(2, 5, GOOD_IDX, int8_block(-1.0, [1] * 5)), "negative int8 scale"),
    ("int8-overflow", INT8, sparse_payload(2, 5, GOOD_IDX, int8_block(3e38, [127] * 5)), "non-finite values"),
    ("int8-128", INT8, sparse_payload(2, 5, GOOD_IDX, int8_block(1.0, [1, 2, -128, 4, 5])), "-128"),
    ("per-tensor", PER_T, sparse_payload(0, 5, GOOD_IDX, F32), "per-tensor count mismatch"),
    ("zlib-bomb", TOPK, sparse_payload(codecs.F_VALUES_ZLIB, 5, GOOD_IDX, zlib.compress(bytes(1_000_000))),
     "zlib bomb"),
    ("idx-bomb", TOPK, sparse_payload(codecs.F_INDEX_ZLIB, 5, zlib.compress(b"\x01" * 10**6), F32),
     "zlib bomb"),
    ("zlib-corrupt", TOPK, sparse_payload(codecs.F_VALUES_ZLIB, 5, GOOD_IDX, b"not zlib at all"), "corrupt zlib"),
    ("zlib-trunc", TOPK, sparse_payload(codecs.F_VALUES_ZLIB, 5, GOOD_IDX, zlib.compress(F32)[:-3]), "truncated zlib"),
    ("zlib-trailing", TOPK, sparse_payload(codecs.F_VALUES_ZLIB, 5, GOOD_IDX, zlib.compress(F32) + b"x"),
     "trailing garbage after zlib"),
    ("randk-with-index-flag", {"name": "randk", "density": 0.005, "seed": 3},
     struct.pack("<cBII", b"R", codecs.F_INDEX_BITMAP, 5, 20) + F32, "index flags"),
    ("dense-count", {"name": "dense"}, struct.pack("<cBII", b"D", 0, 999, 3996) + bytes(3996), "count mismatch"),
]


def test_hostile_baseline_is_valid() -> None:
    dec = codecs.decode(TOPK, sparse_payload(0, 5, GOOD_IDX, F32), NUMEL, SIZES)
    assert dec.indices.tolist() == [1, 11, 21, 31, 41] and dec.values.tolist() == [1, 2, 3, 4, 5]
    bitmap = np.zeros(NUMEL, bool)
    bitmap[[1, 11, 21, 31, 41]] = True
    packed = np.packbits(bitmap, bitorder="little").tobytes()
    dec = codecs.decode(TOPK, sparse_payload(codecs.F_INDEX_BITMAP, 5, packed, F32), NUMEL, SIZES)
    assert dec.indices.tolist() == [1, 11, 21, 31, 41]


@pytest.mark.parametrize(("spec", "payload", "reason"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_payload_rejected_with_reason(spec: dict, payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        codecs.decode(spec, payload, NUMEL, SIZES)
    assert reason in err.value.reason


def test_bitmap_padding_bits_rejected() -> None:
    numel = 13
    raw = bytearray(np.packbits(np.isin(np.arange(numel), [0]), bitorder="little").tobytes())
    raw[-1] |= 0x80  # bit 15 > numel
    spec = {"name": "topk", "density": 0.15}  # k = ceil(1.95) = 2
    with pytest.raises(ProtocolError, match="padding bits"):
        codecs.decode(spec, sparse_payload(codecs.F_INDEX_BITMAP, 2, bytes(raw), F32[:8]), numel, [numel])


def test_decode_rejects_bad_call_arguments() -> None:
    good = sparse_payload(0, 5, GOOD_IDX, F32)
    with pytest.raises(ProtocolError, match="layout sizes sum"):
        codecs.decode(TOPK, good, NUMEL, [600])
    with pytest.raises(ProtocolError, match="payload must be bytes"):
        codecs.decode(TOPK, "text", NUMEL, SIZES)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="seed"):
        codecs.decode({"name": "randk", "density": 0.1}, good, NUMEL, SIZES)


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from([TOPK, TOPK16, INT8, PER_T, {"name": "dense", "dtype": "float16"},
                             {"name": "randk", "density": 0.005, "values": "int8", "seed": 9},
                             {"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice"}]),
       data=st.data())
def test_mutated_payloads_only_raise_protocol_error(spec: dict, data: st.DataObject) -> None:
    vec = np.random.default_rng(data.draw(st.integers(0, 1000))).standard_normal(NUMEL).astype(np.float32)
    payload = bytearray(codecs.encode(spec, vec, SIZES)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip" and payload:
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del payload[data.draw(st.integers(0, len(payload))):]
        else:
            payload += data.draw(st.binary(min_size=1, max_size=8))
    try:
        dec = codecs.decode(spec, bytes(payload), NUMEL, SIZES)
    except ProtocolError as err:
        assert err.reason
        return
    assert np.isfinite(dec.values).all()
    if dec.indices is not None:
        assert dec.indices.size == dec.values.size and np.all(np.diff(dec.indices) > 0)
        assert dec.indices.size == 0 or 0 <= dec.indices[0] <= dec.indices[-1] < NUMEL
    else:
        assert dec.values.size == NUMEL
