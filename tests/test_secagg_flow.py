"""The secure-aggregation round flow inside the coordinator (runner + engine + flow), without a broker:
devices are driven by the test through ``engine.submit_secagg`` and the relay frames the engine publishes."""
from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol import topics
from edge_sdk.protocol.modelfile import flatten, load_model
from edge_sdk.secagg.device import SecAggDevice
from edge_sdk.secagg.update import encode_secure
from tests.test_engine import JOB, Env, wait_for

SECURE = {"codec": {"name": "randk", "density": 0.25}, "secure_aggregation": {"clip": 100.0, "phase_timeout_s": 3},
          "clients_per_round": 4, "min_clients": 2, "limits": None}


def _relayed(env: Env, cid: str, kind: int, count: int = 1) -> sw.SecAggMessage:
    frames: list[sw.SecAggMessage] = []

    def have() -> bool:
        frames[:] = [m for t, p in env.pub.messages if t == topics.relay_topic(cid)
                     for m in [sw.decode(p)] if m.kind == kind]
        return len(frames) >= count

    wait_for(have, timeout=10, what=f"{sw.KIND_NAMES[kind]} for {cid}")
    return frames[count - 1]


def _send(env: Env, cid: str, msg: sw.SecAggMessage) -> str | None:
    return env.engine.submit_secagg(cid, sw.encode(msg, env.engine.device_key(cid)))


def test_secure_round_with_a_dropout_updates_the_model_by_the_survivors_mean(tmp_path) -> None:
    env = Env(tmp_path, clients="abcd", online="abcd", **SECURE)
    try:
        env.engine.start_job(JOB)
        rnd = env.open_round()
        task = env.pub.json_on(topics.task_topic("a"))[0]
        assert task["config"]["secure_aggregation"] == {  # the job's terms a device checks the roster against
            "clip": 100.0, "phase_timeout_s": 3.0, "noise_multiplier": 0.0, "neighbours": 16, "min_survivors": 2,
            "max_devices": 4}
        devs = {c: SecAggDevice(c, JOB, 1, rnd.attempt) for c in "abcd"}
        for c, d in devs.items():
            assert _send(env, c, d.advertise()) is None
        for c, d in devs.items():
            assert _send(env, c, d.share(_relayed(env, c, sw.ROSTER))) is None
        rng = np.random.default_rng(0)
        sent = {}
        for c, d in devs.items():
            d.receive_inbox(_relayed(env, c, sw.INBOX))
            if c == "d":
                continue  # drops after sharing: its masks are in a, b and c's inputs and must be removed
            assert d.fixed is not None
            ring, decoded = encode_secure(task["config"]["codec"], rng.normal(0, 0.05, env.numel), d.fixed, None, JOB)
            sent[c] = decoded
            assert _send(env, c, d.mask(ring)) is None
        late = sw.SecAggMessage(sw.KEYS, JOB, 1, rnd.attempt, "a", {}, bytes(96))
        assert "keys message arrived during the" in (_send(env, "a", late) or "")  # rejected, counted, round goes on
        for c in "abc":
            assert _send(env, c, devs[c].reveal(_relayed(env, c, sw.UNMASK))) is None
        assert env.engine.wait_idle(JOB, 30)
        job = env.store.get_job(JOB)
        assert job["status"] == "finished", job
        r1 = [r for r in env.store.get_rounds(JOB) if r["status"] == "closed"][0]
        assert r1["participants"] == ["a", "b", "c"] and r1["rejected"] == 1
        assert r1["metrics"]["secagg_survivors"] == 3 and r1["metrics"]["secagg_dropped"] == 1
        assert r1["metrics"]["secagg_noise_multiplier"] == 0.0  # no distributed noise configured
        v0 = flatten(load_model(env.svc.models.get(env.version0))[0])
        v1 = flatten(load_model(env.svc.models.get(job["current_version"]))[0])
        want = v0.astype(np.float64)
        idx = sent["a"].indices
        want[idx] += np.mean([sent[c].values for c in "abc"], axis=0)
        assert np.abs(v1 - want).max() < 1e-5
        assert np.array_equal(np.flatnonzero(v1 != v0), np.intersect1d(idx, np.flatnonzero(want != v0)))
    finally:
        env.close()


def test_distributed_noise_reaches_the_round_record(tmp_path) -> None:
    """With noise_multiplier z every survivor adds its share of Skellam noise; the round records the noise
    multiplier its sum carries (the DP accountant's input): z * sqrt(survivors / min survivors)."""
    env = Env(tmp_path, clients="abc", online="abc", **{**SECURE, "clients_per_round": 3,
              "secure_aggregation": {"clip": 1.0, "phase_timeout_s": 3, "noise_multiplier": 0.5}})
    try:
        env.engine.start_job(JOB)
        rnd = env.open_round()
        devs = {c: SecAggDevice(c, JOB, 1, rnd.attempt) for c in "abc"}
        for c, d in devs.items():
            _send(env, c, d.advertise())
        for c, d in devs.items():
            _send(env, c, d.share(_relayed(env, c, sw.ROSTER)))
        for c, d in devs.items():
            d.receive_inbox(_relayed(env, c, sw.INBOX))
            assert d.noise_var > 0
            _send(env, c, d.mask(np.zeros(d.k, np.uint32)))
        for c in "abc":
            _send(env, c, devs[c].reveal(_relayed(env, c, sw.UNMASK)))
        assert env.engine.wait_idle(JOB, 30)
        r1 = [r for r in env.store.get_rounds(JOB) if r["status"] == "closed"][0]
        assert r1["metrics"]["secagg_noise_multiplier"] == pytest.approx(0.5 * np.sqrt(3 / 2))
        v0 = flatten(load_model(env.svc.models.get(env.version0))[0])
        v1 = flatten(load_model(env.svc.models.get(env.store.get_job(JOB)["current_version"]))[0])
        assert np.count_nonzero(v1 != v0) > 0.9 * devs["a"].k  # zero updates, yet the model moved: the noise
    finally:
        env.close()


def test_secure_round_with_too_few_survivors_fails_and_is_retried(tmp_path) -> None:
    env = Env(tmp_path, clients="abc", online="abc", **{**SECURE, "clients_per_round": 3, "min_clients": 2})
    try:
        env.engine.start_job(JOB)
        rnd = env.open_round()
        devs = {c: SecAggDevice(c, JOB, 1, rnd.attempt) for c in "abc"}
        for c, d in devs.items():
            _send(env, c, d.advertise())
        for c, d in devs.items():
            _send(env, c, d.share(_relayed(env, c, sw.ROSTER)))
        devs["a"].receive_inbox(_relayed(env, "a", sw.INBOX))
        _send(env, "a", devs["a"].mask(np.zeros(devs["a"].k, np.uint32)))  # the only one to send its input
        env.open_round(1, 2)  # the attempt failed after the masked-input phase; a fresh attempt is open
        failed = [r for r in env.store.get_rounds(JOB) if r["attempt"] == 1][0]
        assert failed["status"] == "failed" and failed["reason"].startswith("secure aggregation:")
        assert "1 device(s) sent their masked input, at least 2 needed" in failed["reason"]
        relays = [sw.decode(p) for t, p in env.pub.messages if t.endswith("/relay")]
        assert not [m for m in relays if m.kind == sw.UNMASK]  # nothing that could unmask was ever asked for
        assert {m.client_id for m in relays if m.kind == sw.ABORT} == {"a", "b", "c"}
    finally:
        env.close()
