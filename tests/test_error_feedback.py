"""ResidualStore: accounting over rounds, persistence across instances, job switches and the size bound."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs

SIZES = [300, 1200, 500]
NUMEL = sum(SIZES)


def run_rounds(store: ResidualStore, spec: dict, job: str, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Client loop as EdgeClient runs it; returns (sum of true updates, sum of what the server decoded)."""
    rng = np.random.default_rng(seed)
    true_sum = np.zeros(NUMEL, np.float64)
    sent_sum = np.zeros(NUMEL, np.float64)
    for r in range(rounds):
        update = (rng.standard_normal(NUMEL) * (1 + r)).astype(np.float32)
        true_sum += update
        corrected = store.apply(job, update)
        payload, sent = codecs.encode(spec, corrected, SIZES)
        store.update(job, corrected, sent)
        sent_sum += codecs.decode(spec, payload, NUMEL, SIZES).to_dense(NUMEL)
    return true_sum, sent_sum


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "topk", "density": 0.02, "values": "int8", "stochastic": True, "seed": 3},
        {"name": "topk", "density": 0.05, "scope": "per_tensor", "values": "float16"},
        {"name": "randk", "density": 0.1, "values": "float32", "seed": 11},
        {"name": "dense", "dtype": "float16", "error_feedback": True},
    ],
)
def test_sent_plus_residual_equals_true_updates(tmp_path: Path, spec: dict) -> None:
    store = ResidualStore(tmp_path)
    true_sum, sent_sum = run_rounds(store, spec, "job-a", rounds=6, seed=0)
    residual = store.load("job-a", NUMEL)
    assert np.abs(residual).max() > 0  # something really was held back
    np.testing.assert_allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-4 * np.abs(true_sum).max())
    # and without the residual the books would not balance, so the check above has teeth
    assert np.abs(sent_sum - true_sum).max() > 1e-2 * np.abs(true_sum).max() or spec["name"] == "dense"


def test_residual_is_what_was_not_sent(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    vec = np.arange(NUMEL, dtype=np.float32)
    corrected = store.apply("j", vec)
    assert np.array_equal(corrected, vec)  # nothing held back yet
    _, sent = codecs.encode({"name": "topk", "density": 0.01}, corrected, SIZES)
    store.update("j", corrected, sent)
    expected = vec.copy()
    expected[sent.indices] = 0
    assert np.array_equal(store.load("j", NUMEL), expected)
    assert np.array_equal(store.apply("j", np.ones(NUMEL, np.float32)), expected + 1)


def test_persists_across_instances(tmp_path: Path) -> None:
    first = ResidualStore(tmp_path)
    run_rounds(first, {"name": "topk", "density": 0.01}, "job-a", rounds=2, seed=1)
    held = first.load("job-a", NUMEL)
    assert first.path_for("job-a").is_file()
    second = ResidualStore(tmp_path)
    assert np.array_equal(second.load("job-a", NUMEL), held)
    assert not list(tmp_path.glob(".residual-*"))  # no temp files left behind


def test_new_job_or_size_mismatch_starts_from_zero_and_deletes_old_file(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    run_rounds(store, {"name": "topk", "density": 0.01}, "job-a", rounds=1, seed=2)
    old = store.path_for("job-a")
    assert old.is_file()
    fresh = ResidualStore(tmp_path)
    assert not fresh.load("job-b", NUMEL).any()
    assert not old.exists()
    run_rounds(fresh, {"name": "topk", "density": 0.01}, "job-b", rounds=1, seed=3)
    again = ResidualStore(tmp_path)
    assert not again.load("job-b", NUMEL + 1).any()  # model changed shape: residual meaningless
    assert not list(tmp_path.glob("residual-*.npy"))


def test_reset_forgets_everything(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    run_rounds(store, {"name": "topk", "density": 0.01}, "job-a", rounds=1, seed=4)
    store.reset()
    assert not list(tmp_path.glob("residual-*.npy"))
    assert not store.load("job-a", NUMEL).any()


def test_corrupt_file_is_discarded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResidualStore(tmp_path)
    store.path_for("job-a").write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level(logging.WARNING):
        assert not store.load("job-a", NUMEL).any()
    assert "unreadable residual" in caplog.text
    assert not store.path_for("job-a").exists()


def test_size_bound_refuses_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResidualStore(tmp_path, max_bytes=4 * NUMEL - 1)
    vec = np.ones(NUMEL, np.float32)
    _, sent = codecs.encode({"name": "topk", "density": 0.01}, vec, SIZES)
    with caplog.at_level(logging.WARNING):
        store.update("big", vec, sent)
        assert np.array_equal(store.apply("big", vec), vec)  # nothing fed back
    assert "error feedback disabled" in caplog.text
    assert not list(tmp_path.glob("residual-*.npy"))
    roomy = ResidualStore(tmp_path, max_bytes=4 * NUMEL)
    roomy.update("big", vec, sent)
    assert roomy.path_for("big").is_file()


def test_non_finite_residual_is_reset(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    corrected = np.ones(NUMEL, np.float32)
    corrected[5] = np.inf
    store.update("j", corrected, codecs.Decoded(None, np.zeros(NUMEL, np.float32)))
    assert np.isfinite(store.load("j", NUMEL)).all() and not store.load("j", NUMEL).any()
