"""Client-level DP-FedAvg: job validation, the accountant, device and server clipping, calibrated noise,
the budget gate (the job stops by itself before exceeding epsilon) and its survival across a restart.

Driven without a broker like tests/test_engine.py; the REST and CLI path with real devices is in
tests/test_privacy_e2e.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from coordinator.privacy import accountant
from coordinator.privacy.mechanism import DPAccumulator, DPMechanism
from coordinator.rounds.clipping import AdaptiveBound, ClipBound, l2_norm
from coordinator.rounds.engine import MemoryPublisher, RoundEngine
from coordinator.rounds.jobspec import JobSpecError, normalize_job
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol.modelfile import flatten, load_model
from edge_sdk.update import encode_delta
from tests.test_engine import JOB, Env, wait_for

MODEL = {"arch": "small_cnn", "in_channels": 1, "image_size": 8}


# ------------------------------------------------------------------------------------------- job spec
def job(**kw):
    return normalize_job({"model": MODEL, "rounds": 10, "clients_per_round": 10, **kw})


def test_privacy_defaults_calibrate_noise_to_the_budget() -> None:
    cfg = job(privacy={"epsilon": 2.0})["privacy"]
    assert cfg["delta"] == 1e-5 and cfg["calibrated"] and cfg["rounds_within_budget"] == 10
    assert cfg["sampling_probability"] == 1.0 and "no sampling amplification" in cfg["amplification"]
    # the calibrated multiplier spends (almost exactly) the budget over the job's rounds, never more
    assert accountant.epsilon(cfg["noise_multiplier"], 10, 1e-5) == pytest.approx(2.0, rel=1e-3)
    assert accountant.epsilon(cfg["noise_multiplier"], 10, 1e-5) <= 2.0
    clip = cfg["clip"]
    assert clip["mode"] == "adaptive" and clip["count_stddev"] >= cfg["noise_multiplier"] / 2
    z, z_upd, sb = cfg["noise_multiplier"], cfg["update_noise_multiplier"], clip["count_stddev"]
    assert z_upd > z and z_upd ** -2 + (2 * sb) ** -2 == pytest.approx(z ** -2)  # Andrew et al., Thm. 1


def test_privacy_job_is_uniformly_weighted_without_device_metrics() -> None:
    cfg = job(privacy={"epsilon": 4.0, "clip": {"mode": "fixed", "bound": 0.5}})
    assert cfg["limits"]["weighting"] == "uniform" and cfg["limits"]["clip"] == {"mode": "none"}
    assert cfg["limits"]["direction"]["mode"] == "none"  # the DP accumulator folds in every clipped update
    assert cfg["eval"]["holdout_fraction"] == 0.0  # device scores are not noised: not collected
    assert cfg["privacy"]["clip"] == {"mode": "fixed", "bound": 0.5}
    assert job()["privacy"] is None and job()["limits"]["weighting"] == "uniform"  # non-DP jobs unchanged


@pytest.mark.parametrize("privacy, extra, needle", [
    ({}, {}, "'privacy.epsilon' is required"),
    ({"epsilon": 0}, {}, "'privacy.epsilon' must be in (0"),
    ({"epsilon": "4"}, {}, "'privacy.epsilon' must be a finite number"),
    ({"epsilon": float("inf")}, {}, "'privacy.epsilon' must be a finite number"),
    ({"epsilon": 4, "delta": 0.5}, {}, "'privacy.delta' must be in (0, 0.1]"),
    ({"epsilon": 4, "delta": 0}, {}, "'privacy.delta' must be in (0"),
    ({"epsilon": 4, "noise_multiplier": -1}, {}, "'privacy.noise_multiplier' must be in (0"),
    ({"epsilon": 1, "noise_multiplier": 0.2}, {}, "one round with noise_multiplier 0.2 already spends"),
    ({"epsilon": 4, "eps": 1}, {}, "unknown field(s) ['eps'] in 'privacy'"),
    ({"epsilon": 4, "clip": {"mode": "median"}}, {}, "'privacy.clip.mode' must be one of fixed, adaptive"),
    ({"epsilon": 4, "clip": {"mode": "fixed", "quantile": 0.5}}, {}, "only apply to mode 'adaptive'"),
    ({"epsilon": 4, "clip": {"bound": 0}}, {}, "'privacy.clip.bound' must be in [1e-06"),
    ({"epsilon": 4, "clip": {"quantile": 1.5}}, {}, "'privacy.clip.quantile' must be in [0, 1]"),
    ({"epsilon": 4, "clip": {"count_stddev": 0.01}}, {}, "count_stddev' 0.01 is too small"),
    ({"epsilon": 1e-6}, {}, "would need a noise multiplier above"),
    ({"epsilon": 4}, {"strategy": {"name": "median"}}, "cannot be combined with 'privacy'"),
    ({"epsilon": 4}, {"limits": {"weighting": "num_samples"}}, "cannot be set with 'privacy'"),
    ({"epsilon": 4}, {"limits": {"clip": {"mode": "none"}}}, "cannot be set with 'privacy'"),
    ({"epsilon": 4}, {"limits": {"direction": {"mode": "cosine"}}}, "cannot be set with 'privacy'"),
    ({"epsilon": 4}, {"eval": {"holdout_fraction": 0.2}}, "'eval.holdout_fraction' must be 0 with 'privacy'"),
    ("lots", {}, "'privacy' must be an object"),
    ({"epsilon": 4, "clip": {"mode": "adaptive"}},  # allowed with fixed clipping (tests/test_privacy_secagg.py)
     {"secure_aggregation": {}, "codec": {"name": "randk", "density": 0.1}, "min_clients": 2},
     "'privacy.clip.mode' 'adaptive' cannot be combined with 'secure_aggregation'"),
])
def test_bad_privacy_specs_name_the_field(privacy, extra, needle) -> None:
    with pytest.raises(JobSpecError) as err:
        job(privacy=privacy, **extra)
    assert needle in str(err.value)


# ------------------------------------------------------------------------------------------ accountant
def test_accountant_agrees_with_dp_accounting_and_the_exact_gaussian_bound() -> None:
    for z, n, delta in ((0.8, 1, 1e-5), (1.5, 20, 1e-5), (5.0, 100, 1e-6)):
        ref = rdp_privacy_accountant.RdpAccountant()
        ref.compose(dp_accounting.GaussianDpEvent(z), n)
        assert accountant.epsilon(z, n, delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
        acc = accountant.Accountant(delta)
        for _ in range(n):
            acc.record(z)
        assert acc.spent() == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
        # independent check: n Gaussian rounds are exactly one Gaussian of multiplier z / sqrt(n), whose exact
        # epsilon(delta) has a closed form (Balle & Wang 2018); RDP is a valid, slightly loose upper bound
        exact = exact_gaussian_epsilon(z / math.sqrt(n), delta)
        assert exact < accountant.epsilon(z, n, delta) < 1.15 * exact


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    def excess(e: float) -> float:
        return stats.norm.cdf(-e * z + 0.5 / z) - math.exp(e) * stats.norm.cdf(-e * z - 0.5 / z) - delta
    return optimize.brentq(excess, 1e-9, 500)


def test_epsilon_is_monotone_and_sampling_amplifies_only_when_claimed() -> None:
    eps = [accountant.epsilon(2.0, n, 1e-5) for n in range(0, 30)]
    assert eps[0] == 0 and all(b > a for a, b in zip(eps, eps[1:]))
    assert accountant.epsilon(4.0, 10, 1e-5) < accountant.epsilon(2.0, 10, 1e-5)
    assert accountant.epsilon(2.0, 10, 1e-5, sampling_probability=0.1) < accountant.epsilon(2.0, 10, 1e-5) / 3
    z = accountant.calibrate_noise(3.0, 1e-5, 25)
    assert accountant.epsilon(z, 25, 1e-5) <= 3.0 < accountant.epsilon(z * 0.99, 25, 1e-5)
    assert accountant.rounds_within(3.0, z, 1e-5, 1000) == 25


def test_accountant_rebuilds_from_stored_rounds() -> None:
    rounds = [{"status": "closed", "privacy": {"noise_multiplier": 2.0, "sampling_probability": 1.0}},
              {"status": "failed", "privacy": None},  # a failed attempt released nothing
              {"status": "closed", "privacy": {"noise_multiplier": 3.0}},
              {"status": "closed"}]  # a round of a job from before DP existed
    acc = accountant.Accountant.from_rounds(1e-5, rounds)
    assert acc.events == [(2.0, 1.0), (3.0, 1.0)]
    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(2.0)).compose(dp_accounting.GaussianDpEvent(3.0))
    assert acc.spent() == pytest.approx(ref.get_epsilon(1e-5))


# ------------------------------------------------------------------------------- device-side clipping
@pytest.mark.parametrize("spec", [{"name": "dense", "dtype": "float32"}, {"name": "dense", "dtype": "float16"},
                                  {"name": "topk", "density": 0.05, "values": "int8", "error_feedback": True},
                                  {"name": "randk", "density": 0.1, "seed": 7, "values": "float16"}])
def test_device_clips_the_transmitted_vector(spec, tmp_path: Path) -> None:
    sizes = [600, 400]
    delta = np.random.default_rng(0).normal(0, 1.0, 1000).astype(np.float32)
    store = ResidualStore(tmp_path)
    _, plain = codecs.encode(codecs.validate_spec(spec), delta, sizes)
    assert l2_norm(plain.values) > 3.0  # the codec's output is well over the bound before clipping
    payload, sent = encode_delta(codecs.validate_spec(spec), delta, sizes, store, "j", clip_bound=0.5)
    decoded = codecs.decode(codecs.validate_spec(spec), payload, 1000, sizes)
    assert l2_norm(decoded.values) <= 0.5 and l2_norm(decoded.values) > 0.45  # what the server reads back
    np.testing.assert_array_equal(decoded.values, sent.values)
    if plain.indices is not None:  # sparse: the same coordinates are sent, only scaled
        np.testing.assert_array_equal(decoded.indices, plain.indices)
    if codecs.uses_error_feedback(spec):  # the residual is what the codec dropped, not what clipping removed
        np.testing.assert_allclose(store.load("j", 1000), delta - plain.to_dense(1000), atol=1e-6)


def test_small_updates_are_sent_unchanged_under_the_bound(tmp_path: Path) -> None:
    spec = codecs.validate_spec({"name": "dense", "dtype": "float32"})
    delta = np.full(100, 0.01, np.float32)
    _, sent = encode_delta(spec, delta, [100], None, "j", clip_bound=1.0)
    np.testing.assert_array_equal(sent.values, delta)


# ---------------------------------------------------------------------------- server: clip and noise
def mechanism(z=2.0, k=10, bound=1.0, adaptive=False, count_stddev=0.0, seed=0) -> DPMechanism:
    rng = np.random.default_rng(seed)
    b = AdaptiveBound(bound, quantile=0.5, lr=0.2, step="round") if adaptive else ClipBound(bound)
    z_upd = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5 if adaptive else z
    return DPMechanism(z, z_upd, k, b, count_stddev, rng_factory=lambda: rng)


class Dense:
    def __init__(self, values):
        self.indices, self.values = None, np.asarray(values, np.float32)


def test_noise_matches_its_calibration() -> None:
    """Zero updates: what is released is pure noise, N(0, (z C / K)^2) per coordinate (KS test)."""
    n, z, k, bound = 200_000, 3.0, 8, 0.7
    acc = DPAccumulator(np.zeros(n, np.float32), None, mechanism(z, k, bound))
    for _ in range(5):
        acc.add(Dense(np.zeros(n)), 1)
    noise = acc.finalize().astype(np.float64)
    sigma = z * bound / k
    assert acc.release["noise_stddev"] == pytest.approx(sigma)
    assert np.std(noise) == pytest.approx(sigma, rel=0.01)  # SE of a std over 2e5 samples: 0.16 %
    assert abs(np.mean(noise)) < 5 * sigma / math.sqrt(n)
    assert stats.kstest(noise / sigma, "norm").pvalue > 1e-6  # unseeded noise: 1e-3 would fail 1 run in 1000
    # and a wrong calibration would be caught: half or double the noise is rejected outright
    assert stats.kstest(noise / (2 * sigma), "norm").pvalue < 1e-6
    assert stats.kstest(noise / (sigma / 2), "norm").pvalue < 1e-6


def test_server_clips_whatever_the_device_sent_and_ignores_num_samples() -> None:
    n, k = 50, 4
    acc = DPAccumulator(np.zeros(n, np.float32), None, mechanism(z=1e-9, k=k, bound=1.0))
    big = np.full(n, 100.0)  # a device that did not clip
    small = np.zeros(n)
    small[0] = 0.5
    assert acc.add(Dense(big), 10_000) == 1.0 and acc.add(Dense(small), 1) == 1.0
    out = acc.finalize()
    expected = (big / np.linalg.norm(big) + small) / k  # clipped to norm 1; divided by clients_per_round
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert acc.release["clip_bound"] == 1.0 and acc.unclipped == 1


def test_adaptive_bound_moves_on_the_noised_unclipped_fraction() -> None:
    k, sb = 10, 3.0
    fractions = []
    for seed in range(400):
        mech = mechanism(z=1.0, k=k, bound=1.0, adaptive=True, count_stddev=sb, seed=seed)
        acc = DPAccumulator(np.zeros(4, np.float32), None, mech)
        for i in range(k):
            acc.add(Dense([0.1 if i < 7 else 9.0, 0, 0, 0]), 1)  # 7 of 10 under the bound
        acc.finalize()
        f = acc.release["noised_unclipped_fraction"]
        fractions.append(f)
        step = min(max(f, 0.0), 1.0) - 0.5  # a noised fraction outside [0, 1] counts as 0 or 1
        assert acc.release["next_clip_bound"] == pytest.approx(math.exp(-0.2 * step))
        assert mech.bound.bound == 1.0  # moves only when the round is committed (JobPrivacy.charge)
    assert np.mean(fractions) == pytest.approx(0.7, abs=4 * sb / k / math.sqrt(400))
    assert np.std(fractions) == pytest.approx(sb / k, rel=0.1)  # the count is noised, not exact


# ------------------------------------------------------------------------------- the budget, enforced
@pytest.fixture
def mk(tmp_path: Path):
    """Round engines over a real store and journal, driven through ``engine.submit`` (tests/test_engine.py)."""
    made: list[Env] = []

    def make(**kw):
        made.append(Env(tmp_path / str(len(made)), **kw))
        return made[-1]

    yield make
    for env in made:
        env.close()


def dp_env(mk, rounds=6, z=2.0, budget=None, clip=None):
    """A DP job whose budget fits exactly ``allowed`` rounds of multiplier z."""
    privacy = {"epsilon": budget, "noise_multiplier": z, "clip": clip or {"mode": "fixed", "bound": 1.0}}
    return mk(rounds=rounds, privacy=privacy, limits=None)


def run_round(env, r, delta_scale=5.0):
    wait_for(lambda: (x := env.engine.current_round(JOB)) is not None and x.round == r, what=f"round {r} open")
    rnd = env.engine.current_round(JOB)
    for cid in "abc":
        task = env.pub.json_on(topics.task_topic(cid))[-1]
        assert task["round"] == r and task["config"]["dp"]["clip_bound"] > 0
        delta = np.full(env.numel, delta_scale, np.float32)
        raw, _ = env.update(cid, delta, n=10**6, metrics={"loss": 0.25}, round_=r)
        assert env.engine.submit(cid, raw).accepted
    wait_for(lambda: env.store.get_job(JOB)["current_round"] == r, what=f"round {r} closed")
    return rnd


def test_job_stops_before_the_round_that_would_exceed_the_budget(mk) -> None:
    z = 2.0
    budget = (accountant.epsilon(z, 3, 1e-5) + accountant.epsilon(z, 4, 1e-5)) / 2  # 3 rounds fit, 4 do not
    env = dp_env(mk, rounds=6, z=z, budget=budget)
    assert env.config["privacy"]["rounds_within_budget"] == 3
    env.engine.start_job(JOB)
    versions = []
    for r in (1, 2, 3):
        run_round(env, r)
        versions.append(env.store.get_job(JOB)["current_version"])
        rec = [x for x in env.store.get_rounds(JOB) if x["round"] == r][0]
        assert rec["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(z, r, 1e-5))
        assert rec["privacy"]["noise_multiplier"] == z and rec["metrics"] == {}  # client metrics not released
    assert env.engine.wait_idle(JOB, 10)
    final = env.store.get_job(JOB)
    assert final["status"] == "finished" and final["current_round"] == 3 and final["current_version"] == versions[-1]
    assert "privacy budget reached: round 4 would raise epsilon" in final["reason"]
    assert [r["round"] for r in env.store.get_rounds(JOB)] == [1, 2, 3]  # round 4 never opened
    (fin,) = [e for e in env.events("job_finished")]
    assert fin["version"] == versions[-1] and "privacy budget" in fin["reason"]
    # the released step is clipped sum + noise over K: never the devices' 5.0 per coordinate, noise std z C / K
    new, _ = load_model(env.svc.models.get(versions[0]))
    old, _ = load_model(env.svc.models.get(env.version0))
    step = flatten(new) - flatten(old)
    assert np.abs(step).max() < 5.0 and np.std(step) == pytest.approx(z * 1.0 / 3, rel=0.2)


def test_accountant_state_survives_a_coordinator_restart(mk) -> None:
    z = 2.0
    budget = (accountant.epsilon(z, 2, 1e-5) + accountant.epsilon(z, 3, 1e-5)) / 2  # 2 rounds fit
    env = dp_env(mk, rounds=5, z=z, budget=budget, clip={"mode": "adaptive", "bound": 1.0, "count_stddev": 5.0})
    env.engine.start_job(JOB)
    run_round(env, 1)
    spent = env.store.get_rounds(JOB)[0]["privacy"]
    env.open_round(2)
    env.engine.shutdown()  # the coordinator goes down with round 2 open
    engine2 = RoundEngine(env.store, env.svc.models, MemoryPublisher(), env.engine.config, env.engine.presence)
    env.engine = engine2
    env.pub = engine2.publisher
    assert engine2.resume() == [JOB]
    runner = engine2._runners[JOB]
    # restored from the store: one round released, the same epsilon, the adaptive bound where round 1 left it
    assert runner._privacy.accountant.events == [(z, 1.0)]
    assert runner._privacy.spent() == pytest.approx(spent["epsilon"])
    assert runner._privacy.mechanism.bound.bound == pytest.approx(spent["next_clip_bound"])
    assert spent["next_clip_bound"] != 1.0  # the noised count moved it; round 2's devices are told the new bound
    wait_for(lambda: env.pub.json_on(topics.task_topic("a")), what="round 2 task after the restart")
    assert env.pub.json_on(topics.task_topic("a"))[-1]["config"]["dp"]["clip_bound"] == spent["next_clip_bound"]
    run_round(env, 2)  # re-opened after the restart (attempt 1 from the journal, or a fresh attempt)
    assert engine2.wait_idle(JOB, 10)
    final = env.store.get_job(JOB)
    assert final["status"] == "finished" and final["current_round"] == 2 and "round 3 would raise" in final["reason"]
    assert env.store.get_rounds(JOB)[-1]["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(z, 2, 1e-5))
    engine2.shutdown()
