"""Streaming aggregation: FedAvg equals the numpy reference for dense/sparse mixes; memory stays O(model)."""
from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest

from coordinator.rounds.strategy import FedAdam, FedAvg, FedProx, FedYogi, STRATEGIES, make_strategy, round_seed
from edge_sdk.protocol import codecs

RNG = np.random.default_rng(0)


def _sparse(vec: np.ndarray, k: int) -> codecs.Decoded:
    idx = np.sort(RNG.choice(vec.size, size=k, replace=False)).astype(np.int64)
    return codecs.Decoded(idx, vec[idx].astype(np.float32))


def test_fedavg_weighted_mean_dense_and_sparse_mix():
    n = 5000
    g = RNG.normal(size=n).astype(np.float32)
    updates = []
    for i in range(7):
        delta = RNG.normal(size=n).astype(np.float32)
        dec = codecs.Decoded(None, delta) if i % 2 == 0 else _sparse(delta, 300)
        updates.append((dec, int(RNG.integers(1, 500))))
    acc = FedAvg().begin(g)
    for dec, w in updates:
        acc.add(dec, w)
    total = sum(w for _, w in updates)
    expected = g.astype(np.float64) + sum(w * d.to_dense(n).astype(np.float64) for d, w in updates) / total
    out = acc.finalize()
    assert out.dtype == np.float32 and acc.count == 7 and acc.total_weight == total
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_real_codecs_roundtrip_into_accumulator():
    n, sizes = 4096, [4000, 96]
    g = np.zeros(n, np.float32)
    deltas = [RNG.normal(size=n).astype(np.float32) for _ in range(3)]
    specs = [{"name": "dense", "dtype": "float32"}, {"name": "topk", "density": 0.05},
             {"name": "randk", "density": 0.05, "seed": 7}]
    acc = FedAvg().begin(g)
    sent = []
    for spec, d in zip(specs, deltas):
        payload, what = codecs.encode(spec, d, sizes)
        acc.add(codecs.decode(spec, payload, n, sizes), 10)
        sent.append(what.to_dense(n))
    np.testing.assert_allclose(acc.finalize(), np.mean(sent, axis=0), rtol=1e-6, atol=1e-7)


def test_accumulator_rejects_bad_shapes_without_side_effects():
    acc = FedAvg().begin(np.zeros(10, np.float32))
    acc.add(codecs.Decoded(None, np.ones(10, np.float32)), 2)
    bad = [codecs.Decoded(None, np.ones(9, np.float32)),
           codecs.Decoded(np.array([3, 1], np.int64), np.ones(2, np.float32)),  # unsorted
           codecs.Decoded(np.array([1, 1], np.int64), np.ones(2, np.float32)),  # duplicate
           codecs.Decoded(np.array([10], np.int64), np.ones(1, np.float32)),  # out of range
           codecs.Decoded(np.array([-1], np.int64), np.ones(1, np.float32)),
           codecs.Decoded(np.array([1, 2], np.int64), np.ones(3, np.float32))]
    for dec in bad:
        with pytest.raises(ValueError):
            acc.add(dec, 5)
    with pytest.raises(ValueError):
        acc.add(codecs.Decoded(None, np.ones(10, np.float32)), 0)
    assert acc.count == 1 and acc.total_weight == 2
    np.testing.assert_array_equal(acc.finalize(), np.ones(10, np.float32))


def test_finalize_without_updates_raises():
    with pytest.raises(ValueError):
        FedAvg().begin(np.zeros(3, np.float32)).finalize()


def test_accumulator_does_not_keep_updates():
    n = 200_000  # 800 kB per update
    acc = FedAvg().begin(np.zeros(n, np.float32))
    refs = []
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(40):  # 32 MB of updates in total
        values = np.full(n, float(i), np.float32)
        refs.append(weakref.ref(values))
        acc.add(codecs.Decoded(None, values), 1)
        del values
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(r() is None for r in refs)  # no update array is referenced after add()
    assert current - base < 2 * 4 * n and peak - base < 4 * 8 * n  # a few model-sized buffers, not 40
    assert acc.finalize()[0] == pytest.approx(np.mean(np.arange(40)))


def test_fedprox_puts_mu_in_task_config_and_aggregates_like_fedavg():
    job = {"id": "j", "config": {"seed": 1, "train": {"epochs": 2, "batch_size": 8, "lr": 0.1, "mu": 0.0},
                                 "codec": {"name": "dense", "dtype": "float32"}}}
    cfg = FedProx(mu=0.3).configure_round(job, 1, ["a"])
    assert cfg["mu"] == 0.3 and cfg["epochs"] == 2 and cfg["codec"] == {"name": "dense", "dtype": "float32"}
    assert FedAvg().configure_round(job, 1, ["a"])["mu"] == 0.0
    g = np.arange(4, dtype=np.float32)
    a, b = FedAvg().begin(g), FedProx(mu=0.3).begin(g)
    for acc in (a, b):
        acc.add(codecs.Decoded(None, np.ones(4, np.float32)), 3)
    np.testing.assert_array_equal(a.finalize(), b.finalize())


def test_randk_seed_is_fresh_per_round_and_attempt_and_shared_by_clients():
    job = {"id": "j", "config": {"seed": 0, "train": {}, "codec": {"name": "randk", "density": 0.1, "seed": 0}}}
    s = FedAvg()
    seeds = {s.configure_round(job, r, ["a", "b"], attempt=a)["codec"]["seed"] for r in (1, 2) for a in (1, 2)}
    assert len(seeds) == 4
    assert s.configure_round(job, 1, ["a"])["codec"] == s.configure_round(job, 1, ["b", "c"])["codec"]
    assert round_seed(0, 1, 1) == round_seed(0, 1, 1) != round_seed(1, 1, 1)


def test_fedadam_matches_reference_over_two_rounds():
    p = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    s = FedAdam(**p)
    g = np.zeros(3, np.float32)
    m = np.zeros(3)
    v = np.full(3, p["tau"] ** 2)
    for delta in (np.array([1.0, -2.0, 0.0]), np.array([0.5, 0.5, 0.5])):
        acc = s.begin(g)
        acc.add(codecs.Decoded(None, delta.astype(np.float32)), 4)
        out = acc.finalize()
        m = p["beta1"] * m + (1 - p["beta1"]) * delta
        v = p["beta2"] * v + (1 - p["beta2"]) * delta ** 2
        ref = g + p["eta"] * m / (np.sqrt(v) + p["tau"])
        np.testing.assert_allclose(out, ref, rtol=1e-5)
        g = out


def test_fedyogi_second_moment_differs_from_adam():
    a, y = FedAdam(), FedYogi()
    g = np.zeros(2, np.float32)
    for s in (a, y):
        for _ in range(2):
            acc = s.begin(g)
            acc.add(codecs.Decoded(None, np.array([1.0, 0.1], np.float32)), 1)
            acc.finalize()
    assert not np.allclose(a.v, y.v)
    assert y.v[0] == pytest.approx((1e-3) ** 2 + 2 * 0.01 * 1.0)  # additive: +(1-b2)*d^2 each round


def test_registry_and_errors():
    assert set(STRATEGIES) >= {"fedavg", "fedprox", "fedadam", "fedyogi"}
    assert isinstance(make_strategy(None), FedAvg)
    assert make_strategy({"name": "fedadam", "eta": 0.5}).params["eta"] == 0.5
    for bad in ({"name": "nope"}, {"name": "fedavg", "mu": 1}, {"name": "fedadam", "eta": -1}, 42):
        with pytest.raises(ValueError):
            make_strategy(bad)
