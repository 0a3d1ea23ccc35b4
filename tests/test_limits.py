"""Limits on what one device can do to the model: num_samples cap, uniform weighting, L2 clipping (fixed and
adaptive), and the Byzantine-robust strategies under attack."""
from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.rounds.clipping import AdaptiveBound, ClipBound, RoundClipper, clip_update, l2_norm
from coordinator.rounds.jobspec import JobSpecError, normalize_job
from coordinator.rounds.limits import UpdateLimits, normalize_limits
from coordinator.rounds.strategy import STRATEGIES, FedAvg, make_strategy
from edge_sdk.protocol import codecs


class Upd:
    def __init__(self, values, indices=None):
        self.values = np.asarray(values, dtype=np.float32)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)


def plain(**kw) -> UpdateLimits:
    return UpdateLimits(**{"max_num_samples": None, "weighting": "num_samples", **kw})


# ------------------------------------------------------------------------------------------ num_samples
def test_inflated_num_samples_is_capped_to_the_job_limit():
    g = np.zeros(4, np.float32)
    honest, evil = np.ones(4, np.float32), np.full(4, -100.0, np.float32)
    undefended = FedAvg(plain()).begin(g)
    capped = FedAvg(plain(max_num_samples=100)).begin(g)
    for acc in (undefended, capped):
        for _ in range(9):
            acc.add(Upd(honest), 100)
        acc.add(Upd(evil), 10**15)
    assert undefended.finalize()[0] == pytest.approx(-100.0, rel=1e-6)  # the finding: one device wins
    assert capped.finalize()[0] == pytest.approx((9 * 1 - 100) / 10)  # capped: weight 100 like everyone


def test_uniform_weighting_ignores_the_claim_and_metrics_use_the_capped_weight(tmp_path):
    acc = FedAvg(UpdateLimits(weighting="uniform")).begin(np.zeros(2, np.float32))
    assert acc.add(Upd([1, 1]), 1) == 1.0 and acc.add(Upd([3, 3]), 10**12) == 1.0
    np.testing.assert_allclose(acc.finalize(), [2, 2])

    from coordinator.rounds.open_round import OpenRound
    rnd = OpenRound("j", 1, 1, "v", {}, 2, [2], frozenset("ab"), 1 << 20,
                    FedAvg(plain(max_num_samples=10)).begin(np.zeros(2, np.float32)), deadline=0.0)
    with rnd.cond:  # OpenRound.add's contract: the caller holds the round's lock
        rnd.add("a", Upd([0, 0]), 10, 1, {"loss": 1.0})
        rnd.add("b", Upd([0, 0]), 10**9, 1, {"loss": 1e6})
    assert rnd.metrics()["loss"] == pytest.approx((1.0 + 1e6) / 2)  # weights 10 and 10, not 10 and 1e9


def test_limits_spec_defaults_and_errors():
    norm = normalize_job({"name": "x", "model": {"arch": "small_cnn"}})["limits"]
    assert norm == normalize_limits(None)
    assert norm["clip"]["mode"] == "adaptive" and norm["max_num_samples"] >= 1
    body = {"name": "x", "model": {"arch": "small_cnn"}}
    for bad, match in [({"max_num_samples": 0}, "max_num_samples"), ({"weighting": "loud"}, "weighting"),
                       ({"clip": {"mode": "sometimes"}}, "clip.mode"), ({"clip": {"mode": "fixed", "bound": -1}},
                                                                          "clip.bound"),
                       ({"clip": {"mode": "adaptive", "quantile": 2}}, "quantile"), ({"cap": 3}, "unknown")]:
        with pytest.raises(JobSpecError, match=match):
            normalize_job({**body, "limits": bad})
    fixed = normalize_limits({"clip": {"mode": "fixed", "bound": 2}})
    assert fixed["clip"] == {"mode": "fixed", "bound": 2.0}
    assert UpdateLimits.from_config(fixed).bound.bound == 2.0


# ------------------------------------------------------------------------------------------- clipping
def test_fixed_clipping_bounds_dense_and_sparse_updates_without_densifying():
    big = Upd(np.full(100, 10.0))
    clipped, norm = clip_update(big, 1.0)
    assert norm == pytest.approx(100.0) and l2_norm(clipped.values) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped.values / big.values, 0.01, rtol=1e-6)  # direction kept
    small = Upd([0.1, 0.2])
    same, _ = clip_update(small, 1.0)
    np.testing.assert_array_equal(same.values, small.values)

    numel = 1_000_000
    sparse = Upd([3.0, 4.0], indices=[5, 999_999])
    clipped, norm = clip_update(sparse, 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped.values.shape == (2,) and clipped.indices is sparse.indices  # still k values, no dense copy
    np.testing.assert_allclose(clipped.values, [0.6, 0.8], rtol=1e-6)
    acc = FedAvg(plain(bound=ClipBound(1.0))).begin(np.zeros(numel, np.float32))
    acc.add(sparse, 1)
    out = acc.finalize()
    assert out[5] == pytest.approx(0.6) and out[999_999] == pytest.approx(0.8) and np.count_nonzero(out) == 2


def test_real_topk_codec_update_is_clipped_on_its_values():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=5000).astype(np.float32) * 50
    spec = codecs.validate_spec({"name": "topk", "density": 0.02, "values": "float32"})
    payload, _ = codecs.encode(spec, vec, [5000])
    decoded = codecs.decode(spec, payload, 5000, [5000])
    acc = FedAvg(plain(bound=ClipBound(2.0))).begin(np.zeros(5000, np.float32))
    acc.add(decoded, 7)
    assert l2_norm(acc.finalize()) == pytest.approx(2.0, rel=1e-5)


def test_adaptive_bound_direction_follows_the_quantile():
    """b = fraction of norms <= C. b > quantile: the bound is looser than needed and must shrink; b < quantile:
    it must grow; b == quantile: it stays."""
    b = AdaptiveBound(1.0, quantile=0.5, lr=0.2)
    assert b.update(1.0) == pytest.approx(math.exp(-0.2 * 0.5)) and b.bound < 1.0
    b = AdaptiveBound(1.0, quantile=0.5, lr=0.2)
    assert b.update(0.0) == pytest.approx(math.exp(0.2 * 0.5)) and b.bound > 1.0
    b = AdaptiveBound(1.0, quantile=0.5, lr=0.2)
    assert b.update(0.5) == pytest.approx(1.0)


def test_adaptive_bound_converges_to_the_target_quantile_of_norms():
    rng = np.random.default_rng(1)
    bound = AdaptiveBound(100.0, quantile=0.5, lr=0.3)
    for _ in range(150):
        clipper = RoundClipper(bound)
        for norm in rng.uniform(1.0, 3.0, size=20):  # median norm 2
            clipper.clip(Upd([norm]))
        clipper.end_round()
    assert 1.6 < bound.bound < 2.4


def test_adaptive_bound_ignores_a_minority_of_huge_updates():
    rng = np.random.default_rng(2)
    bound = AdaptiveBound(1.0, quantile=0.5, lr=0.3)
    for _ in range(100):
        clipper = RoundClipper(bound)
        for i in range(10):
            clipper.clip(Upd([1e9 if i < 2 else rng.uniform(0.5, 1.5)]))  # 20% attackers
        clipper.end_round()
    assert bound.bound < 2.0  # tracks the honest norms, not the attackers'


def test_per_update_steps_correct_a_bad_starting_bound_in_one_round():
    """The default takes one step per update (at the round's close), so a starting bound 100x off is corrected
    after the first round instead of clipping honest updates to nothing for many rounds; it still settles at
    the median."""
    up = AdaptiveBound(0.01, quantile=0.5, lr=0.5, step="update")
    clipper = RoundClipper(up)
    for _ in range(40):
        clipper.clip(Upd([1.0]))  # every update above the bound
    assert up.bound == 0.01  # the round's updates all met the bound it opened with
    clipper.end_round()
    assert up.bound > 0.5
    down = AdaptiveBound(100.0, quantile=0.5, lr=0.5, step="update")
    clipper = RoundClipper(down)
    for _ in range(40):
        clipper.clip(Upd([1.0]))  # every update under it
    clipper.end_round()
    assert down.bound < 2.0
    rng = np.random.default_rng(5)
    settle = AdaptiveBound(1.0, quantile=0.5, lr=0.1, step="update")
    for _ in range(30):
        clipper = RoundClipper(settle)
        for norm in rng.uniform(1.0, 3.0, size=100):
            clipper.clip(Upd([norm]))
        clipper.end_round()
    assert 1.7 < settle.bound < 2.3
    assert normalize_limits(None)["clip"]["step"] == "update"


def test_round_aggregate_and_next_bound_do_not_depend_on_arrival_order():
    """The same updates delivered in another order give the same new model, bit for bit, and the same next
    bound: the network's timing must not change what a round produces (runs of one seed repeat)."""
    rng = np.random.default_rng(3)
    g = rng.normal(size=64).astype(np.float32)
    updates = [(rng.normal(scale=s, size=64).astype(np.float32), n) for s, n in
               [(0.5, 113), (2.0, 139), (1.0, 201), (4.0, 251), (1.5, 296)]]
    results = []
    for order in ([0, 1, 2, 3, 4], [1, 0, 4, 2, 3], [4, 3, 2, 1, 0]):
        limits = UpdateLimits.from_config(None)  # the job defaults: adaptive clip, one step per update
        acc = FedAvg(limits).begin(g)
        for i in order:
            acc.add(Upd(updates[i][0]), updates[i][1])
        results.append((acc.finalize(), limits.bound.bound))
    for vec, bound in results[1:]:
        assert np.array_equal(vec, results[0][0])
        assert bound == results[0][1]
    assert results[0][1] != UpdateLimits.from_config(None).bound.bound  # the bound did move


def test_accumulator_adapts_the_bound_once_per_finalized_round():
    limits = plain(bound=AdaptiveBound(1.0, quantile=0.5, lr=0.5))
    s = FedAvg(limits)
    acc = s.begin(np.zeros(3, np.float32))
    for _ in range(4):
        acc.add(Upd([0.1, 0, 0]), 1)  # all under the bound: b = 1 > 0.5, shrink
    acc.finalize()
    assert limits.bound.bound == pytest.approx(math.exp(-0.25))
    s.begin(np.zeros(3, np.float32))  # a round that never finalizes (too few clients) leaves it alone
    assert limits.bound.bound == pytest.approx(math.exp(-0.25))


# ------------------------------------------------------------------------------------- robust strategies
def _attack_round(strategy, rng, honest_mean, n_honest=8, n_evil=2):
    acc = strategy.begin(np.zeros(honest_mean.size, np.float32))
    for _ in range(n_honest):
        acc.add(Upd(honest_mean + rng.normal(scale=0.1, size=honest_mean.size)), 100)
    for _ in range(n_evil):
        acc.add(Upd(-50.0 * honest_mean), 10**9)  # scaled sign flip with an inflated claim
    return acc.finalize()


@pytest.mark.parametrize("name", ["trimmed_mean", "median"])
def test_robust_strategies_resist_a_minority_attack(name):
    assert name in STRATEGIES or make_strategy(name)
    rng = np.random.default_rng(3)
    honest = np.linspace(0.5, 1.5, 50).astype(np.float32)
    out = _attack_round(make_strategy({"name": name}, plain()), rng, honest)  # no cap, no clipping at all
    assert np.abs(out - honest).max() < 0.2
    undefended = _attack_round(make_strategy("fedavg", plain()), rng, honest)
    assert np.all(undefended < 0)  # the same attack wrecks FedAvg


def test_trimmed_mean_matches_the_exact_statistic_and_bounds_its_buffer():
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(10, 300)).astype(np.float32)
    s = make_strategy({"name": "trimmed_mean", "trim": 0.2}, plain())
    acc = s.begin(np.zeros(300, np.float32))
    for r in rows:
        acc.add(Upd(r), 1)
    ordered = np.sort(rows, axis=0)
    np.testing.assert_allclose(acc.finalize(), ordered[2:8].mean(axis=0), rtol=1e-5, atol=1e-6)

    small = make_strategy({"name": "trimmed_mean", "buffer": 4}, plain()).begin(np.zeros(300, np.float32))
    for i, r in enumerate(rows):
        small.add(Upd(r), 1)
        assert len(small._rows) < 4  # flushed whenever it fills: memory is buffer x numel at most
    assert small.count == 10 and np.isfinite(small.finalize()).all()

    sparse = make_strategy("median", plain()).begin(np.zeros(6, np.float32))
    for v in (1.0, 2.0, 3.0):
        sparse.add(Upd([v], indices=[2]), 1)
    np.testing.assert_allclose(sparse.finalize(), [0, 0, 2, 0, 0, 0])


def test_robust_strategy_params_are_validated():
    for spec, match in [({"name": "trimmed_mean", "trim": 0.7}, "trim"), ({"name": "median", "buffer": 0}, "buffer"),
                        ({"name": "median", "trim": 0.1}, "no parameter")]:
        with pytest.raises(ValueError, match=match):
            make_strategy(spec)
    cfg = normalize_job({"name": "x", "model": {"arch": "small_cnn"}, "strategy": {"name": "trimmed_mean"}})
    assert cfg["strategy"] == {"name": "trimmed_mean", "trim": 0.2, "buffer": 64.0}
