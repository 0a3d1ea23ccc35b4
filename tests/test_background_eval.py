"""Server-side evaluation runs off the round's critical path.

A round commits and the next one is announced while its version is still being scored; the score lands on the
round later (with a ``round_evaluated`` event); a version that waits while a newer one arrives is skipped with
a reason; the job is only ``finished`` once its last version is scored; a restart scores what was pending.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np

from coordinator.rounds.background_eval import BackgroundEvaluation, Scoring
from coordinator.rounds.engine import MemoryPublisher, RoundEngine
from tests.test_engine import JOB, mk, wait_for  # noqa: F401 - mk is the fixture

SCORE = {"loss": 1.25, "accuracy": 0.5, "num_samples": 10}


class GatedEvaluator:
    """Scores instantly for version 0 (the job's baseline), and waits for ``gate`` for every later version."""

    def __init__(self, version0: str) -> None:
        self.version0 = version0
        self.gate = threading.Event()
        self.started: list[str] = []

    def evaluate(self, model_bytes: bytes, cfg: dict) -> dict:
        version = hashlib.sha256(model_bytes).hexdigest()
        if version != self.version0:
            self.started.append(version)
            assert self.gate.wait(30), "test never opened the gate"
        return dict(SCORE)


def _submit_round(env, r: int) -> None:
    env.open_round(r)
    for cid in "abc":
        raw, _ = env.update(cid, np.full(env.numel, 0.01 * r, np.float32), round_=r)
        assert env.engine.submit(cid, raw).accepted


def _eval_metrics(env) -> dict[int, float]:
    return {m["round"]: m["value"] for m in env.store.list_metrics(JOB)
            if m["source"] == "eval" and m["name"] == "accuracy"}


def test_round_commits_and_next_round_starts_while_its_version_is_scored(mk):
    env = mk(rounds=3, eval={"dataset": "digits"})
    gated = env.engine.evaluator = GatedEvaluator(env.version0)
    env.engine.start_job(JOB)
    _submit_round(env, 1)
    env.open_round(2)  # announced although round 1's version is still being scored
    wait_for(lambda: len(gated.started) == 1, what="round 1's evaluation to start")
    rec1 = env.store.get_round(JOB, 1, 1)
    assert rec1["status"] == "closed" and rec1["eval"]["status"] == "pending"
    assert 1 not in _eval_metrics(env)
    assert env.events("model_updated")[0]["eval"]["status"] == "pending"

    _submit_round(env, 2)  # queued behind round 1 ...
    _submit_round(env, 3)  # ... and superseded by round 3 before it was scored
    assert not env.engine.wait_idle(JOB, 0.3)  # the last version is not scored yet: the job is not finished
    assert env.store.get_job(JOB)["status"] == "running"

    gated.gate.set()
    assert env.engine.wait_idle(JOB, 10)
    assert env.store.get_job(JOB)["status"] == "finished"
    recs = {r["round"]: r for r in env.store.get_rounds(JOB)}
    assert recs[1]["eval"] == SCORE and recs[3]["eval"] == SCORE
    assert recs[2]["eval"]["status"] == "skipped" and "round 3's newer version" in recs[2]["eval"]["reason"]
    assert _eval_metrics(env) == {0: 0.5, 1: 0.5, 3: 0.5}
    scored = {e["round"]: e for e in env.events("round_evaluated")}
    assert scored[1]["eval"] == SCORE and scored[1]["version"] == recs[1]["new_version"]
    assert scored[2]["eval"]["status"] == "skipped" and scored[3]["version"] == recs[3]["new_version"]
    assert len(gated.started) == 2  # round 2's version was never run through the model


def test_restarted_coordinator_scores_the_version_left_pending(mk):
    env = mk(rounds=2, eval={"dataset": "digits"})
    gated = env.engine.evaluator = GatedEvaluator(env.version0)
    env.engine.start_job(JOB)
    _submit_round(env, 1)
    env.open_round(2)
    wait_for(lambda: len(gated.started) == 1, what="round 1's evaluation to start")
    env.engine.shutdown()  # coordinator stops mid-evaluation: round 1 stays pending, the job stays running
    assert env.store.get_round(JOB, 1, 1)["eval"]["status"] == "pending"
    assert env.store.get_job(JOB)["status"] == "running"

    fast = GatedEvaluator(env.version0)
    fast.gate.set()
    engine2 = RoundEngine(env.store, env.svc.models, MemoryPublisher(), env.engine.config, env.engine.presence,
                          evaluator=fast, device_key=env.engine.device_key)
    try:
        assert engine2.resume() == [JOB]
        wait_for(lambda: (env.store.get_round(JOB, 1, 1)["eval"] or {}).get("accuracy") == 0.5,
                 what="round 1 scored after the restart")
        assert fast.started == [env.store.get_round(JOB, 1, 1)["new_version"]]
    finally:
        engine2.shutdown()
        gated.gate.set()  # let the first engine's stranded evaluation thread end


def _item(r: int) -> Scoring:
    return Scoring(r, 1, f"v{r}", b"", {})


def test_close_records_the_queued_version_as_not_run_or_leaves_it_pending():
    for reason in ("the job ended before this version was scored", None):
        gate, recorded = threading.Event(), []
        bg = BackgroundEvaluation("j", lambda data, cfg: (gate.wait(10), dict(SCORE))[1],
                                  lambda item, result: recorded.append((item.round, result)))
        bg.submit(_item(1))
        wait_for(lambda: bg._busy, what="round 1 taken")
        bg.submit(_item(2))
        bg.close(reason)
        gate.set()
        assert bg.drain(5)
        expected = [(1, SCORE)] if reason is None else [(2, {"status": "not_run", "reason": reason}), (1, SCORE)]
        assert recorded == expected


def test_a_failing_store_write_does_not_stop_later_scores():
    recorded = []

    def record(item, result):
        if item.round == 1:
            raise OSError("disk full")
        recorded.append(item.round)

    bg = BackgroundEvaluation("j", lambda data, cfg: dict(SCORE), record)
    bg.submit(_item(1))
    assert bg.drain(5)
    bg.submit(_item(2))
    assert bg.drain(5)
    assert recorded == [2]
