"""The direction screen (coordinator/rounds/direction.py): updates pointing against the federation's recent
direction stay out of the mean; stale references fall back to every update; the reference is persisted."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.rounds.direction import DirectionReference, normalize_direction
from coordinator.rounds.jobspec import JobSpecError, normalize_job
from coordinator.rounds.journal import RoundJournal
from coordinator.rounds.limits import UpdateLimits, normalize_limits
from coordinator.rounds.recovery import load_strategy_state
from coordinator.rounds.strategy import make_strategy
from edge_sdk.protocol import codecs

NUMEL = 2000
CLIP_ONLY = {"direction": {"mode": "none"}}


class Upd:
    def __init__(self, values, indices=None):
        self.values = np.asarray(values, dtype=np.float32)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)


def honest_round(rng: np.random.Generator, true: np.ndarray, n: int = 10) -> list[np.ndarray]:
    """Non-IID-like honest updates: a shared descent direction plus device-specific noise of similar size."""
    return [(true + rng.normal(scale=np.linalg.norm(true) / np.sqrt(NUMEL), size=NUMEL)).astype(np.float32)
            for _ in range(n)]


def aggregate(strategy, updates, weights=None) -> np.ndarray:
    acc = strategy.begin(np.zeros(NUMEL, np.float32))
    for i, u in enumerate(updates):
        acc.add(u if hasattr(u, "values") else Upd(u), 1 if weights is None else weights[i])
    return acc.finalize()


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def warmed(limits: dict | None, rng: np.random.Generator, true: np.ndarray, strategy: str = "fedavg"):
    """A job's strategy after one honest round, so the screen has a reference (round 1 has none)."""
    s = make_strategy(strategy, UpdateLimits.from_config(limits))
    aggregate(s, honest_round(rng, true))
    return s


# ----------------------------------------------------------------------------------------------- attacks
def test_sign_flipped_scaled_minority_is_kept_out_of_the_mean():
    rng = np.random.default_rng(0)
    true = rng.normal(size=NUMEL).astype(np.float32)
    defended, clip_only = warmed(None, rng, true), warmed(CLIP_ONLY, rng, true)
    honest = honest_round(rng, true, 8)
    attack = [-10.0 * honest[0], -10.0 * honest[1]]  # what the benchmark's signflip devices send
    honest_mean = np.mean(honest, axis=0)
    got = aggregate(defended, honest + attack)
    baseline = aggregate(clip_only, honest + attack)
    # clipping alone: each attacker cancels about one honest device; the screen removes them entirely
    assert np.linalg.norm(baseline - honest_mean) > 0.4 * np.linalg.norm(honest_mean)
    assert cos(got, honest_mean) > 0.99
    assert np.linalg.norm(got - honest_mean) < 0.1 * np.linalg.norm(honest_mean)


def test_sparse_updates_are_screened_in_o_k_without_densifying():
    rng = np.random.default_rng(1)
    true = rng.normal(size=NUMEL).astype(np.float32)
    spec = codecs.validate_spec({"name": "topk", "density": 0.05, "values": "float32"})
    sparse = [codecs.encode(spec, u, [NUMEL])[1] for u in honest_round(rng, true)]
    s = make_strategy("fedavg", UpdateLimits.from_config(None))
    aggregate(s, sparse)  # the reference is the mean of sparse updates, still dense
    honest = [codecs.encode(spec, u, [NUMEL])[1] for u in honest_round(rng, true, 8)]
    evil = [codecs.encode(spec, -10.0 * u, [NUMEL])[1] for u in honest_round(rng, true, 2)]
    acc = s.begin(np.zeros(NUMEL, np.float32))
    for u in honest + evil:
        assert u.indices is not None and u.values.size == 100  # k values, as validation enforces
        acc.add(u, 1)
    assert acc.screen.stats() == {"seen": 10, "passed": 8, "fallback": False}
    clean = make_strategy("fedavg", UpdateLimits.from_config(CLIP_ONLY))
    clean.limits.bound.bound = s.limits.bound.bound
    honest_only = aggregate(clean, honest)
    assert cos(acc.finalize(), honest_only) > 0.99


def test_first_round_has_no_reference_and_matches_clipping_alone():
    rng = np.random.default_rng(2)
    updates = honest_round(rng, rng.normal(size=NUMEL).astype(np.float32))
    updates[0] = -updates[0]
    got = aggregate(make_strategy("fedavg", UpdateLimits.from_config(None)), updates)
    want = aggregate(make_strategy("fedavg", UpdateLimits.from_config(CLIP_ONLY)), updates)
    np.testing.assert_array_equal(got, want)


def test_a_stale_reference_falls_back_to_every_update():
    rng = np.random.default_rng(3)
    true = rng.normal(size=NUMEL).astype(np.float32)
    s = warmed(None, rng, true)
    clip_only = warmed(CLIP_ONLY, rng, true)
    clip_only.limits.bound.bound = s.limits.bound.bound
    turned = honest_round(rng, -true)  # the whole federation now moves the other way
    acc = s.begin(np.zeros(NUMEL, np.float32))
    for u in turned:
        acc.add(Upd(u), 1)
    assert acc.screen.fallback
    np.testing.assert_allclose(acc.finalize(), aggregate(clip_only, turned), rtol=1e-5, atol=1e-7)
    assert cos(s.limits.direction.vector, -true) > 0  # the reference follows the federation


def test_inflated_sample_claims_cannot_force_the_fallback():
    rng = np.random.default_rng(4)
    true = rng.normal(size=NUMEL).astype(np.float32)
    limits = {"weighting": "num_samples", "max_num_samples": 2**53}
    s = warmed(limits, rng, true)
    honest = honest_round(rng, true, 6)
    acc = s.begin(np.zeros(NUMEL, np.float32))
    for u in honest:
        acc.add(Upd(u), 10)
    for u in honest[:4]:
        acc.add(Upd(-10.0 * u), 10**12)  # 4 of 10 devices, with almost all the claimed weight
    assert acc.screen.stats() == {"seen": 10, "passed": 6, "fallback": False}
    assert cos(acc.finalize(), np.mean(honest, axis=0)) > 0.99


def test_a_clean_round_allocates_no_held_back_sum():
    rng = np.random.default_rng(5)
    true = rng.normal(size=NUMEL).astype(np.float32)
    s = warmed(None, rng, true)
    acc = s.begin(np.zeros(NUMEL, np.float32))
    for u in honest_round(rng, true):
        acc.add(Upd(u), 1)
    assert acc.screen.passed == 10 and acc.screen._held is None


# ------------------------------------------------------------------------------------------- persistence
def test_the_reference_survives_a_coordinator_restart(tmp_path: Path):
    rng = np.random.default_rng(6)
    true = rng.normal(size=NUMEL).astype(np.float32)
    s1 = warmed(None, rng, true)
    assert s1.limits.direction.vector is not None and "direction_ref" in s1.state()
    journal = RoundJournal(tmp_path)
    journal.save_strategy("job-r", 1, s1.state())
    s2 = make_strategy("fedavg", UpdateLimits.from_config(None))  # a fresh process builds the job's strategy
    load_strategy_state(SimpleNamespace(journal=journal), {"id": "job-r", "current_round": 1}, s2)
    np.testing.assert_array_equal(s2.limits.direction.vector, s1.limits.direction.vector)
    assert s2.limits.bound.bound == s1.limits.bound.bound
    honest = honest_round(rng, true, 8)
    attacked = honest + [-10.0 * honest[0], -10.0 * honest[1]]
    fresh = make_strategy("fedavg", UpdateLimits.from_config(None))  # what a restart without the state does
    fresh.limits.bound.bound = s1.limits.bound.bound
    np.testing.assert_array_equal(aggregate(s2, attacked), aggregate(s1, attacked))
    honest_mean = np.mean(honest, axis=0)  # without the state the round is unscreened, and the attack bites
    assert np.linalg.norm(aggregate(fresh, attacked) - honest_mean) > 0.4 * np.linalg.norm(honest_mean)


def test_a_job_without_the_screen_persists_no_reference():
    s = make_strategy("fedavg", UpdateLimits.from_config(CLIP_ONLY))
    aggregate(s, honest_round(np.random.default_rng(7), np.ones(NUMEL, np.float32)))
    assert "direction_ref" not in s.state() and s.limits.direction.vector is None
    s.load_state({"direction_ref": np.ones(NUMEL, np.float32)})
    assert s.limits.direction.vector is None


# -------------------------------------------------------------------------------------------------- spec
def test_direction_spec_defaults_and_errors():
    assert normalize_limits(None)["direction"] == {"mode": "cosine", "min_cosine": 0.0, "min_agree": 0.5,
                                                   "momentum": 0.5}
    assert normalize_direction({"mode": "none", "min_cosine": 0.3}) == {"mode": "none"}
    assert DirectionReference.from_config({"mode": "none"}).active is False
    for bad, match in [({"mode": "loud"}, "mode"), ({"min_cosine": 2}, "min_cosine"),
                       ({"min_agree": 0}, "min_agree"), ({"momentum": 1.0}, "momentum"),
                       ({"min_cosine": float("nan")}, "min_cosine"), ({"extra": 1}, "extra"), ([], "object")]:
        with pytest.raises(ValueError, match=match):
            normalize_direction(bad)
        with pytest.raises(JobSpecError, match="direction"):
            normalize_job({"name": "x", "model": {"arch": "small_cnn"}, "limits": {"direction": bad}})


def test_momentum_reference_blends_rounds():
    ref = DirectionReference(True, momentum=0.5)
    ref.set(np.array([2.0, 0.0]))
    ref.set(np.array([0.0, 2.0]))
    np.testing.assert_allclose(ref.vector, [1.0, 1.0])
    ref.set(np.array([np.inf, 0.0]))  # a non-finite round never becomes the reference
    np.testing.assert_allclose(ref.vector, [1.0, 1.0])
