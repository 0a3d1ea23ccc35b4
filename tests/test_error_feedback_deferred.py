"""ResidualStore with write-behind: same accounting, the disk write off the caller's path, and the crash rule
(a crash before the deferred write leaves no residual, never the previous round's)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs

SIZES = [300, 1200, 500]
NUMEL = sum(SIZES)
SPEC = {"name": "topk", "density": 0.02, "values": "int8"}


def one_round(store: ResidualStore, job: str, update: np.ndarray) -> np.ndarray:
    """Apply, encode, update as a device does; returns what the server decodes."""
    corrected = store.apply(job, update)
    payload, sent = codecs.encode(SPEC, corrected, SIZES)
    store.update(job, corrected, sent)
    return codecs.decode(SPEC, payload, NUMEL, SIZES).to_dense(NUMEL)


def updates(seed: int, rounds: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(NUMEL) * (1 + r)).astype(np.float32) for r in range(rounds)]


class GatedWrites:
    """Holds the background writer inside its file write until ``release``; counts finished writes."""

    def __init__(self, store: ResidualStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        real = store._write_tmp

        def slow(arr: np.ndarray) -> Path:
            self.entered.set()
            assert self.gate.wait(10), "test never released the writer"
            return real(arr)

        monkeypatch.setattr(store._writes, "_write_tmp", slow)  # the background writer's file write

    def release(self) -> None:
        self.gate.set()


def test_same_payloads_and_residuals_as_synchronous_store(tmp_path: Path) -> None:
    sync, behind = ResidualStore(tmp_path / "a"), ResidualStore(tmp_path / "b", write_behind=True)
    true_sum = np.zeros(NUMEL, np.float64)
    sent_sum = np.zeros(NUMEL, np.float64)
    for update in updates(0, 6):
        true_sum += update
        a = one_round(sync, "job", update)
        b = one_round(behind, "job", update)
        np.testing.assert_array_equal(a, b)
        sent_sum += b
    residual = behind.load("job", NUMEL)
    np.testing.assert_array_equal(residual, sync.load("job", NUMEL))
    np.testing.assert_allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-4 * np.abs(true_sum).max())
    assert behind.close(timeout=10)


def test_flushed_residual_survives_a_restart(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path, write_behind=True)
    for update in updates(1, 3):
        one_round(store, "job", update)
    assert store.flush(timeout=10)
    held = store.load("job", NUMEL)
    assert np.abs(held).max() > 0
    restarted = ResidualStore(tmp_path, write_behind=True)
    np.testing.assert_array_equal(restarted.load("job", NUMEL), held)
    assert not list(tmp_path.glob(".residual-*"))  # no temp files left behind
    store.close(timeout=10)


def test_update_does_not_wait_for_the_disk_and_a_crash_before_the_write_leaves_no_stale_residual(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResidualStore(tmp_path, write_behind=True)
    rounds = updates(2, 2)
    one_round(store, "job", rounds[0])
    assert store.flush(timeout=10)
    assert store.path_for("job").is_file()  # round 1's residual is on disk
    gated = GatedWrites(store, monkeypatch)
    done = threading.Event()
    threading.Thread(target=lambda: (one_round(store, "job", rounds[1]), done.set()), daemon=True).start()
    assert done.wait(10), "update() blocked on the disk write"
    assert gated.entered.wait(10) and not gated.gate.is_set()  # the write is still in flight
    # A crash now: what a restarted device finds is no residual (zeros), not round 1's, whose largest
    # coordinates round 2 has already sent.
    assert not store.path_for("job").exists()
    assert not ResidualStore(tmp_path).load("job", NUMEL).any()
    memory = store.load("job", NUMEL)
    gated.release()
    assert store.flush(timeout=10)
    np.testing.assert_array_equal(ResidualStore(tmp_path).load("job", NUMEL), memory)


def test_a_superseded_write_never_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sdk.deferred_write as deferred_write

    landed: list[np.ndarray] = []
    real_replace = deferred_write.os.replace

    def replace(src: Path, dst: Path) -> None:
        landed.append(np.load(src))
        real_replace(src, dst)

    monkeypatch.setattr(deferred_write.os, "replace", replace)
    store = ResidualStore(tmp_path, write_behind=True)
    gated = GatedWrites(store, monkeypatch)
    rounds = updates(3, 3)
    one_round(store, "job", rounds[0])
    assert gated.entered.wait(10)  # round 1's write is stuck in flight
    one_round(store, "job", rounds[1])
    one_round(store, "job", rounds[2])  # round 2's queued write is replaced by round 3's
    newest = store.load("job", NUMEL)
    gated.release()
    assert store.flush(timeout=10)
    np.testing.assert_array_equal(ResidualStore(tmp_path).load("job", NUMEL), newest)
    assert len(landed) == 1  # round 1's file, finished after round 3's update, was discarded
    np.testing.assert_array_equal(landed[0], newest)
    assert not list(tmp_path.glob(".residual-*"))


def test_reset_and_job_switch_cancel_pending_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResidualStore(tmp_path, write_behind=True)
    gated = GatedWrites(store, monkeypatch)
    one_round(store, "job-a", updates(4, 1)[0])
    assert gated.entered.wait(10)
    store.reset()
    gated.release()
    assert store.flush(timeout=10)
    assert not list(tmp_path.glob("residual-*.npy"))  # the in-flight write was discarded, not landed

    one_round(store, "job-a", updates(5, 1)[0])
    assert store.flush(timeout=10)
    assert not store.load("job-b", NUMEL).any()  # a new job starts from zeros and drops job-a's file
    assert not store.path_for("job-a").exists()
    store.close(timeout=10)


def test_a_failed_write_keeps_the_residual_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResidualStore(tmp_path, write_behind=True)

    def full(arr: np.ndarray) -> Path:
        raise OSError(28, "No space left on device")

    store._writes._write_tmp = full
    one_round(store, "job", updates(6, 1)[0])
    assert store.flush(timeout=10)
    assert not store.path_for("job").exists()
    held = store.load("job", NUMEL)
    assert np.abs(held).max() > 0  # error feedback goes on from memory
    store._writes._write_tmp = store._write_tmp
    one_round(store, "job", updates(7, 1)[0])
    assert store.flush(timeout=10)
    np.testing.assert_array_equal(ResidualStore(tmp_path).load("job", NUMEL), store.load("job", NUMEL))
