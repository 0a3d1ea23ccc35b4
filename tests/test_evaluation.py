"""Server-side evaluation reuses one built network per architecture: each round's weights must fully replace
the last round's, so a reused network scores exactly like a freshly built one."""
from __future__ import annotations

import torch

from coordinator.rounds.evaluation import Evaluator
from coordinator.rounds.jobspec import initial_model, normalize_job
from edge_sdk.protocol.modelfile import dump_model, load_model


def _config() -> dict:
    return normalize_job({"name": "e", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1,
                                                 "image_size": 8}, "eval": {"dataset": "digits"}})


def test_reused_network_scores_each_version_like_a_fresh_one() -> None:
    cfg = _config()
    first = initial_model("job-a", cfg)
    arrays, meta = load_model(first)
    torch.manual_seed(1)
    other = dump_model({k: (v + 0.5 * torch.randn(v.shape).numpy().astype(v.dtype)
                            if v.dtype.kind == "f" and "running" not in k else v)
                        for k, v in arrays.items()}, meta)
    shared = Evaluator()
    a1, b1 = shared.evaluate(first, cfg), shared.evaluate(other, cfg)
    a2 = shared.evaluate(first, cfg)  # back to the first weights on the same network
    assert len(shared._models) == 1
    assert a1 == a2 == Evaluator().evaluate(first, cfg)
    assert b1 == Evaluator().evaluate(other, cfg)
    assert a1 != b1
