"""Round engine: selection, announcement, collection, close, retry, stop/resume, finish, evaluation.

Driven without a broker: presence is set directly, updates go through ``engine.submit`` and everything the
engine publishes is captured by a MemoryPublisher.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from coordinator.rounds.engine import EngineConfig, MemoryPublisher, RoundEngine
from coordinator.rounds.jobspec import initial_model, normalize_job
from coordinator.services import build_services
from coordinator.rounds.validation import hash_token
from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.modelfile import dump_model, flatten, layout_sizes, load_model
from edge_sdk.protocol.wire import UpdateHeader, encode_update
from edge_sdk.update import statistics_mask

JOB = "job-e"


def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)

# exact weighted FedAvg (no clipping) so aggregates can be checked by hand; limits are tested in
# tests/test_limits.py
PLAIN_FEDAVG = {"weighting": "num_samples", "max_num_samples": 2**53, "clip": {"mode": "none"}}


class Env:
    def __init__(self, tmp_path, clients="abc", online="abc", arrays=None, data=None, engine_cfg=None,
                 evaluate=False, **job):
        cfg = engine_cfg or EngineConfig(selection_grace_s=0.0, poll_s=0.02, export_onnx=False, wait_log_s=1e9)
        self.svc = build_services(tmp_path, evaluate=evaluate, engine_config=cfg, public_url="http://h:1")
        self.engine, self.store = self.svc.engine, self.svc.store
        self.pub = MemoryPublisher()
        self.engine.publisher = self.pub
        body = {"name": "t", "model": {"arch": "small_cnn", "in_channels": 1, "image_size": 8}, "rounds": 1,
                "clients_per_round": 3, "min_clients": 2, "round_timeout_s": 10.0,
                "limits": PLAIN_FEDAVG, **job}
        self.config = normalize_job(body)
        if data is None:
            rng = np.random.default_rng(0)
            arrays = arrays or {"w": rng.normal(size=(32, 16)).astype(np.float32),
                                "b": np.zeros(16, np.float32), "steps": np.array(3, np.int64)}
            data = dump_model(arrays, {"job_id": JOB, "round": 0})
        self.version0 = self.svc.models.put(data)
        self.store.create_job(JOB, "t", self.config, self.version0, len(data))
        arrays, _ = load_model(data)
        self.sizes, self.numel = layout_sizes(arrays), int(flatten(arrays).size)
        self.stats = statistics_mask(arrays)  # what a device passes: a sparse job's codec has a stats block
        for cid in clients:
            self.store.create_client(cid, cid, hash_token(f"tok-{cid}"))
        for cid in online:
            self.engine.presence.update(cid, True)

    def open_round(self, round_=1, attempt=1):
        wait_for(lambda: (r := self.engine.current_round(JOB)) is not None and (r.round, r.attempt) == (round_, attempt),
                 what=f"round {round_} attempt {attempt}")
        return self.engine.current_round(JOB)

    def update(self, cid, delta, n=10, metrics=None, round_=1, base=None, codec=None):
        rnd = self.engine.current_round(JOB)
        codec = codec or (rnd.codec if rnd else self.config["codec"])
        payload, sent = codecs.encode(codec, delta, self.sizes, self.stats)
        raw = encode_update(UpdateHeader(JOB, round_, cid, base or rnd.base_version, codec_digest(codec), n,
                                         self.numel, metrics or {}, rnd.attempt if rnd else 1), payload,
                            self.engine.device_key(cid))
        return raw, sent

    def events(self, kind=None):
        ev = self.pub.json_on(topics.job_events_topic(JOB))
        return [e for e in ev if kind is None or e["type"] == kind]

    def close(self):
        self.engine.shutdown()
        self.store.close()


@pytest.fixture
def mk(tmp_path):
    made = []

    def make(**kw):
        made.append(Env(tmp_path / str(len(made)), **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def test_two_rounds_tasks_events_records(mk):
    env = mk(rounds=2, train={"epochs": 2, "batch_size": 16, "lr": 0.1})
    env.engine.start_job(JOB)
    rng = np.random.default_rng(1)
    versions = [env.version0]
    for r in (1, 2):
        rnd = env.open_round(r)
        assert sorted(rnd.selected) == ["a", "b", "c"] and rnd.base_version == versions[-1]
        for cid in "abc":
            task = env.pub.json_on(topics.task_topic(cid))[-1]
            assert task["type"] == "train" and (task["job_id"], task["round"], task["attempt"]) == (JOB, r, 1)
            assert task["base_version"] == versions[-1] and task["deadline_s"] == 10.0
            assert task["model_path"] == f"/api/v1/jobs/{JOB}/models/{versions[-1]}" and "model_url" not in task
            assert {k: task["config"][k] for k in ("epochs", "batch_size", "lr", "mu", "freeze_backbone")} == {
                "epochs": 2, "batch_size": 16, "lr": 0.1, "mu": 0.0, "freeze_backbone": False}
            assert task["config"]["codec"]["name"] == "dense" and isinstance(task["config"]["seed"], int)
        sizes, deltas, weights = [], {}, {"a": 1, "b": 2, "c": 7}
        for cid in "abc":
            deltas[cid] = rng.normal(size=env.numel).astype(np.float32)
            raw, _ = env.update(cid, deltas[cid], weights[cid], {"loss": float(weights[cid]), "acc": 0.5}, round_=r)
            sizes.append(len(raw))
            assert env.engine.submit(cid, raw).accepted
        wait_for(lambda: env.store.get_job(JOB)["current_round"] == r, what="round close")
        rec = [x for x in env.store.get_rounds(JOB) if x["round"] == r][0]
        assert rec["status"] == "closed" and rec["accepted"] == 3 and rec["rejected"] == 0
        assert rec["uplink_bytes"] == sum(sizes)
        assert rec["compression_ratio"] == pytest.approx(4 * env.numel / (sum(sizes) / 3))
        assert rec["metrics"] == pytest.approx({"loss": (1 + 4 + 49) / 10, "acc": 0.5})
        assert rec["duration_s"] >= 0 and rec["selected"] == ["a", "b", "c"]
        new_version = env.store.get_job(JOB)["current_version"]
        base, _ = load_model(env.svc.models.get(versions[-1]))
        new, meta = load_model(env.svc.models.get(new_version))
        assert meta["round"] == r and meta["base_version"] == versions[-1] and meta["arch"] == "small_cnn"
        assert new["steps"] == 3  # integer buffers are carried over
        expected = flatten(base) + sum(weights[c] * deltas[c] for c in "abc") / 10
        np.testing.assert_allclose(flatten(new), expected, rtol=1e-5, atol=1e-6)
        assert rec["new_version"] == new_version
        versions.append(new_version)
    assert env.engine.wait_idle(JOB, 5)
    assert env.store.get_job(JOB)["status"] == "finished"
    assert [e["round"] for e in env.events("round_started")] == [1, 2]
    assert [e["version"] for e in env.events("model_updated")] == versions[1:]
    (fin,) = env.events("job_finished")
    assert fin["version"] == versions[-1]
    assert [m["version"] for m in env.store.list_model_versions(JOB)] == versions
    assert {(m["round"], m["name"]) for m in env.store.list_metrics(JOB)} >= {(1, "loss"), (2, "acc")}


def test_failed_attempt_is_recorded_and_retried(mk):
    env = mk(round_timeout_s=0.3, clients_per_round=2, min_clients=2, clients="abcd", online="abcd")
    env.engine.start_job(JOB)
    rnd1 = env.open_round(1, 1)
    first = sorted(rnd1.selected)
    raw, _ = env.update(first[0], np.ones(env.numel, np.float32))
    assert env.engine.submit(first[0], raw).accepted
    rnd2 = env.open_round(1, 2)  # only 1 of min 2 accepted before the deadline -> attempt 2
    failed = env.store.get_round(JOB, 1, 1)
    assert failed["status"] == "failed" and "1 update(s) accepted" in failed["reason"]
    assert failed["participants"] == [first[0]] and failed["new_version"] is None
    assert env.store.get_job(JOB)["current_version"] == env.version0
    assert [e["status"] for e in env.events("round_closed")] == ["failed"]
    tasks = [t for c in "abcd" for t in env.pub.json_on(topics.task_topic(c)) if t["attempt"] == 2]
    assert sorted(t["job_id"] and c for c in "abcd" for t in env.pub.json_on(topics.task_topic(c))
                  if t["attempt"] == 2) == sorted(rnd2.selected) and len(tasks) == 2
    for cid in rnd2.selected:  # a client from attempt 1 may contribute again: a new aggregate
        raw, _ = env.update(cid, np.full(env.numel, 2.0, np.float32))
        assert env.engine.submit(cid, raw).accepted
    assert env.engine.wait_idle(JOB, 5)
    assert env.store.get_round(JOB, 1, 2)["status"] == "closed"
    new, _ = load_model(env.svc.models.get(env.store.get_job(JOB)["current_version"]))
    base, _ = load_model(env.svc.models.get(env.version0))
    np.testing.assert_allclose(flatten(new), flatten(base) + 2.0, rtol=1e-6)  # attempt 1's update is gone


def test_waits_for_enough_online_eligible_clients(mk):
    env = mk(clients="abcx", online="a")
    env.engine.presence.update("x", True, jobs=["some-other-job"])  # online but not for this job
    env.engine.presence.update("ghost", True)  # online but never registered
    env.engine.start_job(JOB)
    time.sleep(0.3)
    assert env.engine.current_round(JOB) is None and env.events() == []
    env.engine.presence.update("b", True, jobs=[JOB])
    rnd = env.open_round(1)
    assert sorted(rnd.selected) == ["a", "b"]  # grace 0: go with min_clients


def test_selection_prefers_full_k_within_grace(mk):
    env = mk(online="ab", clients="abc",
             engine_cfg=EngineConfig(selection_grace_s=5.0, poll_s=0.02, export_onnx=False))
    env.engine.start_job(JOB)
    time.sleep(0.2)
    assert env.engine.current_round(JOB) is None  # min reached, still waiting for K within the grace
    env.engine.presence.update("c", True)
    assert sorted(env.open_round(1).selected) == ["a", "b", "c"]


def test_stop_then_restart_resumes_round_with_next_attempt(mk):
    env = mk()
    env.engine.start_job(JOB)
    env.open_round(1, 1)
    env.engine.stop_job(JOB)
    assert env.store.get_job(JOB)["status"] == "stopped"
    assert env.store.get_round(JOB, 1, 1)["status"] == "aborted"
    env.engine.start_job(JOB)
    env.open_round(1, 2)
    with pytest.raises(Exception, match="already running"):
        env.engine.start_job(JOB)


def test_shutdown_keeps_job_running_and_a_new_engine_resumes_it(mk):
    env = mk()
    env.engine.start_job(JOB)
    env.open_round(1, 1)
    env.engine.shutdown()
    assert env.store.get_job(JOB)["status"] == "running"
    engine2 = RoundEngine(env.store, env.svc.models, MemoryPublisher(), env.engine.config, env.engine.presence)
    assert engine2.resume() == [JOB]
    wait_for(lambda: engine2.current_round(JOB) is not None, what="resumed round")
    assert engine2.current_round(JOB).attempt == 2
    engine2.shutdown()


def test_job_fails_after_max_attempts(mk):
    env = mk(round_timeout_s=0.1,
             engine_cfg=EngineConfig(selection_grace_s=0, poll_s=0.02, max_attempts=2, export_onnx=False))
    env.engine.start_job(JOB)
    assert env.engine.wait_idle(JOB, 5)
    job = env.store.get_job(JOB)
    assert job["status"] == "failed" and "failed 2 attempts" in job["error"]
    assert [r["status"] for r in env.store.get_rounds(JOB)] == ["failed", "failed"]


def test_topk_round_aggregates_what_clients_sent(mk):
    env = mk(codec={"name": "topk", "density": 0.05, "values": "float16"})
    env.engine.start_job(JOB)
    env.open_round(1)
    rng = np.random.default_rng(5)
    sent_total = np.zeros(env.numel)
    for cid, n in zip("abc", (5, 10, 15)):
        raw, sent = env.update(cid, rng.normal(size=env.numel).astype(np.float32), n)
        sent_total += n * sent.to_dense(env.numel)
        assert env.engine.submit(cid, raw).accepted
    assert env.engine.wait_idle(JOB, 5)
    new, _ = load_model(env.svc.models.get(env.store.get_job(JOB)["current_version"]))
    base, _ = load_model(env.svc.models.get(env.version0))
    np.testing.assert_allclose(flatten(new), flatten(base) + sent_total / 30, rtol=1e-5, atol=1e-6)
    rec = env.store.get_rounds(JOB)[0]
    # a few hundred parameters: the framing (header JSON, 32-byte MAC, CRC) is a large share of each message here
    assert rec["compression_ratio"] > 4.5 and rec["codec"]["name"] == "topk"


def test_overflowing_aggregate_fails_the_attempt_instead_of_publishing_inf(mk):
    env = mk(arrays={"w": np.full((8, 8), 1e38, np.float32)})
    env.engine.start_job(JOB)
    env.open_round(1)
    for cid in "abc":  # every value finite, but 1e38 + 3e38 overflows float32
        assert env.engine.submit(cid, env.update(cid, np.full(env.numel, 3e38, np.float32))[0]).accepted
    env.open_round(1, 2)
    rec = env.store.get_round(JOB, 1, 1)
    assert rec["status"] == "failed" and "not finite" in rec["reason"]
    assert env.store.get_job(JOB)["current_version"] == env.version0
    assert env.events("model_updated") == []


class FakeExports:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def export(self, job, version):
        self.calls.append((job["id"], version))
        if self.fail:
            raise RuntimeError("converter exploded")
        return {"path": "/x.onnx"}


@pytest.mark.parametrize("fail", [False, True])
def test_finish_exports_onnx_and_survives_export_failure(mk, fail):
    env = mk(engine_cfg=EngineConfig(selection_grace_s=0, poll_s=0.02, export_onnx=True))
    env.engine.exports = FakeExports(fail)
    env.engine.start_job(JOB)
    env.open_round(1)
    for cid in "abc":
        assert env.engine.submit(cid, env.update(cid, np.zeros(env.numel, np.float32))[0]).accepted
    assert env.engine.wait_idle(JOB, 5)
    job = env.store.get_job(JOB)
    assert job["status"] == "finished" and env.engine.exports.calls == [(JOB, job["current_version"])]


def test_server_side_evaluation_on_digits(mk):
    cfg = normalize_job({"name": "t", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1,
                                                "image_size": 8}, "eval": {"dataset": "digits"}, "seed": 3})
    data = initial_model(JOB, cfg)
    env = mk(data=data, evaluate=True, eval={"dataset": "digits"}, seed=3)
    env.engine.start_job(JOB)
    env.open_round(1)
    for cid in "abc":  # zero deltas: the new version computes the same function as version 0
        assert env.engine.submit(cid, env.update(cid, np.zeros(env.numel, np.float32))[0]).accepted
    assert env.engine.wait_idle(JOB, 20)
    base = {m["name"]: m["value"] for m in env.store.list_metrics(JOB) if m["round"] == 0}
    rec = env.store.get_rounds(JOB)[0]
    assert rec["eval"]["num_samples"] == 360 and 0.0 <= rec["eval"]["accuracy"] <= 1.0
    assert rec["eval"]["accuracy"] == pytest.approx(base["accuracy"])
    assert rec["eval"]["loss"] == pytest.approx(base["loss"], rel=1e-5)


def _scored(loss, acc, n):
    return {"eval_loss": loss, "eval_accuracy": acc, "eval_samples": float(n)}


def test_federated_evaluation_is_recorded_on_the_round_that_made_the_version(mk):
    env = mk(rounds=3)  # no "eval" in the body: devices hold out 10% and score each version
    env.engine.start_job(JOB)
    reports = {1: {"a": _scored(0.5, 1.0, 10), "b": _scored(1.0, 0.0, 30), "c": {}},
               2: {"a": _scored(0.2, 0.9, 20), "b": _scored(0.4, 0.6, 20), "c": _scored(0.1, 7.0, 20)},
               3: {"a": {"loss": 1.0}, "b": {}, "c": {}}}
    for r in (1, 2, 3):
        env.open_round(r)
        for cid in "abc":
            assert env.pub.json_on(topics.task_topic(cid))[-1]["config"]["holdout_fraction"] == 0.1
            raw, _ = env.update(cid, np.zeros(env.numel, np.float32), 50, reports[r][cid], round_=r)
            assert env.engine.submit(cid, raw).accepted
        wait_for(lambda: env.store.get_job(JOB)["current_round"] == r or env.store.get_job(JOB)["status"]
                 == "finished", what=f"round {r} close")
    assert env.engine.wait_idle(JOB, 5)
    recs = {r["round"]: r for r in env.store.get_rounds(JOB)}
    # version 0 was scored in round 1 (weighted by held-out samples): metrics of round 0
    fed0 = {m["name"]: m["value"] for m in env.store.list_metrics(JOB) if m["source"] == "federated" and m["round"] == 0}
    assert fed0["accuracy"] == pytest.approx(0.25) and fed0["loss"] == pytest.approx(0.875)
    assert fed0["num_samples"] == 40 and fed0["clients"] == 2
    # round 1's version was scored in round 2; c's impossible accuracy is left out
    assert recs[1]["federated_eval"] == pytest.approx({"status": "ok", "loss": 0.3, "accuracy": 0.75,
                                                       "num_samples": 40.0, "clients": 2.0,
                                                       "version": recs[1]["new_version"], "scored_in_round": 2})
    assert "eval_accuracy" not in recs[2]["metrics"] and "loss" in recs[3]["metrics"]
    # nobody scored round 2's version in round 3: failed with a reason, never a silent gap
    assert recs[2]["federated_eval"]["status"] == "failed"
    assert "none of the 3 device(s) reported a held-out score" in recs[2]["federated_eval"]["reason"]
    assert recs[3]["federated_eval"]["status"] == "not_run" and "final version" in recs[3]["federated_eval"]["reason"]


def test_no_evaluation_means_no_holdout(mk):
    env = mk(eval=None)
    env.engine.start_job(JOB)
    env.open_round(1)
    for cid in "abc":
        assert env.pub.json_on(topics.task_topic(cid))[-1]["config"]["holdout_fraction"] == 0.0
        assert env.engine.submit(cid, env.update(cid, np.zeros(env.numel, np.float32), 5,
                                                 _scored(0.1, 0.5, 5))[0]).accepted
    assert env.engine.wait_idle(JOB, 5)
    rec = env.store.get_rounds(JOB)[0]
    assert rec["federated_eval"] is None and rec["eval"] is None


def test_evaluation_that_does_not_fit_is_reported_with_its_reason(mk, tmp_path):
    folder = tmp_path / "holdout"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            from PIL import Image
            Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(folder / name / f"{i}.png")
    body = {"name": "t", "model": {"arch": "small_cnn", "image_size": 8},
            "eval": {"dataset": "imagefolder", "path": str(folder)}}
    data = initial_model(JOB, normalize_job(body))
    env = mk(data=data, evaluate=True, eval=body["eval"])
    (folder / "cow").mkdir()  # the folder changed after the job was created
    (folder / "dog" / "0.png").rename(folder / "cow" / "0.png")
    env.engine.start_job(JOB)
    env.open_round(1)
    for cid in "abc":
        assert env.engine.submit(cid, env.update(cid, np.zeros(env.numel, np.float32))[0]).accepted
    assert env.engine.wait_idle(JOB, 30)
    rec = env.store.get_rounds(JOB)[0]
    assert "now has classes ['cat', 'cow', 'dog']" in rec["eval"]["error"]
    assert "evaluation of version 0 failed" in env.store.get_job(JOB)["error"]
    assert env.store.get_job(JOB)["status"] == "finished"  # advisory: the job itself went on


def test_arrival_order_does_not_change_the_models_a_job_makes(mk):
    """Job-default limits (adaptive clip, direction screen) and server momentum: the same updates delivered in
    two orders make the same model versions, so two runs of one seed repeat whatever the network's timing."""
    rng = np.random.default_rng(11)
    deltas = {r: {c: rng.normal(scale=s, size=528).astype(np.float32) for c, s in zip("abc", (0.3, 0.5, 0.8))}
              for r in (1, 2, 3)}  # norms ~7, ~11, ~18 around the default starting bound of 10: clipping acts
    runs = []
    for order in ("abc", "cab"):
        env = mk(rounds=3, limits=None, strategy={"name": "fedavgm"})
        env.engine.start_job(JOB)
        versions = []
        for r in (1, 2, 3):
            env.open_round(r)
            for cid in order:
                raw, _ = env.update(cid, deltas[r][cid], {"a": 50, "b": 80, "c": 120}[cid], round_=r)
                assert env.engine.submit(cid, raw).accepted
            wait_for(lambda: env.store.get_job(JOB)["current_round"] == r, what=f"round {r} close")
            versions.append(env.store.get_job(JOB)["current_version"])
        runs.append([flatten(load_model(env.svc.models.get(v))[0]) for v in versions])
    for first, second in zip(*runs):
        assert np.array_equal(first, second)
    assert not np.array_equal(runs[0][0], runs[0][1])  # the rounds did move the model
