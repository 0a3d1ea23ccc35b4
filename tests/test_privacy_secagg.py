"""DP with secure aggregation (issue 8, item 5): the privacy spec drives the devices' clip and Skellam noise,
the coordinator adds none, every secure round is charged through Google's dp-accounting, and the job stops
by itself before a round that would exceed its budget (in-process, REST, restart).

Devices are driven through ``engine.submit_secagg`` as in tests/test_secagg_flow.py; the end-to-end job over
a real Mosquitto is in tests/test_secagg_e2e.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.api.app import create_app
from coordinator.cli.tables import privacy_summary
from coordinator.privacy import accountant
from coordinator.privacy.budget import JobPrivacy
from coordinator.privacy.distributed import (DistributedDPAccumulator, accounted_noise_multiplier,
                                             device_noise_multiplier)
from coordinator.rounds.engine import MemoryPublisher, RoundEngine
from coordinator.rounds.jobspec import JobSpecError, normalize_job
from coordinator.secagg.flow import round_params
from coordinator.secagg.local import run_round
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol import topics
from edge_sdk.protocol.modelfile import flatten, load_model
from edge_sdk.secagg import noise
from edge_sdk.secagg.device import SecAggDevice
from edge_sdk.secagg.ring import FixedPoint
from edge_sdk.secagg.update import encode_secure, round_indices
from tests.test_engine import JOB, Env, wait_for

MODEL = {"arch": "small_cnn", "in_channels": 1, "image_size": 8}
RANDK = {"name": "randk", "density": 0.25, "error_feedback": True}
DELTA = 1e-5


def secure_dp_job(privacy: dict, **kw) -> dict:
    return normalize_job({"model": MODEL, "rounds": 10, "clients_per_round": 10, "codec": RANDK,
                          "secure_aggregation": {"phase_timeout_s": 3}, "privacy": privacy, **kw})


# ------------------------------------------------------------------------------------------- job spec
def test_jobspec_accepts_privacy_with_secure_aggregation_and_lets_privacy_drive_the_devices() -> None:
    cfg = secure_dp_job({"epsilon": 4.0, "clip": {"bound": 0.5}})
    p, sa = cfg["privacy"], cfg["secure_aggregation"]
    assert p["mechanism"] == "distributed" and p["clip"] == {"mode": "fixed", "bound": 0.5}  # fixed by default
    assert "zero-out" in p["adjacency"] and p["sampling_probability"] == 1.0
    # calibrated on the distributed accountant: all 10 rounds fit, 11 would not
    assert p["rounds_within_budget"] == 10
    assert accountant.epsilon(p["noise_multiplier"], 10, DELTA, distributed=True) <= 4.0
    assert accountant.epsilon(p["noise_multiplier"], 11, DELTA, distributed=True) > 4.0
    # devices clip to privacy's bound and add a hair more than the charged z (the Skellam surcharge)
    assert sa["clip"] == 0.5 and sa["noise_multiplier"] == p["update_noise_multiplier"]
    assert p["noise_multiplier"] < sa["noise_multiplier"] < p["noise_multiplier"] * (1 + 1e-6)
    # DP device rules hold: uniform weight, no server clip or direction screen, no device-reported scores
    assert cfg["limits"]["weighting"] == "uniform" and cfg["limits"]["clip"] == {"mode": "none"}
    assert cfg["eval"]["holdout_fraction"] == 0.0


@pytest.mark.parametrize("privacy, extra, needle", [
    ({"epsilon": 4.0, "clip": {"mode": "adaptive"}}, {},
     "'privacy.clip.mode' 'adaptive' cannot be combined with 'secure_aggregation'"),
    ({"epsilon": 4.0}, {"secure_aggregation": {"clip": 2.0}}, "field(s) ['clip'] cannot be set with 'privacy'"),
    ({"epsilon": 4.0}, {"secure_aggregation": {"noise_multiplier": 1.0}},
     "field(s) ['noise_multiplier'] cannot be set with 'privacy'"),
    ({"epsilon": 4.0}, {"codec": {"name": "topk", "density": 0.1}}, "not offered under secure aggregation"),
    ({"epsilon": 0.01}, {}, "more than the 100 the secure-aggregation ring is sized for"),
])
def test_jobspec_refuses_what_secure_dp_cannot_honour_with_a_reason(privacy, extra, needle) -> None:
    with pytest.raises(JobSpecError) as err:
        secure_dp_job(privacy, **extra)
    assert needle in str(err.value)


def test_rest_accepts_the_combination_and_refuses_adaptive_clip_with_a_400(tmp_path: Path) -> None:
    app = create_app({"data_dir": tmp_path, "evaluate": False, "broker_url": "mqtt://127.0.0.1:1999"})
    try:
        http = app.test_client()
        token = app.extensions["fedsight"].credentials.path("operator-token").read_text().strip()
        http.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        body = {"name": "sdp", "model": {**MODEL, "num_classes": 10}, "rounds": 3, "clients_per_round": 4,
                "codec": RANDK, "secure_aggregation": {}, "privacy": {"epsilon": 8.0}}
        ok = http.post("/api/v1/jobs", json=body)
        assert ok.status_code == 201, ok.json
        assert ok.json["config"]["privacy"]["mechanism"] == "distributed"
        bad = http.post("/api/v1/jobs", json={**body, "privacy": {"epsilon": 8.0, "clip": {"mode": "adaptive"}}})
        assert bad.status_code == 400 and "coordinator never sees one device's update" in bad.json["error"]
    finally:
        app.extensions["fedsight"].close()


# ------------------------------------------------------------------------------------------ accounting
def test_secure_rounds_are_charged_as_a_gaussian_of_the_guaranteed_z_via_the_library() -> None:
    z, rounds = 1.3, 7
    acc = accountant.Accountant(DELTA, distributed=True)
    for _ in range(rounds):
        acc.record(z)
    lib = rdp_privacy_accountant.RdpAccountant(accountant.INTEGER_ORDERS,
                                               dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    lib.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert acc.spent() == pytest.approx(lib.get_epsilon(DELTA), rel=1e-12)
    central = accountant.epsilon(z, rounds, DELTA)  # the central accountant's finer (fractional) orders
    assert central <= acc.spent() <= central * 1.01  # integer orders cost under 1 %
    # what a secure round's release charges, from the job's own budget object
    privacy = secure_dp_job({"epsilon": 50.0, "noise_multiplier": z})["privacy"]
    jp = JobPrivacy(privacy, 10)
    assert isinstance(jp.mechanism.accumulator(np.zeros(4, np.float32), lambda g, d: g + d), DistributedDPAccumulator)
    assert jp.accountant.distributed and jp.mechanism.noise_multiplier == z


def _skellam_rdp(alpha: int, mu: float, d2: float, d1: float) -> float:
    """Agarwal, Kairouz & Liu 2021 (NeurIPS), Thm. 3.5 / Cor. 3.6: RDP of the multi-dimensional Skellam mechanism
    of per-coordinate variance ``mu`` at integer order ``alpha`` with L2 / L1 sensitivities ``d2`` / ``d1``."""
    return alpha * d2 ** 2 / (2 * mu) + min(((2 * alpha - 1) * d2 ** 2 + 6 * d1) / (4 * mu ** 2), 3 * d1 / (2 * mu))


@pytest.mark.parametrize("z", [0.3, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("sensitivity", [noise.MIN_NOISY_SENSITIVITY, 1e6])
def test_the_skellam_sum_costs_at_most_the_charged_gaussian_and_the_gap_is_negligible(z, sensitivity) -> None:
    """Devices add z_dev; the sum's Skellam RDP (paper's closed form, worst case D1 = D2^2 of an integer vector)
    is below the Gaussian the accountant charges at every order it uses, and within 1e-5 of it."""
    z_dev = device_noise_multiplier(z)
    assert accounted_noise_multiplier(z_dev) == pytest.approx(z, rel=1e-12)
    mu, d2 = (z_dev * sensitivity) ** 2, sensitivity
    orders = accountant.INTEGER_ORDERS
    skellam = np.array([_skellam_rdp(a, mu, d2, d2 ** 2) for a in orders])
    gaussian = np.array([a / (2 * z * z) for a in orders])
    assert np.all(skellam <= gaussian * (1 + 1e-12))
    assert np.all(skellam >= gaussian * (1 - 1e-5))
    rounds = 10
    eps_skellam, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * skellam, DELTA)
    charged = accountant.epsilon(z, rounds, DELTA, distributed=True)
    assert eps_skellam <= charged * (1 + 1e-12) and eps_skellam == pytest.approx(charged, rel=1e-5)


# ------------------------------------------------------------------------------------ devices and noise
def test_survivors_sum_carries_at_least_the_calibrated_noise() -> None:
    """Any >= t survivors: the unmasked sum of zero updates is the noise alone, std z_dev sqrt(s/t) S >= z S."""
    cfg = secure_dp_job({"epsilon": 8.0, "noise_multiplier": 0.7, "clip": {"bound": 2.0}}, clients_per_round=8,
                        min_clients=3)
    k = 4000
    params = round_params(cfg, k)
    assert params.clip == 2.0 and params.noise_multiplier == cfg["privacy"]["update_noise_multiplier"]
    inputs = {f"c-{i}": np.zeros(k) for i in range(8)}
    out = run_round(inputs, params, drop_after_masking={"c-6", "c-7"}, rng=np.random.default_rng(3))
    assert out.error is None and out.result is not None
    s, t = len(out.result.survivors), out.server.min_devices
    assert s == 6 and t == 5  # a strict majority of 8 holders
    fixed = out.server.fixed
    sens = noise.sensitivity(2.0, fixed.scale, k)
    assert fixed.clip * fixed.scale >= noise.MIN_NOISY_SENSITIVITY  # what the accounting's bound assumes
    assert out.result.effective_noise_multiplier == pytest.approx(params.noise_multiplier * math.sqrt(s / t))
    assert np.std(out.result.sum * fixed.scale) == pytest.approx(out.result.effective_noise_multiplier * sens, rel=0.05)
    assert np.std(out.result.sum) > 0.95 * 0.7 * 2.0  # in update units: at least z C, whoever survived


def test_device_clips_what_it_sends_and_keeps_only_unsent_coordinates_as_residual(tmp_path: Path) -> None:
    spec = {**RANDK, "seed": 11}
    numel, clip = 2000, 1.0
    delta = np.random.default_rng(0).normal(0, 1.0, numel).astype(np.float32)  # norm ~ 22 on k: clipped
    fixed = FixedPoint.for_round(clip, 10, 500)
    idx = round_indices(spec, numel)
    for dp in (True, False):
        store = ResidualStore(tmp_path / str(dp))
        ring, sent = encode_secure(spec, delta, fixed, store, "j", dp=dp)
        assert np.linalg.norm(sent.values) <= clip + fixed.resolution * math.sqrt(idx.size)
        residual = store.apply("j", np.zeros(numel, np.float32))
        others = np.setdiff1d(np.arange(numel), idx)
        assert np.array_equal(residual[others], delta[others])  # what the codec did not send, either way
        if dp:  # what clipping cut is not fed back (it would grow whenever updates are clipped)
            assert np.all(residual[idx] == 0)
        else:
            assert np.abs(residual[idx]).max() > 0.5


# --------------------------------------------------------------------------- the budget, enforced
Z = 1.0


def secure_env(tmp_path: Path, budget_rounds: int = 2, rounds: int = 4) -> Env:
    """Three devices, a budget that fits ``budget_rounds`` rounds of multiplier Z on the distributed accountant."""
    eps = [accountant.epsilon(Z, n, DELTA, distributed=True) for n in (budget_rounds, budget_rounds + 1)]
    return Env(tmp_path, clients="abc", online="abc", rounds=rounds, clients_per_round=3, min_clients=2,
               codec=RANDK, limits=None, secure_aggregation={"phase_timeout_s": 3},
               privacy={"epsilon": sum(eps) / 2, "noise_multiplier": Z, "clip": {"bound": 1.0}})


def _relayed(env: Env, cid: str, kind: int, rnd) -> sw.SecAggMessage:
    found: list[sw.SecAggMessage] = []

    def have() -> bool:
        found[:] = [m for t, p in list(env.pub.messages) if t == topics.relay_topic(cid) for m in [sw.decode(p)]
                    if m.kind == kind and (m.round, m.attempt) == (rnd.round, rnd.attempt)]
        return bool(found)

    wait_for(have, timeout=10, what=f"{sw.KIND_NAMES[kind]} for {cid} in round {rnd.round}")
    return found[0]


def drive_secure_round(env: Env, round_: int) -> None:
    """Every device runs the protocol for the open attempt of ``round_`` with a large (clipped) update."""
    wait_for(lambda: (r := env.engine.current_round(JOB)) is not None and r.round == round_ and r.secagg is not None,
             what=f"secure round {round_}")
    rnd = env.engine.current_round(JOB)
    task = [t for t in env.pub.json_on(topics.task_topic("a"))
            if (t["round"], t["attempt"]) == (round_, rnd.attempt)][0]
    assert task["config"]["dp"] == {"clip_bound": 1.0} and task["config"]["secure_aggregation"]["clip"] == 1.0
    send = lambda c, m: env.engine.submit_secagg(c, sw.encode(m, env.engine.device_key(c)))  # noqa: E731
    devs = {c: SecAggDevice(c, JOB, round_, rnd.attempt) for c in "abc"}
    for c, d in devs.items():
        assert send(c, d.advertise()) is None
    for c, d in devs.items():
        assert send(c, d.share(_relayed(env, c, sw.ROSTER, rnd))) is None
    for c, d in devs.items():
        d.receive_inbox(_relayed(env, c, sw.INBOX, rnd))
        assert d.fixed is not None and d.noise_var > 0
        ring, _ = encode_secure(task["config"]["codec"], np.full(env.numel, 5.0, np.float32), d.fixed, None, JOB)
        assert send(c, d.mask(ring)) is None
    for c, d in devs.items():
        assert send(c, d.reveal(_relayed(env, c, sw.UNMASK, rnd))) is None
    wait_for(lambda: env.store.get_job(JOB)["current_round"] == round_, what=f"round {round_} closed")


def test_secure_dp_job_stops_before_the_round_that_would_exceed_the_budget(tmp_path: Path) -> None:
    env = secure_env(tmp_path)
    try:
        assert env.config["privacy"]["rounds_within_budget"] == 2
        env.engine.start_job(JOB)
        wait_for(lambda: (r := env.engine.current_round(JOB)) is not None and r.secagg is not None, what="round 1")
        raw, _ = env.update("a", np.full(env.numel, 5.0, np.float32), n=1)  # a plain update, in the clear
        verdict = env.engine.submit("a", raw)
        assert not verdict.accepted and "uses secure aggregation: only masked input" in verdict.reason
        versions = []
        for r in (1, 2):
            drive_secure_round(env, r)
            versions.append(env.store.get_job(JOB)["current_version"])
        assert env.engine.wait_idle(JOB, 10)
        final = env.store.get_job(JOB)
        assert final["status"] == "finished" and final["current_version"] == versions[-1]
        assert "privacy budget reached: round 3 would raise epsilon" in final["reason"]
        rounds = env.store.get_rounds(JOB)
        assert [r["round"] for r in rounds] == [1, 2]  # round 3 never opened
        z_dev = env.config["secure_aggregation"]["noise_multiplier"]
        for n, rec in enumerate(rounds, start=1):
            p = rec["privacy"]
            assert p["mechanism"] == "distributed" and p["noise_multiplier"] == Z and p["survivors"] == 3
            assert p["epsilon"] == pytest.approx(accountant.epsilon(Z, n, DELTA, distributed=True))
            assert rec["metrics"]["secagg_noise_multiplier"] == pytest.approx(z_dev * math.sqrt(3 / 2))
            assert set(rec["metrics"]) <= {k for k in rec["metrics"] if k.startswith("secagg_")}  # no device metrics
        # the release: sum of 3 clipped (norm <= 1) updates + the devices' noise, over K = 3, on the k shared
        # coordinates only; the devices' 5.0 per coordinate never reaches the model
        v0 = flatten(load_model(env.svc.models.get(env.version0))[0])
        v1 = flatten(load_model(env.svc.models.get(versions[0]))[0])
        step = (v1 - v0).astype(np.float64)
        moved = np.flatnonzero(step)
        assert moved.size <= int(RANDK["density"] * env.numel) + 1 and np.abs(step).max() < 5.0
        assert np.std(step[moved]) == pytest.approx(z_dev * math.sqrt(3 / 2) * 1.0 / 3, rel=0.35)
        # REST and `job status` read the same records
        app = create_app({"services": env.svc})
        http = app.test_client()
        token = env.svc.credentials.path("operator-token").read_text().strip()
        http.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        view = http.get(f"/api/v1/jobs/{JOB}").json
        assert view["reason"] == final["reason"]
        assert view["privacy"]["epsilon_spent"] == pytest.approx(accountant.epsilon(Z, 2, DELTA, distributed=True))
        assert view["privacy"]["rounds_released"] == 2 and view["privacy"]["noise_added_by"] == "devices"
        per_round = http.get(f"/api/v1/jobs/{JOB}/rounds").json["rounds"]
        assert [r["privacy"]["epsilon"] for r in per_round] == [r["privacy"]["epsilon"] for r in rounds]
        line = privacy_summary(view)
        spent = accountant.epsilon(Z, 2, DELTA, distributed=True)
        assert line is not None and f"epsilon {spent:.3f} of" in line and "noise added on the devices" in line
    finally:
        env.close()


def test_secure_dp_accountant_survives_a_coordinator_restart(tmp_path: Path) -> None:
    env = secure_env(tmp_path, budget_rounds=2, rounds=5)
    try:
        env.engine.start_job(JOB)
        drive_secure_round(env, 1)
        spent = env.store.get_rounds(JOB)[0]["privacy"]["epsilon"]
        wait_for(lambda: (r := env.engine.current_round(JOB)) is not None and r.round == 2, what="round 2 open")
        env.engine.shutdown()  # down with round 2's secure attempt open: it is aborted and retried, not charged
        engine2 = RoundEngine(env.store, env.svc.models, MemoryPublisher(), env.engine.config, env.engine.presence)
        env.engine, env.pub = engine2, engine2.publisher
        assert engine2.resume() == [JOB]
        jp = engine2._runners[JOB]._privacy
        assert jp.accountant.distributed and jp.accountant.events == [(Z, 1.0)]
        assert jp.spent() == pytest.approx(spent)
        drive_secure_round(env, 2)
        assert engine2.wait_idle(JOB, 10)
        final = env.store.get_job(JOB)
        assert final["status"] == "finished" and final["current_round"] == 2
        assert "round 3 would raise" in final["reason"]
        closed = [r for r in env.store.get_rounds(JOB) if r["status"] == "closed"]
        assert closed[-1]["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(Z, 2, DELTA, distributed=True))
    finally:
        env.close()
