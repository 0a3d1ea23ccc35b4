"""``train.max_steps``: devices stop a round after N SGD steps (shorter rounds at the same total epochs)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from edge_sdk.data import load_digits_split
from edge_sdk.models import build_model
from edge_sdk.trainer import LocalTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shard() -> Subset:
    train, _ = load_digits_split(seed=0)
    return Subset(train, range(300))  # 10 batches of 32 (the last one 12)


def _train(data: Subset | TensorDataset, **cfg: object) -> tuple[dict[str, torch.Tensor], int, int]:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    res = LocalTrainer("cpu").train(model, data, {"batch_size": 32, "lr": 0.05, "seed": 3, **cfg})
    return model.state_dict(), res.steps, res.num_samples


def test_round_stops_after_max_steps_inside_and_across_epochs(shard) -> None:
    per_epoch = math.ceil(len(shard) / 32)
    _, steps, n = _train(shard, epochs=1, max_steps=4)
    assert steps == 4
    assert n == len(shard)  # the FedAvg weight is still the device's sample count
    _, steps, _ = _train(shard, epochs=3, max_steps=per_epoch + 2)
    assert steps == per_epoch + 2  # runs into the second epoch, stops there
    _, steps, _ = _train(shard, epochs=2, max_steps=10_000)
    assert steps == 2 * per_epoch  # epochs still bound the round


def test_a_cap_of_one_epoch_trains_exactly_like_one_epoch(shard) -> None:
    """The cap changes where a round stops, never the order or the updates before that point."""
    per_epoch = math.ceil(len(shard) / 32)
    capped, _, _ = _train(shard, epochs=5, max_steps=per_epoch)
    plain, _, _ = _train(shard, epochs=1)
    short, _, _ = _train(shard, epochs=1, max_steps=per_epoch - 3)
    assert all(torch.equal(capped[k], plain[k]) for k in plain)
    assert not torch.equal(short["classifier.2.weight"], plain["classifier.2.weight"])


def test_config_rejects_a_negative_cap() -> None:
    assert TrainConfig.coerce({}).max_steps == 0
    with pytest.raises(ValueError, match="invalid train config"):
        TrainConfig.coerce({"max_steps": -1})


def test_job_field_range_and_task_key_only_when_set() -> None:
    from coordinator.rounds.jobspec import JobSpecError, normalize_job
    from coordinator.rounds.strategy import FedAvg

    job = normalize_job({"model": {"arch": "small_cnn"}})
    assert job["train"]["max_steps"] == 0
    assert "max_steps" not in FedAvg().configure_round({"config": job}, 1, ["a"])  # stored jobs: unchanged tasks
    capped = normalize_job({"model": {"arch": "small_cnn"}, "train": {"max_steps": 8}})
    assert FedAvg().configure_round({"config": capped}, 1, ["a"])["max_steps"] == 8
    for bad, reason in ((-1, ">= 0"), (1.5, "integer"), ("8", "integer")):
        with pytest.raises(JobSpecError, match=reason):
            normalize_job({"model": {"arch": "small_cnn"}, "train": {"max_steps": bad}})


def test_cli_flag_reaches_the_job_body() -> None:
    from coordinator.cli import main as cli

    body = cli.job_body(cli.build_parser().parse_args(["job", "create", "--max-steps", "8"]))
    assert body["train"]["max_steps"] == 8
    assert "max_steps" not in cli.job_body(cli.build_parser().parse_args(["job", "create"]))["train"]
