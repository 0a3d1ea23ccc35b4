"""encode_delta: error feedback on parameters, never on BatchNorm running statistics."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_sdk.error_feedback import ResidualStore
from edge_sdk.update import encode_delta, statistics_mask

ARRAYS = {"conv.weight": np.zeros((8, 4), np.float32), "bn.running_mean": np.zeros(4, np.float32),
          "bn.running_var": np.ones(4, np.float32), "bn.num_batches_tracked": np.array(1, np.int64),
          "fc.weight": np.zeros(20, np.float32)}
SIZES = [32, 4, 4, 20]
SPEC = {"name": "topk", "density": 0.1, "values": "float32", "error_feedback": True}


def test_statistics_mask_marks_running_stats_only() -> None:
    mask = statistics_mask(ARRAYS)
    assert mask.size == 60 and mask[32:40].all() and not mask[:32].any() and not mask[40:].any()


def test_feedback_accounts_for_parameters_but_not_statistics(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    mask = statistics_mask(ARRAYS)
    rng = np.random.default_rng(1)
    total_true, total_sent = np.zeros(60), np.zeros(60)
    for _ in range(6):
        delta = rng.standard_normal(60).astype(np.float32)
        delta[mask] = -5.0  # large statistics changes that top-k will partly leave out
        _, sent = encode_delta(SPEC, delta, SIZES, store, "job", mask)
        total_true += delta
        total_sent += sent.to_dense(60)
    residual = store.load("job", 60)
    # parameters: sent + residual == everything that was meant to be sent
    np.testing.assert_allclose((total_sent + residual)[~mask], total_true[~mask], atol=1e-4)
    # statistics: never more than one round's worth is sent, however much was left out before
    assert (total_sent[mask] >= -5.0 * 6 - 1e-4).all() and (np.abs(total_sent[mask]) <= 5.0 * 6).all()
    again = rng.standard_normal(60).astype(np.float32)
    _, sent = encode_delta(SPEC, again, SIZES, store, "job", mask)
    stats_sent = sent.to_dense(60)[mask]
    assert np.all((stats_sent == 0) | np.isclose(stats_sent, again[mask]))


def test_without_feedback_nothing_is_stored(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    spec = {**SPEC, "error_feedback": False}
    encode_delta(spec, np.ones(60, np.float32), SIZES, store, "job", statistics_mask(ARRAYS))
    assert not list(tmp_path.glob("*.npy"))
