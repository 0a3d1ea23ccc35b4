"""Issue 10: faults injected from outside into real processes (Mosquitto, coordinator, device processes),
plus in-process checks of the recovery pieces (stall reporting, re-aggregation, strategy state).

Every process-level scenario runs one small_cnn/digits job (6 devices, 6 rounds, IID shards) and must finish,
lose at most the rounds it says, count no update twice and end within 1 accuracy point of the fault-free job
on the same seed. The federation's processes are stopped by PID when the module ends.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.engine import MemoryPublisher, RoundEngine
from coordinator.rounds.journal import RoundJournal
from coordinator.rounds.strategy import make_strategy
from coordinator.rounds import validation
from edge_sdk.protocol import topics
from edge_sdk.protocol.codecs import Decoded
from tests.support import fault_scenarios as sc
from tests.support.federation import Federation
from tests.test_engine import JOB, Env, wait_for

pytestmark = pytest.mark.integration

# 1 point, as the issue asks. This holds because a run is repeatable: the per-round seeds come from the job seed
# (not the job id) and the job clips with a per-round bound, so two fault-free runs on seed 0 end at the same
# accuracy (measured: 99.17 % twice), and what remains is the fault's own effect (SIGSTOP, kill: -0.28 points).
# An epsilon absorbs float rounding of n/360.
ACCURACY_POINTS = 0.01 + 1e-9


# ------------------------------------------------------------------------------------------- in-process

@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made: list[Env] = []

    def make(**kw: object) -> Env:
        made.append(Env(tmp_path / str(len(made)), **kw))
        return made[-1]

    yield make  # type: ignore[misc]
    for e in made:
        e.close()


def test_stalled_job_pauses_with_reason_and_resumes_when_devices_return(env) -> None:
    e = env(online="", stall_timeout_s=1.0, on_stall="pause")
    e.engine.start_job(JOB)
    wait_for(lambda: e.store.get_job(JOB)["status"] == "paused", timeout=10, what="pause")
    job = e.store.get_job(JOB)
    assert job["error"].startswith("paused: 0 of 2 required devices online for 1 s")
    assert "0 of 2 required devices online" in e.engine.notice(JOB)
    assert any(ev["type"] == "job_paused" for ev in e.events())
    for cid in "abc":
        e.engine.presence.update(cid, True)
    e.open_round(1, 1)
    assert e.store.get_job(JOB)["status"] == "running" and e.store.get_job(JOB)["error"] is None
    assert e.engine.notice(JOB) is None


def test_stalled_job_fails_when_configured_to(env) -> None:
    e = env(online="a", stall_timeout_s=1.0, on_stall="fail")
    e.engine.start_job(JOB)
    assert e.engine.wait_idle(JOB, 10)
    job = e.store.get_job(JOB)
    assert job["status"] == "failed" and job["error"] == "no progress: 1 of 2 required devices online for 1 s (round 1)"


def test_bad_on_stall_is_refused(env) -> None:
    with pytest.raises(ValueError, match="'on_stall' must be one of pause, fail"):
        env(on_stall="wait")


def test_restart_reaggregates_spooled_updates_without_double_counting(env) -> None:
    e = env(rounds=1, round_timeout_s=30.0)
    e.engine.start_job(JOB)
    e.open_round(1, 1)
    raw_a, _ = e.update("a", np.full(e.numel, 0.5, np.float32))
    assert e.engine.submit("a", raw_a).accepted
    assert (e.svc.data_dir / "journal" / "spool" / JOB / "1-1" / "a.upd").read_bytes() == raw_a
    e.engine.shutdown()  # like a crash: the round is still open in the store
    assert e.store.get_round(JOB, 1, 1)["status"] == "open"
    engine2 = RoundEngine(e.store, e.svc.models, MemoryPublisher(), e.engine.config, e.engine.presence,
                          device_key=e.engine.device_key,  # keys derive from the master key file: same after a restart
                          journal=RoundJournal(e.svc.data_dir / "journal"))
    try:
        assert engine2.resume() == [JOB]
        again = engine2.current_round(JOB)  # re-opened before resume() returns: queued updates find it
        assert (again.round, again.attempt, set(again.accepted_clients)) == (1, 1, {"a"})
        wait_for(lambda: any(e["type"] == "round_started" for e in engine2.publisher.json_on(topics.job_events_topic(JOB))),
                 what="round_started")
        tasks = [t for t, _ in engine2.publisher.messages if t.endswith("/task")]
        assert sorted(tasks) == [topics.task_topic("b"), topics.task_topic("c")]  # only those still owed
        dup = engine2.submit("a", raw_a)  # a device re-sending after the lost ack
        assert dup.code == validation.DUPLICATE
        raw_b, _ = e.update("b", np.full(e.numel, -0.5, np.float32), base=e.version0)
        raw_c, _ = e.update("c", np.zeros(e.numel, np.float32), base=e.version0)
        assert engine2.submit("b", raw_b).accepted and engine2.submit("c", raw_c).accepted
        assert engine2.wait_idle(JOB, 10)
        r = e.store.get_round(JOB, 1, 1)
        assert r["status"] == "closed" and r["accepted"] == 3 and r["participants"] == ["a", "b", "c"]
        assert not (e.svc.data_dir / "journal" / "spool" / JOB / "1-1").exists()
    finally:
        engine2.shutdown()


def test_storage_failure_refuses_with_retry_later_and_keeps_accepted(env, monkeypatch) -> None:
    e = env(rounds=1, round_timeout_s=30.0)
    e.engine.start_job(JOB)
    e.open_round(1, 1)
    assert e.engine.submit("a", e.update("a", np.ones(e.numel, np.float32))[0]).accepted

    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(e.engine.journal, "save_update", full)
    verdict = e.engine.submit("b", e.update("b", np.ones(e.numel, np.float32))[0])
    assert verdict.code == validation.UNAVAILABLE and "No space left on device" in verdict.reason
    assert e.engine.current_round(JOB).accepted == 1  # refused, not counted
    assert "cannot store incoming updates" in e.engine.notice(JOB)
    monkeypatch.undo()
    assert e.engine.submit("b", e.update("b", np.ones(e.numel, np.float32))[0]).accepted
    assert e.engine.notice(JOB) is None


def test_fedadam_moments_survive_a_restart(tmp_path: Path) -> None:
    journal = RoundJournal(tmp_path)
    s1 = make_strategy({"name": "fedadam"})
    acc = s1.begin(np.zeros(4, np.float32))
    acc.add(Decoded(None, np.array([1, -1, 0.5, 0], np.float32)), 1)
    acc.finalize()
    journal.save_strategy("job-x", 3, s1.state())
    s2 = make_strategy({"name": "fedadam"})
    s2.load_state(journal.load_strategy("job-x", 3) or {})
    assert np.array_equal(s1.m, s2.m) and np.array_equal(s1.v, s2.v)
    journal.prune_strategy("job-x", keep_from=4)
    assert journal.load_strategy("job-x", 3) is None


# ------------------------------------------------------------------------------------- real processes

@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    federation = Federation(tmp_path_factory.mktemp("faults"), devices=6, tmpfs_mb=64)
    try:
        yield federation
    finally:
        federation.close()


@pytest.fixture(scope="module")
def base(fed: Federation) -> dict:
    row = sc.baseline(fed)
    assert row["status"] == "finished" and row["rounds_lost"] == 0, row
    return row


def check(row: dict, base: dict, max_lost: int) -> None:
    assert row["status"] == "finished", row
    assert row["rounds_closed"] == sc.ROUNDS, row
    assert row["rounds_lost"] <= max_lost, row
    assert row["max_accepts_per_client_round"] == 1 and row["participants_match"], row
    assert abs(row["final_accuracy"] - base["final_accuracy"]) <= ACCURACY_POINTS, (row, base)


def test_kill_30_percent_of_devices_mid_round(fed: Federation, base: dict) -> None:
    row = sc.kill_devices(fed)
    check(row, base, max_lost=1)
    assert len(row["killed"]) == 2


def test_sigstopped_device_does_not_hold_the_round_and_its_late_update_is_stale(fed: Federation, base: dict) -> None:
    row = sc.sigstop_device(fed)
    check(row, base, max_lost=0)
    assert row["round_closed_after_s"] <= row["deadline_s"] + 10, row
    if row["victim_selected"] and not row["victim_accepted_in_fault_round"]:
        # its late update is refused as stale, or (stopped before it dequeued the task) it skipped the closed round
        assert (any(r.startswith("stale_round: ") for r in row["victim_stale_reasons"])
                or row["victim_skipped_closed_round"]), row
    assert row["victim_accepted_later"], row


def test_device_cut_off_from_the_broker_longer_than_a_round(fed: Federation, base: dict) -> None:
    row = sc.partition_device(fed)
    check(row, base, max_lost=0)
    assert row["round_closed_while_cut"], row  # the round did not wait for the lost device
    if row["victim_selected"] and not row["victim_accepted_in_fault_round"]:
        assert any(r.startswith("stale_round: ") for r in row["victim_stale_reasons"]), row
    assert row["victim_accepted_later"], row


def test_broker_restart_mid_round_without_persistence(fed: Federation, base: dict) -> None:
    row = sc.restart_broker(fed, persistence=False, mid_upload=False)
    check(row, base, max_lost=1)
    assert row["recover_s"] <= 10, row


def test_broker_restart_mid_upload_with_persistence(fed: Federation, base: dict) -> None:
    row = sc.restart_broker(fed, persistence=True, mid_upload=True)
    check(row, base, max_lost=1)
    assert row["recover_s"] <= 10, row


def test_coordinator_sigkill_mid_round_reaggregates(fed: Federation, base: dict) -> None:
    row = sc.kill_coordinator(fed, during_aggregation=False)
    check(row, base, max_lost=0)
    assert row["fault_round_attempt"] == row["killed_attempt"], row
    assert set(row["accepted_before_kill"]) <= set(row["fault_round_participants"]), row


def test_coordinator_sigkill_during_aggregation_reaggregates(fed: Federation, base: dict) -> None:
    try:
        row = sc.kill_coordinator(fed, during_aggregation=True)
    finally:
        fed.hold_file.unlink(missing_ok=True)  # a failure here must not hold the next scenarios' rounds
    check(row, base, max_lost=0)
    assert row["fault_round_attempt"] == row["killed_attempt"], row
    assert set(row["accepted_before_kill"]) <= set(row["fault_round_participants"]), row
    if set(row["accepted_before_kill"]) == set(row["fault_round_participants"]):
        assert row["fault_round_version"] == row["held_version"], row  # same updates, same model


def test_device_restart_mid_round_resumes_residual_and_sends_once(fed: Federation, base: dict) -> None:
    row = sc.restart_device(fed)
    check(row, base, max_lost=1)
    assert row["skipped_duplicate_task"] and row["victim_accepts_in_fault_round"] >= 1, row
    assert row["victim_max_sends_per_attempt"] == 1, row
    assert row["residual_resumed"] and row["victim_accepted_later"], row


def test_full_data_dir_reports_clearly_and_loses_nothing_accepted(fed: Federation, base: dict) -> None:
    row = sc.disk_full(fed)
    check(row, base, max_lost=1)
    assert "cannot store" in row["notice"], row
    assert "No space left" in row["notice"] or "too large" in row["notice"] or "disk is full" in row["notice"], row
    assert "notice: " + row["notice"][:40] in row["cli_status"], row
    assert row["fault_round_attempt"] == row["fault_attempt"], row
    assert set(row["accepted_before_full"]) <= set(row["fault_round_participants"]), row


def test_sent_journal_remembers_the_attempt_and_keeps_bytes_until_acked(tmp_path: Path) -> None:
    from edge_sdk.sent_journal import SentJournal

    journal = SentJournal(tmp_path)
    assert not journal.already_sent("job-a", 2, 1) and journal.pending() == []
    journal.record("job-a", 2, 1, b"update-bytes")
    again = SentJournal(tmp_path)  # a restarted device
    assert again.already_sent("job-a", 2, 1) and not again.already_sent("job-a", 2, 2)
    assert again.already_sent("job-a", 1, 3) and not again.already_sent("job-a", 3, 1)  # older: answered
    assert not again.already_sent("job-b", 1, 1)
    assert [(p.job_id, p.round, p.attempt, p.message) for p in again.pending()] == [("job-a", 2, 1, b"update-bytes")]
    again.acked("job-a", 3)  # an ack for another round changes nothing
    assert len(again.pending()) == 1
    again.acked("job-a", 2)
    assert again.pending() == [] and again.already_sent("job-a", 2, 1)
    assert not any(p.suffix == ".upd" for p in tmp_path.iterdir())
