from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from edge_sdk.data import SampleBuffer, load_digits_split
from edge_sdk.models import backbone_and_head, build_model
from edge_sdk.trainer import LocalTrainer, TrainConfig, TrainResult, resolve_device


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    return load_digits_split(seed=0)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, 1)


def _distance(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach().cpu() - b[n]).pow(2).sum()) for n, p in a.named_parameters()))


def test_small_cnn_learns_digits(digits) -> None:
    train, test = digits
    model = _model()
    trainer = LocalTrainer(device="cpu")
    res = trainer.train(model, train, {"epochs": 3, "batch_size": 32, "lr": 0.05, "codec": {"name": "dense"}})
    assert isinstance(res, TrainResult)
    assert res.num_samples == len(train) and res.device == "cpu"
    assert res.steps == 3 * math.ceil(len(train) / 32)
    assert res.accuracy > 0.9 and 0 < res.loss < 0.5 and res.wall_time_s > 0
    ev = trainer.evaluate(model, test)
    assert ev["accuracy"] >= 0.90, ev
    assert ev["num_samples"] == len(test)


def test_same_seed_same_weights_and_seed_changes_the_order(digits) -> None:
    data = Subset(digits[0], range(300))
    runs = []
    for seed in (7, 7, 8):
        model = _model()
        LocalTrainer("cpu").train(model, data, TrainConfig(epochs=1, batch_size=32, seed=seed))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["classifier.2.weight"], runs[2]["classifier.2.weight"])


def test_frozen_backbone_keeps_weights_and_bn_stats_while_head_trains(digits) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    backbone, head = backbone_and_head(model)
    LocalTrainer("cpu").train(model, Subset(digits[0], range(256)), {"epochs": 2, "freeze_backbone": True})
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.2.weight", "classifier.2.bias"}  # BN running stats included
    assert all(p.requires_grad for p in backbone + head)  # flags restored
    assert model.training

    control = _model()
    LocalTrainer("cpu").train(control, Subset(digits[0], range(256)), {"epochs": 1})
    assert not torch.equal(control.state_dict()["features.1.running_mean"], before["features.1.running_mean"])


def test_fedprox_keeps_weights_closer_to_the_global_model(digits) -> None:
    data = Subset(digits[0], range(512))
    init = {n: p.detach().clone() for n, p in _model().named_parameters()}
    dist = {}
    for mu in (0.0, 5.0):
        model = _model()
        LocalTrainer("cpu").train(model, data, {"epochs": 2, "batch_size": 32, "lr": 0.05, "mu": mu})
        dist[mu] = _distance(model, init)
    assert dist[5.0] < 0.7 * dist[0.0], dist


def test_prox_gradient_is_mu_times_distance_to_anchor() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([0.5, 0.5, 0.5])
    anchor = torch.tensor([0.0, 0.0, 1.0])
    LocalTrainer._prox([p], [anchor], mu=0.1)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.3, 0.7]))


class _ListDataset(Dataset):
    """A dataset that is not a TensorDataset: exercises the DataLoader path."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i]


def test_generic_dataset_and_sample_buffer_train(digits) -> None:
    x, y = digits[0].tensors
    res = LocalTrainer("cpu").train(_model(), _ListDataset(TensorDataset(x[:65], y[:65])), {"batch_size": 32})
    assert res.num_samples == 65 and res.steps == 2  # trailing batch of 1 skipped (BatchNorm)
    buf = SampleBuffer(capacity=50)
    for img, label in zip(x[:40], y[:40]):
        buf.add(img, int(label))
    res = LocalTrainer("cpu").train(_model(), buf, {"batch_size": 16})
    assert res.num_samples == 40 and res.steps == 3


def test_config_validation_and_defaults() -> None:
    cfg = TrainConfig.coerce({"epochs": 2, "lr": 0.1, "codec": {"name": "topk"}, "mu": None})
    assert (cfg.epochs, cfg.lr, cfg.mu, cfg.batch_size) == (2, 0.1, 0.0, 32)
    with pytest.raises(ValueError):
        TrainConfig.coerce({"epochs": 0})
    with pytest.raises(ValueError):
        TrainConfig.coerce({"mu": -1})


def test_device_resolution_and_evaluate_restores_mode(digits) -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type in {"cuda", "mps", "cpu"}
    trainer = LocalTrainer("cpu")
    assert not trainer.amp and not trainer.channels_last  # CUDA-only features off on CPU
    model = _model().train()
    out = trainer.evaluate(model, Subset(digits[1], range(33)), batch_size=16)
    assert out["num_samples"] == 33 and 0 <= out["accuracy"] <= 1
    assert model.training
