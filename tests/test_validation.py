"""Every rejection reason on the real update path (engine.submit): asserted by code, stored, acked, and
never disturbing the accepted updates or the round's completion."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from coordinator.rounds import validation as V
from coordinator.rounds.engine import EngineConfig, MemoryPublisher
from coordinator.rounds.jobspec import normalize_job
from coordinator.services import build_services
from coordinator.rounds.validation import hash_token
from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.modelfile import dump_model, flatten, layout_sizes, load_model
from edge_sdk.protocol.wire import UpdateHeader, encode_update
from tests.wire_frames import v2_frame

JOB = "job-t"
DENSE = {"name": "dense", "dtype": "float32"}

# exact weighted FedAvg (no clipping) so aggregates can be checked by hand; limits are tested in
# tests/test_limits.py
PLAIN_FEDAVG = {"weighting": "num_samples", "max_num_samples": 2**53, "clip": {"mode": "none"}}


class Env:
    """A job with a 4160-parameter model, clients a/b/c online (all selected), d registered but offline."""

    def __init__(self, tmp_path, **job):
        cfg = EngineConfig(selection_grace_s=0.0, poll_s=0.02, export_onnx=False, wait_log_s=1e9,
                           update_rate_per_s=0.0)  # rate limits: tests/test_flood.py
        self.svc = build_services(tmp_path, evaluate=False, engine_config=cfg)
        self.engine, self.store = self.svc.engine, self.svc.store
        self.pub = MemoryPublisher()
        self.engine.publisher = self.pub
        rng = np.random.default_rng(1)
        arrays = {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.zeros(64, np.float32),
                  "n": np.array(7, np.int64)}
        data = dump_model(arrays, {"job_id": JOB, "round": 0})
        self.version = self.svc.models.put(data)
        body = {"name": "t", "model": {"arch": "small_cnn"}, "rounds": 1, "clients_per_round": 3, "min_clients": 2,
                "round_timeout_s": 10.0, "limits": PLAIN_FEDAVG, **job}
        self.store.create_job(JOB, "t", normalize_job(body), self.version, len(data))
        self.global_vec, self.sizes = flatten(arrays), layout_sizes(arrays)
        self.numel = self.global_vec.size
        for cid in "abcd":
            self.store.create_client(cid, cid, hash_token(f"tok-{cid}"))  # REST token; updates use the key
            if cid != "d":
                self.engine.presence.update(cid, True)

    def start(self):
        self.engine.start_job(JOB)
        deadline = time.time() + 5
        while self.engine.current_round(JOB) is None:
            assert time.time() < deadline, "round was never opened"
            time.sleep(0.01)
        return self.engine.current_round(JOB)

    def message(self, cid, delta, n=10, codec=DENSE, payload=None, key=None, **header):
        """Signed with ``cid``'s device key unless ``key`` says otherwise; ``codec`` encodes the payload and
        its digest goes in the (wire v3) header."""
        if payload is None:
            payload, _ = codecs.encode(codec, delta, self.sizes)
        h = dict(job_id=JOB, round=1, client_id=cid, base_version=self.version, codec_digest=codec_digest(codec),
                 num_samples=n, numel=self.numel, metrics={"loss": 1.0}, attempt=1)
        h.update(header)
        return encode_update(UpdateHeader(**h), payload, key or self.engine.device_key(cid))

    def message_v2(self, cid, delta, n=10, codec=DENSE, **header):
        """The same update as a device not yet upgraded frames it (wire v2, JSON header echoing the spec)."""
        fields = dict(job_id=JOB, round=1, client_id=cid, base_version=self.version, codec=codec, num_samples=n,
                      numel=self.numel, metrics={"loss": 1.0}, attempt=1, **header)
        return v2_frame(fields, codecs.encode(codec, delta, self.sizes)[0], self.engine.device_key(cid))

    def acks(self, cid):
        return self.pub.json_on(topics.ack_topic(cid))


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, max_update_bytes=64 * 1024)
    yield e
    e.engine.shutdown()
    e.store.close()


def _nan_payload(env, delta):
    """A well-formed dense float32 payload (codecs.encode refuses non-finite input, a hostile device won't)."""
    vals = delta.astype("<f4").copy()
    vals[5], vals[9] = np.nan, np.inf
    payload = struct.pack("<cBII", b"D", 0, env.numel, vals.nbytes) + vals.tobytes()
    clean = struct.pack("<cBII", b"D", 0, env.numel, vals.nbytes) + delta.astype("<f4").tobytes()
    np.testing.assert_array_equal(codecs.decode(DENSE, clean, env.numel, env.sizes).values, delta)
    return payload


def test_every_rejection_reason_and_round_still_completes(env):
    rnd = env.start()
    rng = np.random.default_rng(2)
    good = {cid: rng.normal(size=env.numel).astype(np.float32) for cid in "abc"}
    weights = {"a": 10, "b": 30, "c": 60}
    # a's good update first: the rejections that follow must not disturb it
    assert env.engine.submit("a", env.message("a", good["a"], weights["a"])).accepted

    d = good["b"]
    real = env.message("b", d)
    cases = [
        ("b", b"\x00" * (65 * 1024), V.OVERSIZE),  # over the job's 64 KiB: refused before parsing
        ("b", b"not an update at all, just bytes", V.MALFORMED),
        ("b", real[: len(real) // 2], V.TRUNCATED),
        ("ghost", env.message("ghost", d), V.UNKNOWN_CLIENT),
        ("b", env.message("b", d, key=b"w" * 32), V.BAD_MAC),
        ("c", env.message("c", d, key=env.engine.device_key("b")), V.BAD_MAC),  # b relabels its update as c's
        ("c", env.message("b", d), V.CLIENT_MISMATCH),  # b's message copied onto c's topic
        ("b", env.message("b", d, job_id="job-other"), V.WRONG_JOB),
        ("b", env.message("b", d, round=0), V.STALE_ROUND),
        ("b", env.message("b", d, round=2), V.STALE_ROUND),
        ("b", env.message("b", d, attempt=2), V.STALE_ROUND),
        ("b", env.message("b", d, base_version="0" * 64), V.OLD_BASE_VERSION),
        ("d", env.message("d", d), V.NOT_SELECTED),
        ("a", env.message("a", good["a"], weights["a"]), V.REPLAYED),  # the accepted bytes once more
        ("a", env.message("a", good["a"], weights["a"], metrics={"loss": 2.0}), V.DUPLICATE),
        ("b", env.message("b", d, codec={"name": "topk", "density": 0.1}), V.WRONG_CODEC),
        ("b", env.message("b", d, codec={"name": "dense", "dtype": "float16"}), V.WRONG_CODEC),
        ("b", env.message("b", d, numel=env.numel + 1), V.WRONG_NUMEL),
        ("b", env.message("b", d, payload=_nan_payload(env, d)), V.NON_FINITE),
        ("b", env.message("b", d, payload=codecs.encode(DENSE, d, env.sizes)[0][:-7]), V.BAD_PAYLOAD),
    ]
    for cid, raw, code in cases:
        verdict = env.engine.submit(cid, raw)
        assert (verdict.status, verdict.code) == ("rejected", code), (code, verdict)
        ack = env.acks(cid)[-1]
        assert ack["status"] == "rejected" and ack["code"] == code and ack["reason"].startswith(code)
    assert rnd.accepted == 1 and rnd.accumulator.count == 1

    for cid in "bc":
        assert env.engine.submit(cid, env.message(cid, good[cid], weights[cid])).accepted
    assert env.engine.wait_idle(JOB, 10)
    job = env.store.get_job(JOB)
    assert job["status"] == "finished" and job["current_round"] == 1
    new, _ = load_model(env.svc.models.get(job["current_version"]))
    total = sum(weights.values())
    expected = env.global_vec + sum(weights[c] * good[c] for c in "abc") / total
    np.testing.assert_allclose(flatten(new), expected, rtol=1e-5, atol=1e-6)

    rows = env.store.list_updates(JOB, status="rejected")
    stored_codes = [r["reason"].split(":")[0] for r in rows]
    junk = [(cid, raw, code) for cid, raw, code in cases if code in V.UNAUTHENTICATED]
    assert len(junk) == 8  # oversize, malformed, truncated, unknown, 2x bad_mac, client_mismatch, replayed
    for _, _, code in cases:
        if code in V.UNAUTHENTICATED:  # unauthenticated junk is counted, never stored
            assert code not in stored_codes
        elif code != V.WRONG_JOB:  # filed under the job it named
            assert code in stored_codes
    assert any(r["job_id"] == "job-other" for r in env.store.list_updates("job-other"))
    (r1,) = env.store.get_rounds(JOB)
    assert r1["status"] == "closed" and r1["accepted"] == 3 and sorted(r1["participants"]) == ["a", "b", "c"]
    # counted against this round: all but the wrong-job one and the two naming another round
    assert r1["rejected"] == len(cases) - 3 - len(junk)
    assert r1["junk"] == len(junk) and r1["junk_bytes"] == sum(len(raw) for _, raw, _ in junk)
    accepted_bytes = sum(r["bytes"] for r in env.store.list_updates(JOB, status="accepted"))
    assert r1["uplink_bytes"] == accepted_bytes  # accepted updates only
    assert r1["rejected_bytes"] == sum(r["bytes"] for r in rows if r["round"] == 1 and r["job_id"] == JOB)
    assert env.store.list_updates(JOB, status="accepted")[0]["metrics"] == {"loss": 1.0}


def test_late_update_for_a_closed_round_is_stale_and_finished_job_is_wrong_job(tmp_path):
    env = Env(tmp_path, rounds=2)
    try:
        env.start()
        rng = np.random.default_rng(3)
        msgs = {c: env.message(c, rng.normal(size=env.numel).astype(np.float32)) for c in "abc"}
        for c in "ab":
            assert env.engine.submit(c, msgs[c]).accepted
        assert env.engine.submit("c", msgs["c"]).accepted  # third accept closes round 1, round 2 opens
        deadline = time.time() + 5
        while (env.engine.current_round(JOB) is None or env.engine.current_round(JOB).round != 2):
            assert time.time() < deadline
            time.sleep(0.01)
        late = env.message("a", np.zeros(env.numel, np.float32))
        v = env.engine.submit("a", late)
        assert v.code == V.STALE_ROUND and "open round is 2" in v.reason
        v = env.engine.submit("a", msgs["a"])  # round 1's accepted update, captured and replayed in round 2
        assert v.code == V.REPLAYED
        env.engine.stop_job(JOB)
        env.store.update_job(JOB, status="finished")
        v = env.engine.submit("a", late)
        assert v.code == V.WRONG_JOB and "finished" in v.reason
    finally:
        env.engine.shutdown()
        env.store.close()


def test_fuzzed_messages_never_raise_or_touch_the_aggregate(env):
    rnd = env.start()
    rng = np.random.default_rng(4)
    base = env.message("b", rng.normal(size=env.numel).astype(np.float32))
    for i in range(300):
        raw = bytearray(base)
        mode = i % 3
        if mode == 0:
            for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 8))):
                raw[pos] ^= int(rng.integers(1, 256))
        elif mode == 1:
            raw = raw[: int(rng.integers(0, len(raw)))]
        else:
            raw = bytearray(rng.bytes(int(rng.integers(0, 2000))))
        verdict = env.engine.submit("b", bytes(raw))
        assert not verdict.accepted and verdict.code in V.REASON_CODES and verdict.code != V.INTERNAL_ERROR
    assert rnd.accumulator.count == 0 and rnd.accepted == 0
    assert env.engine.submit("b", base).accepted


def test_codec_digest_mismatch_is_wrong_codec_naming_the_rounds_spec_and_v2_devices_still_count(env):
    """The header names its codec by digest; a mismatch is refused saying which spec the round expects. A
    wire v2 frame (JSON header, full spec) from a device not yet upgraded goes through the same checks."""
    rnd = env.start()
    rng = np.random.default_rng(5)
    d = {c: rng.normal(size=env.numel).astype(np.float32) for c in "abc"}
    sparse = {"name": "topk", "density": 0.1, "values": "int8"}
    cases = [(env.message("a", d["a"], codec=sparse), f"codec {codec_digest(sparse).hex()}"),
             (env.message("a", d["a"], payload=codecs.encode(DENSE, d["a"], env.sizes)[0],
                          codec_digest=b"\x00" * 8), "codec 0000000000000000"),
             (env.message_v2("a", d["a"], codec={"name": "dense", "dtype": "float16"}),
              f"codec {codec_digest({'name': 'dense', 'dtype': 'float16'}).hex()}")]
    for raw, sent in cases:
        verdict = env.engine.submit("a", raw)
        assert verdict.code == V.WRONG_CODEC, verdict
        assert sent in verdict.reason and "round expects {'name': 'dense', 'dtype': 'float32'}" in verdict.reason
        assert f"(codec {codec_digest(DENSE).hex()})" in verdict.reason
        assert env.acks("a")[-1]["reason"] == verdict.reason
    assert rnd.accepted == 0
    # the spelling of the spec does not matter, only what the coordinator decodes with
    assert env.engine.submit("a", env.message("a", d["a"], 10, codec={"name": "dense",
                                                                      "error_feedback": True})).accepted
    assert env.engine.submit("b", env.message_v2("b", d["b"], 30)).accepted  # an old device's v2 frame
    assert env.engine.submit("b", env.message_v2("b", d["b"], 30)).code == V.REPLAYED
    assert env.engine.submit("c", env.message("c", d["c"], 60)).accepted
    assert env.engine.wait_idle(JOB, 10)
    job = env.store.get_job(JOB)
    new, _ = load_model(env.svc.models.get(job["current_version"]))
    expected = env.global_vec + (10 * d["a"] + 30 * d["b"] + 60 * d["c"]) / 100
    np.testing.assert_allclose(flatten(new), expected, rtol=1e-5, atol=1e-6)
    assert {r["client_id"]: r["metrics"] for r in env.store.list_updates(JOB, status="accepted")} == {
        c: {"loss": 1.0} for c in "abc"}


def test_codec_check_ignores_encoder_only_keys_and_checks_randk_seed():
    assert V.comparable_codec({"name": "topk", "density": 0.1, "error_feedback": False, "stochastic": True}) == \
        V.comparable_codec({"name": "topk", "density": 0.1})
    assert V.comparable_codec({"name": "randk", "density": 0.1, "seed": 1}) != \
        V.comparable_codec({"name": "randk", "density": 0.1, "seed": 2})


def test_internal_error_is_contained(env, monkeypatch):
    rnd = env.start()
    delta = np.ones(env.numel, np.float32)
    monkeypatch.setattr(V, "decode_payload", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    verdict = env.engine.submit("a", env.message("a", delta))
    assert verdict.code == V.INTERNAL_ERROR and rnd.accepted == 0
    monkeypatch.undo()
    assert env.engine.submit("a", env.message("a", delta)).accepted
