"""The coordinator's update path with a codec ``stats`` block: right-size blocks are aggregated (variances
stay >= 0), a block for another number of statistics is rejected with a reason and changes nothing."""
from __future__ import annotations

import time

import numpy as np
import pytest

from coordinator.rounds import validation as V
from coordinator.rounds.engine import EngineConfig, MemoryPublisher
from coordinator.rounds.jobspec import JobSpecError, normalize_job
from coordinator.rounds.validation import hash_token
from coordinator.services import build_services
from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.stats_block import NEW_JOB_DEFAULT
from edge_sdk.protocol.modelfile import dump_model, flatten, layout_sizes, load_model, unflatten
from edge_sdk.protocol.wire import UpdateHeader, encode_update
from edge_sdk.update import statistics_mask

JOB = "job-s"
CODEC = {"name": "topk", "density": 0.01, "values": "int8", "stats": "float16"}
PLAIN_FEDAVG = {"weighting": "num_samples", "max_num_samples": 2**53, "clip": {"mode": "none"},
                "direction": {"mode": "none"}}


@pytest.fixture
def env(tmp_path):
    cfg = EngineConfig(selection_grace_s=0.0, poll_s=0.02, export_onnx=False, wait_log_s=1e9, update_rate_per_s=0.0)
    svc = build_services(tmp_path, evaluate=False, engine_config=cfg)
    svc.engine.publisher = MemoryPublisher()
    rng = np.random.default_rng(1)
    arrays = {"conv.weight": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
              "bn.weight": np.ones(16, np.float32), "bn.bias": np.zeros(16, np.float32),
              "bn.running_mean": rng.normal(size=16).astype(np.float32),
              "bn.running_var": rng.uniform(1.0, 50.0, 16).astype(np.float32),
              "bn.num_batches_tracked": np.array(4, np.int64), "fc.weight": np.zeros((4, 16), np.float32)}
    data = dump_model(arrays, {"job_id": JOB, "round": 0})
    version = svc.models.put(data)
    body = {"name": "s", "model": {"arch": "small_cnn"}, "rounds": 1, "clients_per_round": 2, "min_clients": 2,
            "round_timeout_s": 10.0, "limits": PLAIN_FEDAVG, "codec": CODEC}
    svc.store.create_job(JOB, "s", normalize_job(body), version, len(data))
    for cid in "ab":
        svc.store.create_client(cid, cid, hash_token(f"tok-{cid}"))
        svc.engine.presence.update(cid, True)
    svc.engine.start_job(JOB)
    deadline = time.time() + 5
    while svc.engine.current_round(JOB) is None:
        assert time.time() < deadline, "round was never opened"
        time.sleep(0.01)
    yield svc, arrays, version
    svc.engine.shutdown()
    svc.store.close()


def _message(svc, arrays, version, cid, delta, mask, n=10):
    payload, _ = codecs.encode(CODEC, delta, layout_sizes(arrays), mask)
    header = UpdateHeader(job_id=JOB, round=1, client_id=cid, base_version=version,
                          codec_digest=codec_digest(CODEC), num_samples=n, numel=delta.size, metrics={}, attempt=1)
    return encode_update(header, payload, svc.engine.device_key(cid))


def test_wrong_size_statistics_block_is_rejected_with_a_reason_and_the_round_completes(env):
    svc, arrays, version = env
    mask = statistics_mask(arrays)
    numel = int(mask.size)
    rnd = svc.engine.current_round(JOB)
    assert rnd.statistics is not None and rnd.statistics.sum() == 32

    short = mask.copy()
    short[np.flatnonzero(mask)[-1]] = False  # a device that counts one statistic fewer than the model has
    rng = np.random.default_rng(2)
    bad = _message(svc, arrays, version, "a", rng.normal(size=numel).astype(np.float32), short)
    verdict = svc.engine.submit("a", bad)
    assert (verdict.status, verdict.code) == ("rejected", V.BAD_PAYLOAD)
    assert "statistics block declares 31 statistics, the model has 32" in verdict.reason
    ack = svc.engine.publisher.json_on(topics.ack_topic("a"))[-1]
    assert ack["code"] == V.BAD_PAYLOAD and "declares 31 statistics" in ack["reason"]
    assert rnd.accepted == 0 and rnd.accumulator.count == 0
    (row,) = svc.store.list_updates(JOB, status="rejected")
    assert "declares 31 statistics" in row["reason"]

    # both devices' variances collapse towards 0: the new global variance is their mean, never below 0
    base = flatten(arrays)
    locals_ = {}
    for cid, scale in (("a", 0.0), ("b", 1e-6)):
        local = {k: v.copy() for k, v in arrays.items()}
        local["bn.running_var"] = (arrays["bn.running_var"] * np.float32(scale)).astype(np.float32)
        local["conv.weight"] += rng.normal(size=local["conv.weight"].shape).astype(np.float32)
        locals_[cid] = local
        assert svc.engine.submit(cid, _message(svc, arrays, version, cid, flatten(local) - base, mask)).accepted
    assert svc.engine.wait_idle(JOB, 10)
    job = svc.store.get_job(JOB)
    assert job["status"] == "finished"
    new, _ = load_model(svc.models.get(job["current_version"]))
    assert (new["bn.running_var"] >= 0).all()
    exact = locals_["b"]["bn.running_var"] / 2
    # fp16 rounded toward zero: at most one fp16 step of the delta (~var) above the exact mean
    assert (new["bn.running_var"] >= exact * (1 - 1e-6)).all()
    assert (new["bn.running_var"] - exact <= arrays["bn.running_var"] * 2.0**-10).all()
    np.testing.assert_allclose(new["bn.running_mean"], arrays["bn.running_mean"], rtol=0, atol=1e-6)
    assert unflatten(flatten(new), new).keys() == arrays.keys()


def test_new_sparse_jobs_get_the_statistics_block_by_default() -> None:
    def codec_of(codec: dict, **extra) -> dict:
        body = {"name": "j", "model": {"arch": "small_cnn"}, "clients_per_round": 3, "codec": codec, **extra}
        return normalize_job(body)["codec"]

    assert codec_of({"name": "topk", "density": 0.01})["stats"] == NEW_JOB_DEFAULT
    assert codec_of({"name": "randk", "density": 0.01})["stats"] == NEW_JOB_DEFAULT
    assert codec_of({"name": "topk", "density": 0.01, "stats": "sparse"})["stats"] == "sparse"  # the old way
    assert codec_of({"name": "topk", "density": 0.01, "stats": "int8"})["stats"] == "int8"
    assert "stats" not in codec_of({"name": "dense", "dtype": "float16"})
    secure = {"secure_aggregation": {}, "min_clients": 3}
    assert "stats" not in codec_of({"name": "randk", "density": 0.5}, **secure)
    with pytest.raises(JobSpecError, match="not offered under secure aggregation"):
        codec_of({"name": "randk", "density": 0.5, "stats": "float16"}, **secure)
