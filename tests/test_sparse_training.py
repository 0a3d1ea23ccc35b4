"""Options for sparse training on skewed data: server momentum, the density warm-up a job announces, and the
compact update header devices send (its codec digest must still match the round's codec)."""
from __future__ import annotations

import numpy as np
import pytest

from coordinator.rounds.strategy import FedAvg, FedAvgM, make_strategy
from coordinator.rounds.validation import comparable_codec
from edge_sdk.protocol import codecs
from edge_sdk.protocol.codec_digest import DIGEST_BYTES, codec_digest
from edge_sdk.update import wire_metrics


def _round(strategy: FedAvg, g: np.ndarray, decoded: codecs.Decoded) -> np.ndarray:
    acc = strategy.begin(g)
    acc.add(decoded, 5)
    return acc.finalize()


def test_fedavgm_matches_reference_and_keeps_moving_coordinates_a_sparse_round_missed():
    s = FedAvgM(beta=0.5, eta=0.8)
    g = np.zeros(3, np.float32)
    g1 = _round(s, g, codecs.Decoded(np.array([0, 2]), np.array([1.0, -2.0], np.float32)))
    np.testing.assert_allclose(g1, [0.8, 0.0, -1.6])
    # the next update only touches coordinate 1; momentum still moves 0 and 2 (FedAvg would not)
    g2 = _round(s, g1, codecs.Decoded(np.array([1]), np.array([1.0], np.float32)))
    np.testing.assert_allclose(g2, g1 + 0.8 * np.array([0.5, 1.0, -1.0]), rtol=1e-6)
    assert _round(FedAvg(), g1, codecs.Decoded(np.array([1]), np.array([1.0], np.float32)))[0] == g1[0]


def test_fedavgm_state_survives_a_restart_and_rejects_beta_one():
    a = FedAvgM()
    g = np.zeros(2, np.float32)
    _round(a, g, codecs.Decoded(None, np.array([1.0, 2.0], np.float32)))
    b = make_strategy({"name": "fedavgm"})
    b.load_state(a.state())
    d = codecs.Decoded(None, np.array([0.5, 0.5], np.float32))
    np.testing.assert_array_equal(_round(a, g, d), _round(b, g, d))
    assert FedAvgM.defaults == {"beta": 0.7, "eta": 0.7}
    with pytest.raises(ValueError, match="beta"):
        FedAvgM(beta=1.0)


def test_configure_round_announces_the_warmup_density_of_each_round():
    codec = codecs.validate_spec({"name": "topk", "density": 0.01, "values": "sign", "index_coding": "rice",
                                  "warmup_rounds": 2, "warmup_density": 0.04})
    job = {"id": "j", "config": {"seed": 0, "train": {}, "codec": codec}}
    specs = [FedAvg().configure_round(job, r, ["a"])["codec"] for r in (1, 2, 3, 9)]
    assert [s["density"] for s in specs] == [0.04, 0.02, 0.01, 0.01]
    assert all("warmup_rounds" not in s and s["values"] == "sign" for s in specs)
    k_first = sum(codecs.expected_counts(specs[0], [10_000]))
    assert k_first == 4 * sum(codecs.expected_counts(specs[-1], [10_000]))


@pytest.mark.parametrize("spec", [
    {"name": "dense"}, {"name": "dense", "dtype": "float16", "error_feedback": True},
    {"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice"},
    {"name": "topk", "density": 0.01, "values": "int8", "error_feedback": False, "scope": "per_tensor"},
    {"name": "randk", "density": 0.05, "values": "float16", "seed": 123456789},
])
def test_codec_digest_names_what_the_coordinator_decodes(spec: dict):
    """The header's 8-byte digest: equal for every spelling of one spec (defaults written out or not, any
    encoder-only choice), different as soon as a decode-relevant key differs."""
    norm = codecs.validate_spec(spec)
    digest = codec_digest(spec)
    assert len(digest) == DIGEST_BYTES and codec_digest(norm) == digest
    assert codec_digest({**norm, "error_feedback": not norm["error_feedback"]}) == digest
    if spec["name"] != "dense":
        assert codec_digest({**norm, "stochastic": True}) == digest
        assert codec_digest({**norm, "density": norm["density"] / 2}) != digest
        assert comparable_codec({**norm, "stochastic": True}) == comparable_codec(spec)
    else:
        other = "float16" if norm["dtype"] == "float32" else "float32"
        assert codec_digest({**norm, "dtype": other}) != digest
    if spec["name"] == "randk":
        assert codec_digest({**norm, "seed": norm["seed"] + 1}) != digest


def test_wire_metrics_round_to_four_significant_digits():
    assert wire_metrics({"loss": 0.123456789, "accuracy": 0.9583333333333334, "n": 360.0}) == {
        "loss": 0.1235, "accuracy": 0.9583, "n": 360.0}


def test_fedavgm_averages_batchnorm_statistics_without_momentum():
    """Running statistics are estimates: momentum on them overshoots (server accuracy swung 10-90 % in the
    demo before this), so they get the plain mean delta and no momentum state."""
    s = FedAvgM(beta=0.9, eta=1.0)
    stats = np.array([False, True])
    s.observe_layout(stats)
    g = np.zeros(2, np.float32)
    for _ in range(3):
        g = _round(s, g, codecs.Decoded(None, np.array([1.0, 1.0], np.float32)))
    assert g[1] == pytest.approx(3.0)                  # three plain steps of 1
    assert g[0] == pytest.approx(1 + 1.9 + 2.71)       # momentum: 1, 1.9, 2.71
    assert s.m is not None and s.m[1] == 0.0
