"""Logit adjustment by the device's own label prior (``train.logit_adjust``): counts, offset, and its effect."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from edge_sdk.data import SampleBuffer, load_digits_split
from edge_sdk.label_prior import ABSENT_COUNT, label_counts, logit_offset
from edge_sdk.models import build_model
from edge_sdk.trainer import LocalTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Targets(Dataset):
    """An ImageFolder-like dataset: labels in ``targets``, images that must not be loaded to count them."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        raise AssertionError("counting labels must not load images")


class _Plain(Dataset):
    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.zeros(1, 4, 4), self.labels[i]


def test_label_counts_from_every_kind_of_dataset() -> None:
    y = torch.tensor([0, 0, 2, 2, 2, 3])
    tensors = TensorDataset(torch.zeros(6, 1, 4, 4), y)
    assert label_counts(tensors, 5).tolist() == [2, 0, 3, 1, 0]
    assert label_counts(Subset(tensors, [2, 3, 5]), 5).tolist() == [0, 0, 2, 1, 0]
    assert label_counts(_Targets([1, 1, 4]), 5).tolist() == [0, 2, 0, 0, 1]
    assert label_counts(Subset(_Targets([1, 1, 4]), [0, 2]), 5).tolist() == [0, 1, 0, 0, 1]
    assert label_counts(_Plain([3, 3, 0]), 4).tolist() == [1, 0, 0, 2]
    buf = SampleBuffer(capacity=8)
    for label in (1, 1, 0):
        buf.add(torch.zeros(1, 4, 4), label)
    assert label_counts(buf, 3).tolist() == [1, 2, 0]


def test_a_label_the_model_cannot_predict_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="labels span 0..7, the model has 5 classes"):
        label_counts(TensorDataset(torch.zeros(2, 1), torch.tensor([0, 7])), 5)


def test_offset_is_tau_log_prior_and_absent_classes_are_masked_not_infinite() -> None:
    counts = torch.tensor([30.0, 10.0, 0.0])
    off = logit_offset(counts, 1.0)
    total = 40.0 + ABSENT_COUNT
    torch.testing.assert_close(off, torch.log(torch.tensor([30.0, 10.0, ABSENT_COUNT]) / total))
    assert torch.isfinite(off).all() and off[2] < off[1] - 5  # absent: far below, still finite
    torch.testing.assert_close(logit_offset(counts, 0.5), 0.5 * off)


def test_config_range() -> None:
    assert TrainConfig.coerce({}).logit_adjust == 0.0
    assert TrainConfig.coerce({"logit_adjust": 1.0}).logit_adjust == 1.0
    for bad in (-0.1, 11.0, float("nan")):
        with pytest.raises(ValueError):
            TrainConfig.coerce({"logit_adjust": bad})


def test_adjusted_training_leaves_the_classes_a_device_never_saw_alone() -> None:
    """The point of the option: a device with only classes 0-4 does not learn "5-9 never happen".

    Without adjustment, local training drives the head's bias for the absent classes down (that bias is what
    averaging then spreads to every device); with it, they stay near where the global model had them."""
    train, _ = load_digits_split(seed=0)
    x, y = train.tensors
    keep = (y < 5).nonzero().flatten()[:400]
    shard = TensorDataset(x[keep], y[keep])
    drop = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, 1)
        before = model.classifier[-1].bias.detach().clone()
        res = LocalTrainer("cpu").train(model, shard, {"epochs": 2, "batch_size": 32, "lr": 0.05, "logit_adjust": tau})
        after = model.classifier[-1].bias.detach()
        drop[tau] = float((before[5:] - after[5:]).mean() - (before[:5] - after[:5]).mean())
        assert res.accuracy > 0.5  # both still learn the local classes
    assert drop[0.0] > 0.05 and drop[1.0] < 0.25 * drop[0.0], drop


def test_job_field_default_range_and_what_devices_are_told() -> None:
    from coordinator.rounds.jobspec import JobSpecError, normalize_job
    from coordinator.rounds.strategy import FedAvg

    job = normalize_job({"model": {"arch": "small_cnn"}})
    assert job["train"]["logit_adjust"] == 1.0  # new jobs adjust by default
    assert normalize_job({"model": {"arch": "small_cnn"}, "train": {"logit_adjust": 0}})["train"]["logit_adjust"] == 0
    for bad, reason in ((-1, ">= 0.0"), (11, "<= 10.0"), ("x", "must be a number")):
        with pytest.raises(JobSpecError, match=reason):
            normalize_job({"model": {"arch": "small_cnn"}, "train": {"logit_adjust": bad}})
    assert FedAvg().configure_round({"config": job}, 1, ["a"])["logit_adjust"] == 1.0
    # a job stored before the field existed (or set to 0) sends no key: its devices train exactly as before
    old = {**job, "train": {k: v for k, v in job["train"].items() if k != "logit_adjust"}}
    assert "logit_adjust" not in FedAvg().configure_round({"config": old}, 1, ["a"])
    off = {**job, "train": {**job["train"], "logit_adjust": 0.0}}
    assert "logit_adjust" not in FedAvg().configure_round({"config": off}, 1, ["a"])


def test_cli_flag_reaches_the_job_body() -> None:
    from coordinator.cli import main as cli

    body = cli.job_body(cli.build_parser().parse_args(["job", "create", "--logit-adjust", "0.5"]))
    assert body["train"]["logit_adjust"] == 0.5
    assert "logit_adjust" not in cli.job_body(cli.build_parser().parse_args(["job", "create"]))["train"]
