"""BatchNorm running statistics after federated training from random init: eval mode and ONNX must work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from converters.onnx_export import export_onnx_bytes
from edge_sdk import params
from edge_sdk.bn_stats import recalibrate_batchnorm, training_batchnorms
from edge_sdk.models import build_model
from edge_sdk.protocol.modelfile import dump_model
from edge_sdk.trainer import LocalTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def colour_classes(n: int, classes: int = 4, size: int = 32, seed: int = 0) -> TensorDataset:
    """Each class is a colour (plus noise), far from the (0, 1) statistics a fresh BatchNorm starts with."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    palette = torch.tensor([[2.0, -1.0, 0.5], [-1.5, 2.0, 1.0], [0.5, 0.5, -2.0], [2.5, 2.5, 2.5]])[:classes]
    x = palette[y][:, :, None, None] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, y)


def _bn(model: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_local_training_leaves_the_exact_statistics_of_the_local_data() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    data = colour_classes(200)
    LocalTrainer("cpu").train(model, data, {"epochs": 1, "batch_size": 32, "lr": 0.05})
    bn = _bn(model)
    with torch.no_grad():
        feats = model.features[0](data.tensors[0])  # the conv feeding the first BatchNorm
    expected_mean = feats.mean(dim=(0, 2, 3))
    expected_var = feats.var(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected_mean, rtol=1e-3, atol=1e-4)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-3, atol=1e-4)
    assert bn.momentum == 0.1  # restored after the cumulative pass


def test_without_recalibration_torchvision_momentum_leaves_stale_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 4, 3)
    data = colour_classes(200)
    LocalTrainer("cpu").train(model, data, {"epochs": 1, "batch_size": 32, "lr": 0.05, "bn_recalibrate": False})
    with torch.no_grad():
        feats = model.features[0][0](data.tensors[0])
    bn = model.features[0][1]
    assert bn.momentum == 0.01
    # 7 steps at momentum 0.01 move the running mean ~7 % of the way: far from the data
    assert not torch.allclose(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("recalibrate", [True, False])
def test_mobilenet_from_random_init_through_the_update_path_works_in_eval_mode_and_onnx(recalibrate: bool) -> None:
    """Device trains from random init, its delta goes through the codec and FedAvg, the result is exported."""
    from coordinator.rounds.strategy import FedAvg
    from edge_sdk.protocol import codecs
    from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
    from edge_sdk.update import encode_delta, statistics_mask

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 4, 3)
    data = colour_classes(256)
    x, labels = data.tensors
    template = params.state_to_arrays(model)
    spec = codecs.validate_spec({"name": "dense", "dtype": "float32"})
    global_vec = flatten(template)
    for rnd in range(2):
        params.load_arrays(model, unflatten(global_vec, template))
        LocalTrainer("cpu").train(model, data, {"epochs": 1, "batch_size": 32, "lr": 0.01, "seed": rnd,
                                                "bn_recalibrate": recalibrate})
        delta = flatten(params.state_to_arrays(model)) - global_vec
        _payload, sent = encode_delta(spec, delta, layout_sizes(template), None, "j", statistics_mask(template))
        acc = FedAvg().begin(global_vec)
        acc.add(sent, len(data))
        global_vec = acc.finalize()
    state = unflatten(global_vec, template)
    params.load_arrays(model, state)
    with torch.no_grad():
        batch_pred = model.train()(x).argmax(1)  # batch statistics: what the weights can do
        eval_pred = model.eval()(x).argmax(1)
    meta = {"arch": "mobilenet_v3_small", "num_classes": 4, "in_channels": 3, "image_size": 32, "job_id": "j",
            "round": 2, "normalization": {"mean": [0.0], "std": [1.0]}, "class_names": list("abcd")}
    onnx_bytes, _report = export_onnx_bytes(dump_model(state, meta))
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_pred = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    batch_acc = float((batch_pred == labels).float().mean())
    eval_acc = float((eval_pred == labels).float().mean())
    assert batch_acc >= 0.9  # the weights are good either way
    assert float(np.mean(onnx_pred == eval_pred.numpy())) >= 0.99  # ONNX is the eval-mode model
    if recalibrate:
        assert eval_acc >= batch_acc - 0.05 and len(set(eval_pred.tolist())) == 4, (eval_acc, batch_acc)
    else:  # the failure the fix removes: statistics still near (0, 1), one class (or nearly) for every image
        assert eval_acc <= 0.5, eval_acc


def test_frozen_layers_keep_their_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    before = _bn(model).running_mean.clone()
    LocalTrainer("cpu").train(model, colour_classes(96), {"epochs": 1, "freeze_backbone": True})
    assert torch.equal(_bn(model).running_mean, before)


def test_no_batches_leave_statistics_untouched() -> None:
    model = build_model("small_cnn", 4, 3).train()
    norms = training_batchnorms(model)
    for m in norms:
        m.running_mean.fill_(0.25)
    assert recalibrate_batchnorm(model, norms, [torch.zeros(1, 3, 8, 8)]) == 0  # single samples are skipped
    assert all(torch.all(m.running_mean == 0.25) for m in norms)
    assert training_batchnorms(model.eval()) == []


def test_aggregated_negative_variances_are_clamped() -> None:
    """int8 blocks can carry a variance delta of about -var slightly too far: the model would output NaN."""
    from edge_sdk.update import clamp_variances

    arrays = {"bn.running_mean": np.array([-0.5, 0.2], np.float32),
              "bn.running_var": np.array([-1e-3, 2.0], np.float32),
              "bn.num_batches_tracked": np.array(3, np.int64), "fc.weight": np.array([-1.0], np.float32)}
    assert clamp_variances(arrays) == 1
    assert arrays["bn.running_var"].tolist() == [0.0, 2.0] and arrays["bn.running_var"].dtype == np.float32
    assert arrays["bn.running_mean"].tolist() == [-0.5, pytest.approx(0.2)] and arrays["fc.weight"].tolist() == [-1.0]
    assert clamp_variances(arrays) == 0
