"""Codec key ``stats``: BatchNorm running statistics in a dense block outside the sparse budget."""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from converters.spec_text import codec_label, parse_codec
from coordinator.rounds.strategy import make_strategy
from edge_sdk.dp_clip import sent_norm
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs, quant, stats_block
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.update import clamp_variances, encode_delta, statistics_mask

# a conv, a BatchNorm (weight, bias, running_mean, running_var), a head: statistics sit between weights
ARRAYS = {"conv.weight": np.zeros((32, 3, 3, 3), np.float32), "bn.weight": np.ones(32, np.float32),
          "bn.bias": np.zeros(32, np.float32), "bn.running_mean": np.zeros(32, np.float32),
          "bn.running_var": np.ones(32, np.float32), "bn.num_batches_tracked": np.array(3, np.int64),
          "fc.weight": np.zeros((10, 32), np.float32), "fc.bias": np.zeros(10, np.float32)}
SIZES = layout_sizes(ARRAYS)
MASK = statistics_mask(ARRAYS)
NUMEL = sum(SIZES)
SPARSE_SPECS = [{"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice"},
                {"name": "topk", "density": 0.01, "values": "int8"},
                {"name": "topk", "density": 0.05, "values": "float16", "scope": "per_tensor"},
                {"name": "randk", "density": 0.01, "values": "float32", "seed": 77}]


def _vec(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal(NUMEL).astype(np.float32) * 0.01
    vec[MASK] = rng.standard_normal(int(MASK.sum())).astype(np.float32) * 5.0  # statistics' deltas dominate
    return vec


@pytest.mark.parametrize("base", SPARSE_SPECS)
@pytest.mark.parametrize("kind", stats_block.STATS_KINDS)
def test_round_trip_sends_every_statistic_and_k_weights(base: dict, kind: str) -> None:
    vec = _vec()
    spec = {**base, "stats": kind}
    payload, sent = codecs.encode(spec, vec, SIZES, MASK)
    got = codecs.decode(spec, payload, NUMEL, SIZES, MASK)
    np.testing.assert_array_equal(got.indices, sent.indices)
    np.testing.assert_array_equal(got.values, sent.values)
    dense = got.to_dense(NUMEL)
    # the sparse part is the plain codec over the other coordinates, with their own layout
    other_sizes = stats_block.other_layout(MASK, SIZES)
    assert sum(other_sizes) == NUMEL - 64 and other_sizes[3:5] == [0, 0]
    plain_payload, plain = codecs.encode(base, vec[~MASK], other_sizes)
    np.testing.assert_array_equal(dense[~MASK], plain.to_dense(NUMEL - 64))
    assert payload.startswith(plain_payload)
    assert np.isin(np.flatnonzero(MASK), got.indices).all()  # every statistic, whatever its size
    assert (~MASK[got.indices]).sum() == sum(codecs.expected_counts(base, other_sizes))
    # statistics: rounded toward zero, close to the truth
    assert (np.abs(dense[MASK]) <= np.abs(vec[MASK])).all()
    tol = {"float32": 0.0, "float16": 1e-3, "int8": 1 / 127}[kind]
    np.testing.assert_allclose(dense[MASK], vec[MASK], rtol=0, atol=tol * np.abs(vec[MASK]).max() + 1e-12)


def test_statistics_no_longer_eat_the_budget() -> None:
    """Without the option the large statistics deltas win the k slots; with it k goes to the weights."""
    vec = _vec()
    spec = SPARSE_SPECS[1]
    _, old = codecs.encode(spec, vec, SIZES)
    _, new = codecs.encode({**spec, "stats": "float16"}, vec, SIZES, MASK)
    assert MASK[old.indices].mean() > 0.9
    assert (~MASK[new.indices]).sum() == codecs.expected_counts(spec, [NUMEL - 64])[0]


# sha256 prefixes of payloads made by main at 28939f8, before the option existed
GOLDEN_SIZES = [3000, 64, 64, 64, 2000, 10]
GOLDEN = [({"name": "dense", "dtype": "float32"}, "82cbe61555b2a657"),
          ({"name": "dense", "dtype": "float16"}, "7dcf856cc8d138f6"),
          ({"name": "topk", "density": 0.01, "values": "int8"}, "67cf869e1e735fcb"),
          ({"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice"}, "e78dd0527e7b65b2"),
          ({"name": "topk", "density": 0.05, "values": "float16", "scope": "per_tensor"}, "035f0e1d5b5ed772"),
          ({"name": "topk", "density": 0.01, "values": "int8", "stochastic": True, "seed": 9}, "7b71c45010a4213f"),
          ({"name": "randk", "density": 0.01, "values": "float32", "seed": 77}, "7ceddcdaa6528fae")]


@pytest.mark.parametrize("spec,digest", GOLDEN)
def test_old_specs_give_the_bytes_of_earlier_releases(spec: dict, digest: str) -> None:
    rng = np.random.default_rng(123)
    vec = (rng.standard_normal(sum(GOLDEN_SIZES)) * np.geomspace(1e-3, 10, sum(GOLDEN_SIZES))).astype(np.float32)
    mask = np.zeros(vec.size, bool)
    mask[3064:3192] = True
    payload = codecs.encode(spec, vec, GOLDEN_SIZES)[0]
    assert hashlib.sha256(payload).hexdigest()[:16] == digest
    assert codecs.encode(spec, vec, GOLDEN_SIZES, mask)[0] == payload  # a mask alone changes nothing
    if spec["name"] != "dense":  # "sparse" spelled out = the old behaviour, byte for byte
        assert codecs.encode({**spec, "stats": "sparse"}, vec, GOLDEN_SIZES, mask)[0] == payload
        assert "stats" not in codecs.validate_spec(spec)


def test_spec_validation_and_text_form() -> None:
    with pytest.raises(ProtocolError, match="stats must be one of"):
        codecs.validate_spec({"name": "topk", "stats": "bfloat16"})
    with pytest.raises(ProtocolError, match="unknown key"):
        codecs.validate_spec({"name": "dense", "stats": "float16"})
    spec = parse_codec("topk:0.003:sign:rice:warmup=6/0.25:stats=fp16")
    assert spec["stats"] == "float16" and codec_label(spec) == "topk:0.003:sign:rice:warmup=6/0.25:stats=fp16"
    assert parse_codec("topk:0.01:int8:stats=sparse")["stats"] == "sparse"
    assert codecs.round_spec(spec, 1)["stats"] == "float16"  # survives the warm-up resolution
    # the device's codec digest names the stats kind too: a block of another kind is a wrong codec
    assert codec_digest(spec) == codec_digest(codecs.validate_spec(spec))
    assert codec_digest(spec) != codec_digest({**spec, "stats": "int8"}) != codec_digest({**spec, "stats": "sparse"})


def test_missing_or_wrong_mask_is_refused() -> None:
    spec = {**SPARSE_SPECS[1], "stats": "float16"}
    vec = _vec()
    with pytest.raises(ProtocolError, match="no statistics mask"):
        codecs.encode(spec, vec, SIZES)
    payload, _ = codecs.encode(spec, vec, SIZES, MASK)
    with pytest.raises(ProtocolError, match="no statistics mask"):
        codecs.decode(spec, payload, NUMEL, SIZES)
    with pytest.raises(ProtocolError, match="bool vector of length"):
        codecs.decode(spec, payload, NUMEL, SIZES, MASK[:-1])


def _tamper(payload: bytes, at_end: int, new: bytes) -> bytes:
    return payload[:len(payload) - at_end] + new + payload[len(payload) - at_end + len(new):]


def test_hostile_statistics_blocks_get_a_reason() -> None:
    spec = {**SPARSE_SPECS[1], "stats": "float16"}
    payload, _ = codecs.encode(spec, _vec(), SIZES, MASK)
    block = 10 + 2 * 64  # header + 64 float16 values (random values do not deflate)
    head = payload[:-block]
    count, vlen = struct.unpack_from("<II", payload, len(head) + 2)
    assert payload[len(head):len(head) + 2] == b"B\x01" and (count, vlen) == (64, 128)
    cases = [
        (head + b"B\x01" + struct.pack("<II", 63, 126) + payload[-128:-2], "declares 63 statistics, the model has 64"),
        (head + b"X" + payload[len(head) + 1:], "wrong statistics block byte"),
        (head + b"B\x02" + payload[len(head) + 2:], "value coding mismatch: block has int8, spec says float16"),
        (head + b"B\x41" + payload[len(head) + 2:], "reserved statistics block flag"),
        (payload[:-1], "truncated payload"),
        (head, "statistics block header is missing"),
        (payload + b"\x00", "trailing garbage"),
    ]
    for bad, reason in cases:
        with pytest.raises(ProtocolError, match=reason):
            codecs.decode(spec, bad, NUMEL, SIZES, MASK)


def _device_update(global_arrays: dict, local_var: np.ndarray, spec: dict, seed: int) -> codecs.Decoded:
    local = {k: v.copy() for k, v in global_arrays.items()}
    local["bn.running_var"] = local_var
    local["conv.weight"] += np.random.default_rng(seed).standard_normal(local["conv.weight"].shape).astype(np.float32)
    delta = flatten(local) - flatten(global_arrays)
    payload, _ = codecs.encode(spec, delta, SIZES, MASK)
    return codecs.decode(spec, payload, NUMEL, SIZES, MASK)


@pytest.mark.parametrize("kind", ["float16", "int8"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_aggregated_variances_never_go_negative(kind: str, strategy: str) -> None:
    """Devices whose re-estimated variances collapse (tiny or 0) against a large global variance: the
    aggregate stays >= 0 before any clamp, where round-to-nearest would have crossed zero."""
    glob = {k: v.copy() for k, v in ARRAYS.items()}
    glob["bn.running_var"] = np.random.default_rng(5).uniform(0.5, 300.0, 32).astype(np.float32)
    locals_ = [np.zeros(32, np.float32), np.full(32, 1e-7, np.float32),
               (glob["bn.running_var"] * np.float32(1e-4)).astype(np.float32)]
    spec = {"name": "topk", "density": 0.01, "values": "int8", "stats": kind}
    strat = make_strategy(strategy)
    strat.observe_layout(MASK)
    for rnd in range(3):  # fedavgm carries momentum across rounds; statistics must not ride on it
        acc = strat.begin(flatten(glob))
        for i, var in enumerate(locals_):
            acc.add(_device_update(glob, var, spec, seed=10 * rnd + i), num_samples=10 + i)
        new = unflatten(acc.finalize(), glob)
        assert (new["bn.running_var"] >= 0).all() and clamp_variances(new) == 0
        glob = new
    # the same deltas rounded to nearest: some variance lands below zero
    d = (locals_[1] - glob["bn.running_var"]).astype(np.float32)
    assert (glob["bn.running_var"] + quant.quantize("float16", d)[1] < 0).any()


def test_error_feedback_keeps_statistics_out_of_the_residual(tmp_path) -> None:
    spec = {**SPARSE_SPECS[1], "stats": "float16"}
    store = ResidualStore(tmp_path)
    first, second = _vec(1), _vec(2)
    encode_delta(spec, first, SIZES, store, "job", MASK)
    _, sent = encode_delta(spec, second, SIZES, store, "job", MASK)
    expected, _ = stats_block.encode_block("float16", second[MASK])
    np.testing.assert_array_equal(sent.to_dense(NUMEL)[MASK], stats_block.decode_block(
        "float16", memoryview(expected), 0, 64)[0])  # fresh statistics, no residual added to them
    assert store.apply("job", np.zeros(NUMEL, np.float32))[~MASK].any()  # weights keep their residual


def test_dp_clip_bounds_the_whole_message_with_statistics() -> None:
    spec = {**SPARSE_SPECS[0], "stats": "float16"}
    _, sent = encode_delta(spec, _vec(), SIZES, None, "job", MASK, clip_bound=0.5)
    assert sent_norm(sent) <= 0.5 and MASK[sent.indices].sum() == 64


def test_layout_of_the_sparse_part_handles_empty_tensors() -> None:
    mask = np.array([0, 1, 1, 0, 0, 1], bool)
    assert stats_block.other_layout(mask, [2, 0, 2, 2, 0]) == [1, 0, 1, 1, 0]
    assert stats_block.other_layout(np.zeros(0, bool), [0, 0]) == [0, 0]


def test_int8_statistics_are_scaled_per_tensor() -> None:
    """A layer whose statistics barely move keeps its precision next to one whose variances jump."""
    vec = np.zeros(NUMEL, np.float32)
    idx = np.flatnonzero(MASK)
    vec[idx[:32]] = np.linspace(1e-4, 3e-4, 32, dtype=np.float32)  # running_mean: tiny deltas
    vec[idx[32:]] = np.linspace(10.0, 500.0, 32, dtype=np.float32)  # running_var: large deltas
    spec = {**SPARSE_SPECS[1], "stats": "int8"}
    payload, sent = codecs.encode(spec, vec, SIZES, MASK)
    got = codecs.decode(spec, payload, NUMEL, SIZES, MASK).to_dense(NUMEL)
    np.testing.assert_array_equal(got, sent.to_dense(NUMEL))
    assert stats_block.stats_layout(MASK, SIZES) == [32, 32]
    np.testing.assert_allclose(got[idx[:32]], vec[idx[:32]], rtol=0, atol=3e-4 / 127)  # a shared scale: all 0
    with pytest.raises(ProtocolError, match="declares 64 statistics, the model has 63"):
        short = MASK.copy()
        short[idx[-1]] = False
        codecs.decode(spec, payload, NUMEL, SIZES, short)
