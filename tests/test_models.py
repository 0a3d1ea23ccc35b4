from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_sdk.models import (
    ARCHS,
    WeightsMismatchError,
    backbone_and_head,
    build_model,
    count_parameters,
    head_module,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_requested_head_and_input_channels(arch: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_and_head_partition_all_parameters(arch: str) -> None:
    model = build_model(arch, num_classes=7, in_channels=3)
    backbone, head = backbone_and_head(model)
    assert backbone and head
    ids = [id(p) for p in backbone + head]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(set(ids)) == len(ids)
    head_ids = {id(p) for p in head_module(model).parameters()}
    assert head_ids == {id(p) for p in head}
    # the last Linear (the classifier proper) is part of the head
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert id(last_linear.weight) in head_ids and last_linear.out_features == 7


def test_small_cnn_is_tiny_and_handles_8px_and_larger_inputs() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    assert 20_000 <= count_parameters(model) <= 60_000
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        assert model(torch.randn(3, 1, 64, 48)).shape == (3, 10)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_model("vgg99", num_classes=3)
    for name in ARCHS:
        assert name in str(err.value)


def test_models_are_randomly_initialised_not_pretrained() -> None:
    torch.manual_seed(1)
    a = build_model("resnet18", 7).state_dict()
    torch.manual_seed(2)
    b = build_model("resnet18", 7).state_dict()
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


def _save(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_weights_file_round_trips(tmp_path: Path) -> None:
    src = build_model("small_cnn", 10, 1)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    loaded = build_model("small_cnn", 10, 1, weights=_save(src, tmp_path / "w.pt"))
    for (k, v), (k2, v2) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_weights_with_other_num_classes_reinitialise_only_the_head(tmp_path: Path, caplog) -> None:
    src = build_model("small_cnn", 10, 1)
    path = _save(src, tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING, logger="edge_sdk.models"):
        model = build_model("small_cnn", 5, 1, weights=path)
    assert "classifier.2.weight" in caplog.text
    state, ref = model.state_dict(), src.state_dict()
    assert state["classifier.2.weight"].shape == (5, 256)
    assert torch.equal(state["features.0.weight"], ref["features.0.weight"])
    assert torch.equal(state["features.8.running_var"], ref["features.8.running_var"])
    with pytest.raises(WeightsMismatchError, match="num_classes"):
        build_model("small_cnn", 5, 1, weights=path, strict_head=True)


def test_weights_from_another_architecture_give_a_clear_error(tmp_path: Path) -> None:
    path = _save(build_model("shufflenet_v2_x1_0", 10, 3), tmp_path / "w.pt")
    with pytest.raises(WeightsMismatchError, match="architecture"):
        build_model("small_cnn", 10, 3, weights=path)
    with pytest.raises(FileNotFoundError):
        build_model("small_cnn", 10, 3, weights=tmp_path / "missing.pt")


def test_rgb_weights_adapt_to_one_channel_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = build_model("small_cnn", 10, 3).eval()
    grey = build_model("small_cnn", 10, 1, weights=_save(rgb, tmp_path / "w.pt")).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
