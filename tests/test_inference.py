from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.inference import OnnxClassifier, Prediction, resize_chw

ROOT = Path(__file__).resolve().parent.parent


def _linear_onnx(weight: np.ndarray, size: int, channels: int, meta: dict[str, str] | None = None,
                 batch: int | str = "N") -> bytes:
    """A 'Flatten -> Gemm' classifier built with onnx.helper only (no torch)."""
    k = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, k])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.zeros(k, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


META = {
    "fedsight.input_size": "4", "fedsight.in_channels": "1", "fedsight.mean": json.dumps([0.5]),
    "fedsight.std": json.dumps([0.25]), "fedsight.class_names": json.dumps(["zero", "one", "two"]),
    "fedsight.version": "v1", "fedsight.job_id": "job-a", "fedsight.round": "3", "fedsight.input_scale": "255",
}


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 16)).astype(np.float32)


def _reference(images: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Metadata preprocessing done by hand with torch, then the linear layer and softmax."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    x = ((x - 0.5) / 0.25).reshape(len(images), -1).numpy()
    logits = x @ weight.T
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_importing_inference_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "import edge_sdk.inference as inf\n"
        "assert 'torch' not in sys.modules, 'torch imported by edge_sdk.inference'\n"
        "from edge_sdk import OnnxClassifier\n"
        "assert 'torch' not in sys.modules, 'torch imported by the edge_sdk package'\n"
        "from edge_sdk import LiveModel\n"
        "assert 'torch' not in sys.modules, 'torch imported by edge_sdk.live_model'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_metadata_drives_preprocessing_and_softmax() -> None:
    w = _weights()
    clf = OnnxClassifier(_linear_onnx(w, 4, 1, META))
    assert (clf.version, clf.job_id, clf.round) == ("v1", "job-a", 3)
    assert clf.class_names == ["zero", "one", "two"] and clf.input_size == (4, 4) and clf.in_channels == 1
    images = np.random.default_rng(1).integers(0, 256, size=(5, 9, 7), dtype=np.uint8)
    preds = clf.predict(list(images))
    ref = _reference(images, w)
    assert len(preds) == 5 and all(isinstance(p, Prediction) for p in preds)
    for p, r in zip(preds, ref):
        np.testing.assert_allclose(p.probs, r, rtol=1e-4, atol=1e-6)
        assert p.label == int(r.argmax()) and p.name == ["zero", "one", "two"][p.label]
        assert p.probability == pytest.approx(float(r.max()), rel=1e-4)
        assert p.probs.sum() == pytest.approx(1.0, abs=1e-5)
    # RGB frames are converted to one channel; an NHWC batch is a batch; a preprocessed NCHW batch is used as is
    rgb = np.repeat(images[..., None], 3, axis=-1)
    np.testing.assert_allclose(np.stack([p.probs for p in clf.predict(rgb)]), ref, rtol=1e-3, atol=1e-5)
    tensor = clf.preprocess(list(images))
    assert tensor.shape == (5, 1, 4, 4) and tensor.dtype == np.float32
    np.testing.assert_allclose(np.stack([p.probs for p in clf.predict_tensor(tensor)]), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.stack([p.probs for p in clf.predict(tensor)]), ref, rtol=1e-4, atol=1e-6)


def test_file_paths_and_fixed_batch_models(tmp_path: Path) -> None:
    from PIL import Image

    w = _weights()
    img = np.random.default_rng(2).integers(0, 256, size=(12, 12), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(_linear_onnx(w, 4, 1, META, batch=1))
    clf = OnnxClassifier(model_path, intra_op_threads=1)
    from_file = clf.predict(tmp_path / "x.png")
    from_array = clf.predict([img, img])  # fixed batch of 1: run per image
    assert len(from_file) == 1 and len(from_array) == 2
    np.testing.assert_allclose(from_file[0].probs, from_array[1].probs, rtol=1e-6)
    np.testing.assert_allclose(from_file[0].probs, _reference(img[None], w)[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_without_metadata_size_comes_from_the_input_shape() -> None:
    clf = OnnxClassifier(_linear_onnx(_weights(), 4, 1))
    assert clf.version is None and clf.input_size == (4, 4) and clf.class_names == []
    pred = clf.predict(np.full((4, 4), 255, np.uint8))[0]
    expected = _weights().sum(1)  # x = 1.0 everywhere, no normalisation
    assert pred.label == int(expected.argmax()) and pred.name == str(pred.label)


def test_numpy_resize_matches_torch_antialiased_bilinear() -> None:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(8, 8, 32, 32), (8, 8, 13, 5), (96, 128, 16, 16), (37, 23, 10, 50)]:
        x = rng.random((3, h, w), dtype=np.float32)
        ref = F.interpolate(torch.from_numpy(x)[None], size=(oh, ow), mode="bilinear",
                            align_corners=False, antialias=True)[0].numpy()
        np.testing.assert_allclose(resize_chw(x, (oh, ow)), ref, atol=1e-5)


def test_sample_buffer_and_classifier_preprocess_frames_identically() -> None:
    from edge_sdk.data import SampleBuffer

    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    meta = {"fedsight.input_size": "12", "fedsight.in_channels": "3", "fedsight.mean": json.dumps(norm["mean"]),
            "fedsight.std": json.dumps(norm["std"])}
    clf = OnnxClassifier(_linear_onnx(np.zeros((2, 3 * 12 * 12), np.float32), 12, 3, meta))
    buf = SampleBuffer(capacity=4, image_size=12, channels=3, normalization=norm)
    for frame in (np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8),
                  np.random.default_rng(4).integers(0, 256, (20, 20), dtype=np.uint8)):
        np.testing.assert_allclose(clf.preprocess(frame)[0], buf.preprocess(frame).numpy(), atol=1e-5)


def test_torch_exported_model_matches_pytorch_outputs() -> None:
    import torch

    from edge_sdk.data import normalize, resize
    from edge_sdk.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), buf, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in {"fedsight.input_size": "16", "fedsight.in_channels": "1", "fedsight.input_scale": "16",
                       "fedsight.mean": "[0.5]", "fedsight.std": "[0.5]", "fedsight.version": "abc"}.items():
        proto.metadata_props.add(key=key, value=value)
    clf = OnnxClassifier(proto.SerializeToString())

    from sklearn.datasets import load_digits

    raw = load_digits().images[:64].astype(np.uint8)  # 8x8 pixels in 0..16
    x = normalize(resize(torch.from_numpy(raw / 16.0).float()[:, None], 16), {"mean": [0.5], "std": [0.5]})
    with torch.no_grad():
        ref = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(clf.logits(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    probs = np.stack([p.probs for p in clf.predict(list(raw))])  # raw digits, preprocessing from metadata
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert [p.label for p in clf.predict(raw[..., None])] == ref.argmax(1).tolist()  # NHWC batch


def test_reload_swaps_versions_atomically_under_concurrent_predictions() -> None:
    w1, w2 = _weights(1), _weights(2)
    m1 = _linear_onnx(w1, 4, 1, {**META, "fedsight.version": "v1"})
    m2 = _linear_onnx(w2, 4, 1, {**META, "fedsight.version": "v2"})
    images = np.random.default_rng(5).integers(0, 256, size=(4, 4, 4), dtype=np.uint8)
    expected = {"v1": _reference(images, w1), "v2": _reference(images, w2)}
    clf = OnnxClassifier(m1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def predictor() -> None:
        try:
            while not stop.is_set():
                probs = np.stack([p.probs for p in clf.predict(list(images))])
                # every batch comes entirely from one version, never a mix
                assert any(np.allclose(probs, ref, rtol=1e-4, atol=1e-6) for ref in expected.values())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=predictor) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(10):
        clf.reload(m2 if i % 2 == 0 else m1)
    clf.reload(m2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert clf.version == "v2"
    np.testing.assert_allclose(np.stack([p.probs for p in clf.predict(list(images))]), expected["v2"],
                               rtol=1e-4, atol=1e-6)
