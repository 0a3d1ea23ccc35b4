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


def test_channels_last_evaluation_matches_a_plain_forward_pass() -> None:
    """The evaluator runs its network in channels_last (faster on CPU); the scores must be those of the model
    run the ordinary way, on the same test set."""
    import torch.nn.functional as F

    from edge_sdk.data import load_digits_split
    from edge_sdk.models import build_model
    from edge_sdk.params import load_arrays
    from edge_sdk.preprocess import Preprocessing

    cfg = normalize_job({"name": "e", "model": {"arch": "mobilenet_v3_small", "num_classes": 10, "in_channels": 3,
                                                "image_size": 16}, "eval": {"dataset": "digits"}})
    data = initial_model("job-b", cfg)
    arrays, meta = load_model(data)
    got = Evaluator().evaluate(data, cfg)
    plain = build_model("mobilenet_v3_small", 10, 3)
    load_arrays(plain, arrays)
    plain.eval()
    x, y = load_digits_split(preprocessing=Preprocessing.from_meta(meta))[1].tensors
    with torch.inference_mode():
        out = plain(x)
    assert got["num_samples"] == len(y)
    assert got["accuracy"] == int((out.argmax(1) == y).sum()) / len(y)
    assert abs(got["loss"] - float(F.cross_entropy(out, y))) < 1e-4
