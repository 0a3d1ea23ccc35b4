"""ONNX export: one self-contained file, dynamic batch, metadata for devices, parity with PyTorch."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from converters.onnx_export import ExportError, ParityError, check_parity, export_model_file, export_onnx_bytes
from edge_sdk.models import build_model
from edge_sdk.params import load_arrays, state_to_arrays
from edge_sdk.protocol.modelfile import dump_model, load_model

DIGITS_JOB = {"id": "job-digits", "config": {"eval": {"dataset": "digits"}, "input_scale": 16.0}}


def _calibrate_bn(model: torch.nn.Module, shape: tuple[int, int, int], batches: int = 4) -> None:
    """Random-init nets have BN running stats far from their activations, so eval logits collapse to ~0 and
    parity would be trivially true; estimate real running stats (cumulative average) from random inputs."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((8, *shape), generator=gen))
    model.eval()


def _model_file(arch: str, channels: int, size: int, *, round_: int = 2, calibrate: bool = True) -> bytes:
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=channels)
    if calibrate:
        _calibrate_bn(model, (channels, size, size))
    meta = {"arch": arch, "num_classes": 10, "in_channels": channels, "image_size": size,
            "normalization": {"mean": [0.5], "std": [0.5]}, "class_names": [f"c{i}" for i in range(10)],
            "job_id": "job-digits", "round": round_}
    return dump_model(state_to_arrays(model), meta)


def _torch_model(model_bytes: bytes) -> torch.nn.Module:
    arrays, meta = load_model(model_bytes)
    model = build_model(meta["arch"], meta["num_classes"], in_channels=meta["in_channels"])
    load_arrays(model, arrays)
    return model.eval()


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def small_cnn_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict, Path]:
    data = _model_file("small_cnn", 1, 8)
    out = tmp_path_factory.mktemp("onnx")
    return data, export_model_file(data, DIGITS_JOB, out), out


@pytest.mark.parametrize("arch,channels,size", [("small_cnn", 1, 8), ("mobilenet_v3_small", 3, 32)])
def test_onnxruntime_matches_pytorch(tmp_path: Path, arch: str, channels: int, size: int) -> None:
    data = _model_file(arch, channels, size)
    report = export_model_file(data, DIGITS_JOB, tmp_path)
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((4, channels, size, size)).astype(np.float32)
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        expected = _torch_model(data)(torch.from_numpy(x)).numpy()
    assert np.abs(expected).max() > 1e-2, "logits collapsed: the parity check would prove nothing"
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    assert 0 <= report["max_abs_diff"] <= report["parity"]["tolerance"]
    assert report["parity"]["batches"] == [1, 3]


def test_single_self_contained_file_named_by_version(small_cnn_export: tuple[bytes, dict, Path]) -> None:
    data, report, out = small_cnn_export
    version = hashlib.sha256(data).hexdigest()
    assert report["version"] == version
    assert sorted(p.name for p in out.iterdir()) == [f"{version}.onnx", f"{version}.onnx.json"]
    model = onnx.load(report["path"], load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert report["opset"] == 17 and model.opset_import[0].version == 17
    on_disk = json.loads(Path(report["report_path"]).read_text())
    assert on_disk["onnx_sha256"] == hashlib.sha256(Path(report["path"]).read_bytes()).hexdigest()


def test_dynamic_batch_axis(small_cnn_export: tuple[bytes, dict, Path]) -> None:
    _, report, _ = small_cnn_export
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]
    for batch in (1, 2, 7, 64):
        out = session.run(None, {"input": np.zeros((batch, 1, 8, 8), np.float32)})[0]
        assert out.shape == (batch, 10)


def test_metadata_for_devices(small_cnn_export: tuple[bytes, dict, Path]) -> None:
    data, report, _ = small_cnn_export
    props = _props(Path(report["path"]))
    assert props["fedsight.input_size"] == "8"
    assert props["fedsight.in_channels"] == "1"
    assert json.loads(props["fedsight.mean"]) == [0.5] and json.loads(props["fedsight.std"]) == [0.5]
    assert json.loads(props["fedsight.class_names"]) == [f"c{i}" for i in range(10)]
    assert props["fedsight.input_scale"] == "16"  # the job's field (digits pixels are 0..16)
    assert props["fedsight.version"] == hashlib.sha256(data).hexdigest()
    assert props["fedsight.job_id"] == "job-digits" and props["fedsight.round"] == "2"
    assert float(props["fedsight.max_abs_diff"]) == pytest.approx(report["max_abs_diff"], rel=1e-3, abs=1e-12)
    assert props["fedsight.exported_at"].startswith("20")


def test_input_scale_defaults_to_255_and_channels_expand(tmp_path: Path) -> None:
    data = _model_file("small_cnn", 3, 16, calibrate=False)
    job = {"id": "j", "config": {"eval": None, "normalization": {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}}}
    onnx_bytes, _ = export_onnx_bytes(data, job)
    props = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    assert props["fedsight.input_scale"] == "255"
    # the model file's normalisation is authoritative; a 1-value list is expanded per channel
    assert json.loads(props["fedsight.mean"]) == [0.5, 0.5, 0.5]


def test_input_scale_comes_from_the_model_file_never_from_the_eval_set(tmp_path: Path) -> None:
    """A 5-class photo job once got input_scale 16 because its (digits) eval set said so."""
    arrays, meta = load_model(_model_file("small_cnn", 3, 16, calibrate=False))
    photo = dump_model(arrays, {**meta, "input_scale": 255.0, "dataset": "digits"})
    job = {"id": "j", "config": {"eval": {"dataset": "digits"}, "input_scale": 16.0}}
    onnx_bytes, _ = export_onnx_bytes(photo, job)
    props = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    assert props["fedsight.input_scale"] == "255"  # the model file is authoritative
    with pytest.raises(ExportError, match="input_scale must be a positive"):
        export_onnx_bytes(dump_model(arrays, {**meta, "input_scale": -1}), None)


def test_export_is_idempotent_and_repairs_tampering(small_cnn_export: tuple[bytes, dict, Path]) -> None:
    data, report, out = small_cnn_export
    again = export_model_file(data, DIGITS_JOB, out)
    assert again["exported_at"] == report["exported_at"]  # cached, not re-exported
    Path(report["path"]).write_bytes(b"garbage")
    repaired = export_model_file(data, DIGITS_JOB, out)
    assert hashlib.sha256(Path(repaired["path"]).read_bytes()).hexdigest() == repaired["onnx_sha256"]
    onnx.checker.check_model(onnx.load(repaired["path"]))


@pytest.mark.parametrize("mangle,needle", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"", "empty"),
])
def test_corrupt_model_bytes_give_clear_error(tmp_path: Path, mangle, needle: str) -> None:
    data = _model_file("small_cnn", 1, 8, calibrate=False)
    with pytest.raises(ExportError, match=needle) as info:
        export_model_file(mangle(data), DIGITS_JOB, tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_weights_that_do_not_fit_the_arch(tmp_path: Path) -> None:
    arrays = state_to_arrays(build_model("small_cnn", 10, in_channels=1))
    bad = dump_model(arrays, {"arch": "small_cnn", "num_classes": 5, "in_channels": 1, "image_size": 8})
    with pytest.raises(ExportError, match="do not fit 'small_cnn'"):
        export_model_file(bad, None, tmp_path)
    no_size = dump_model(arrays, {"arch": "small_cnn", "num_classes": 10, "in_channels": 1})
    with pytest.raises(ExportError, match="image_size"):
        export_model_file(no_size, None, tmp_path)


def test_parity_check_catches_a_wrong_graph() -> None:
    exported, _ = export_onnx_bytes(_model_file("small_cnn", 1, 8))
    other = _torch_model(_model_file("small_cnn", 1, 8, round_=3))
    with torch.no_grad():  # different weights: the ONNX graph no longer computes this model
        for p in other.parameters():
            p.add_(0.5)
    with pytest.raises(ParityError, match="differ by"):
        check_parity(other, exported, (1, 8, 8))


def test_dynamo_fallback_still_embeds_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the TorchScript exporter goes away, the dynamo path must still give devices one file."""
    real_export = torch.onnx.export

    def legacy_removed(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("legacy exporter removed")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_removed)
    data, report = export_onnx_bytes(_model_file("small_cnn", 1, 8))
    assert report["exporter"] == "dynamo" and report["opset"] >= 18
    model = onnx.load_from_string(data)
    assert model.graph.initializer and all(t.data_location != onnx.TensorProto.EXTERNAL
                                           for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert report["max_abs_diff"] <= report["parity"]["tolerance"]
