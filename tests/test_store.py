"""Coordinator SQLite store: round-trips of every table, thread safety, tokens only as hashes."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from coordinator.storage.store import Store
from coordinator.rounds.validation import hash_token

V0, V1 = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    yield s
    s.close()


def test_wal_mode(store):
    assert store._one("PRAGMA journal_mode")["journal_mode"] == "wal"


def test_job_roundtrip_and_update(store):
    cfg = {"rounds": 3, "codec": {"name": "dense"}, "nested": {"x": [1, 2]}}
    job = store.create_job("job-1", "demo", cfg, V0, 123)
    assert job["config"] == cfg and job["status"] == "created" and job["current_version"] == V0
    store.update_job("job-1", status="running", current_round=1, current_version=V1)
    job = store.get_job("job-1")
    assert (job["status"], job["current_round"], job["current_version"]) == ("running", 1, V1)
    assert [j["id"] for j in store.list_jobs("running")] == ["job-1"]
    assert store.list_jobs("finished") == []
    assert store.list_model_versions("job-1") == [
        {"version": V0, "round": 0, "size": 123, "created_at": pytest.approx(job["created_at"], abs=5)}]
    with pytest.raises(KeyError):
        store.update_job("job-1", config="{}")


def test_persists_across_reopen(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    s.create_job("job-1", "demo", {"rounds": 1}, V0, 1)
    s.create_client("c1", "phone", hash_token("secret"))
    s.close()
    s2 = Store(tmp_path / "db.sqlite")
    assert s2.get_job("job-1")["config"] == {"rounds": 1}
    assert s2.get_client("c1")["name"] == "phone"
    s2.close()


def test_client_token_stored_only_as_hash(store, tmp_path):
    store.create_client("c1", "phone", hash_token("s3cret-token"))
    assert "token_sha256" not in store.get_client("c1")
    assert store.get_client("c1", with_secret=True)["token_sha256"] == hash_token("s3cret-token")
    assert store.client_by_token_hash(hash_token("s3cret-token"))["id"] == "c1"
    assert store.client_by_token_hash(hash_token("other")) is None
    assert all("token" not in k for c in store.list_clients() for k in c)
    raw = (tmp_path / "db.sqlite").read_bytes() + (tmp_path / "db.sqlite-wal").read_bytes()
    assert b"s3cret-token" not in raw
    with pytest.raises(sqlite3.IntegrityError):
        store.create_client("c1", "again", hash_token("x"))
    store.set_client_state("c1", "online", 12.5)
    assert store.get_client("c1")["state"] == "online" and store.get_client("c1")["last_seen"] == 12.5


def test_rounds_attempts_and_downlink(store):
    store.create_job("j", "demo", {}, V0, 1)
    assert store.next_attempt("j", 1) == 1
    store.open_round("j", 1, 1, V0, {"name": "dense"}, ["c1", "c2"])
    store.update_round("j", 1, 1, status="failed", reason="too few", accepted=1, metrics={"loss": 0.5})
    assert store.next_attempt("j", 1) == 2
    store.open_round("j", 1, 2, V0, {"name": "dense"}, ["c2", "c3"])
    store.add_downlink("j", V0, 100)  # charged to the latest attempt that used V0
    store.add_downlink("j", V0, 50)
    store.add_downlink("j", V1, 999)  # no round used V1: ignored
    rounds = store.get_rounds("j")
    assert [(r["round"], r["attempt"], r["status"]) for r in rounds] == [(1, 1, "failed"), (1, 2, "open")]
    assert rounds[0]["metrics"] == {"loss": 0.5} and rounds[0]["selected"] == ["c1", "c2"]
    assert rounds[0]["downlink_bytes"] == 0 and rounds[1]["downlink_bytes"] == 150
    assert store.abort_open_rounds("j") == 1
    assert store.get_round("j", 1, 2)["status"] == "aborted"


def test_updates_and_metrics(store):
    store.add_update(client_id="c1", status="accepted", bytes_=10, job_id="j", round_=1, attempt=1,
                     num_samples=5, metrics={"loss": 1.0})
    store.add_update(client_id="c2", status="rejected", reason="duplicate", bytes_=11, job_id="j", round_=1)
    store.add_update(client_id="c2", status="rejected", reason="stale_round", bytes_=12, job_id="j", round_=2)
    rows = store.list_updates("j")
    assert [(r["client_id"], r["status"], r["reason"]) for r in rows] == [
        ("c1", "accepted", None), ("c2", "rejected", "duplicate"), ("c2", "rejected", "stale_round")]
    assert rows[0]["metrics"] == {"loss": 1.0}
    assert len(store.list_updates("j", round_=1)) == 2
    assert [r["bytes"] for r in store.list_updates("j", status="rejected")] == [11, 12]
    store.add_metrics("j", 1, {"accuracy": 0.9, "loss": 0.3}, "eval")
    assert {(m["name"], m["value"], m["source"]) for m in store.list_metrics("j")} == {
        ("accuracy", 0.9, "eval"), ("loss", 0.3, "eval")}


def test_concurrent_writers(store):
    store.create_job("j", "demo", {}, V0, 1)
    errors = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                store.add_update(client_id=f"c{t}", status="accepted", bytes_=i, job_id="j", round_=1)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.list_updates("j", limit=10_000)) == 200


def test_older_databases_gain_the_federated_eval_column(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE rounds (job_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, "
                "status TEXT NOT NULL, base_version TEXT NOT NULL, new_version TEXT, codec TEXT NOT NULL, "
                "selected TEXT NOT NULL, participants TEXT NOT NULL DEFAULT '[]', accepted INTEGER NOT NULL "
                "DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0, uplink_bytes INTEGER NOT NULL DEFAULT 0, "
                "downlink_bytes INTEGER NOT NULL DEFAULT 0, compression_ratio REAL, started_at REAL NOT NULL, "
                "closed_at REAL, duration_s REAL, metrics TEXT NOT NULL DEFAULT '{}', eval TEXT, reason TEXT, "
                "PRIMARY KEY (job_id, round, attempt))")
    old.commit()
    old.close()
    store = Store(path)
    store.open_round("j", 1, 1, "v0", {"name": "dense"}, ["a"])
    store.update_round("j", 1, 1, federated_eval={"status": "ok", "accuracy": 0.5})
    assert store.get_round("j", 1, 1)["federated_eval"] == {"status": "ok", "accuracy": 0.5}
    store.close()
