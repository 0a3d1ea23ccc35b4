"""One preprocessing for training, server-side evaluation and ONNX inference; SampleBuffer follows the job."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from converters.onnx_export import export_onnx_bytes
from coordinator.rounds.evaluation import Evaluator
from coordinator.rounds.jobspec import initial_model, normalize_job
from edge_sdk.data import image_folder, load_digits_split
from edge_sdk.inference import OnnxClassifier
from edge_sdk.job_data import fit_to_job, split_for_job
from edge_sdk.preprocess import Preprocessing, PreprocessingMismatch, preprocess
from edge_sdk.protocol.modelfile import load_model
from edge_sdk.sample_buffer import SampleBuffer

PHOTO = Preprocessing.create(32, 3, {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, 255)


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_training_evaluation_and_onnx_inference_prepare_an_image_identically(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "holdout")
    cfg = normalize_job({"name": "cams", "model": {"arch": "small_cnn", "image_size": 12},
                         "eval": {"dataset": "imagefolder", "path": str(folder)}})
    model_bytes = initial_model("job-p", cfg)
    spec = Preprocessing.from_meta(load_model(model_bytes)[1])
    assert spec == Preprocessing.create(12, 3, {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, 255)
    image = folder / "cat" / "0.png"
    frame = np.asarray(Image.open(image))  # what a camera app hands the SDK: HxWx3 uint8, any size

    buffer = SampleBuffer(capacity=4)  # training: configured from the job's model metadata
    buffer.add(frame, 0)
    fit_to_job(buffer, spec)
    trained_on = split_for_job(buffer, 0.0)[0].tensors[0][0].numpy()

    server = Evaluator()._dataset(cfg["eval"], spec, cfg["class_names"]).tensors[0][0].numpy()  # cat/0.png

    onnx_bytes, _ = export_onnx_bytes(model_bytes, {"id": "job-p", "config": cfg})
    device = OnnxClassifier(onnx_bytes)
    on_device = device.preprocess(frame)[0]
    from_file = device.preprocess(str(image))[0]

    assert trained_on.shape == (3, 12, 12)
    np.testing.assert_array_equal(trained_on, server)
    np.testing.assert_array_equal(trained_on, on_device)
    np.testing.assert_array_equal(trained_on, from_file)
    np.testing.assert_array_equal(trained_on, preprocess(frame, spec))
    # and not trivially: a different input_scale gives a different tensor
    assert not np.allclose(preprocess(frame, Preprocessing(**{**spec.__dict__, "input_scale": 16.0})), trained_on)


def test_digits_training_data_uses_the_same_function() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    spec = Preprocessing.create(16, 3, {"mean": [0.5], "std": [0.5]}, 16)
    train, test = load_digits_split(preprocessing=spec)
    assert train.preprocessing == spec and train.tensors[0].shape[1:] == (3, 16, 16)
    bunch = load_digits()
    _, te = train_test_split(np.arange(len(bunch.target)), test_size=0.2, random_state=0, stratify=bunch.target)
    expected = np.stack([preprocess(bunch.images[i].astype(np.uint8), spec) for i in np.sort(te)])
    np.testing.assert_array_equal(test.tensors[0].numpy(), expected)


def test_unconfigured_buffer_keeps_raw_frames_until_the_job_says_how() -> None:
    buffer = SampleBuffer(capacity=8)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20), dtype=np.uint8),
              rng.random((10, 30, 3)).astype(np.float32)]  # any size, uint8 or float in [0, 1]
    for i, f in enumerate(frames):
        buffer.add(f, i)
    buffer.configure(PHOTO)
    x = buffer.snapshot().tensors[0]
    assert x.shape == (3, 3, 32, 32)
    for got, frame in zip(x, frames):
        np.testing.assert_array_equal(got.numpy(), preprocess(frame, PHOTO))
    buffer.add(rng.integers(0, 256, (100, 50, 3), dtype=np.uint8), 9)  # after configure: prepared on add
    assert buffer[3][0].shape == (3, 32, 32)
    buffer.configure(PHOTO)  # same job again: nothing changes


def test_buffer_that_does_not_match_the_job_is_refused_and_left_unchanged() -> None:
    buffer = SampleBuffer(capacity=4, image_size=224, input_scale=16)
    buffer.add(np.zeros((50, 50, 3), np.uint8), 1)
    with pytest.raises(PreprocessingMismatch) as err:
        buffer.configure(PHOTO)
    assert "image_size 224x224 != 32x32" in str(err.value) and "input_scale 16.0 != 255.0" in str(err.value)
    assert buffer.spec is None and len(buffer) == 1 and buffer[0][0].shape == (3, 224, 224)

    other = Preprocessing.create(64, 1, {"mean": [0.5], "std": [0.5]}, 255)
    ok = SampleBuffer(capacity=4)
    ok.add(np.zeros((50, 50, 3), np.uint8), 1)
    ok.configure(PHOTO)
    with pytest.raises(PreprocessingMismatch, match="already holds frames prepared for another model.*channels 3 != 1"):
        ok.configure(other)
    assert ok.spec == PHOTO and ok[0][0].shape == (3, 32, 32)


def test_held_out_frames_are_never_in_the_training_view() -> None:
    buffer = SampleBuffer(capacity=150, seed=3)
    for i in range(400):  # the reservoir replaces frames; each keeps its own key
        buffer.add(np.full((4, 4), i % 256, np.uint8), i)
    train, held = buffer.snapshot(0.2), buffer.holdout(0.2)
    assert held is not None
    train_ids, held_ids = set(train.tensors[1].tolist()), set(held.tensors[1].tolist())
    assert not train_ids & held_ids and len(train_ids) + len(held_ids) == 150
    assert 15 <= len(held_ids) <= 50
    assert set(buffer.snapshot(0.2).tensors[1].tolist()) == train_ids  # stable between rounds
    assert buffer.holdout(0.0) is None and len(buffer.snapshot()) == 150


def test_generic_datasets_are_checked_against_the_job() -> None:
    train, _ = load_digits_split()
    with pytest.raises(PreprocessingMismatch) as err:
        fit_to_job(Subset(train, range(10)), PHOTO)  # a Subset is looked through
    text = str(err.value)
    assert "image_size 8x8 != 32x32" in text and "channels 1 != 3" in text and "input_scale 16.0 != 255.0" in text
    fit_to_job(Subset(train, range(10)), train.preprocessing)  # the same convention passes
    bare = TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(PreprocessingMismatch, match="shape 1x8x8 but the job's model takes 3x32x32"):
        fit_to_job(bare, PHOTO)
    part, held = split_for_job(bare, 0.4)
    assert held is not None and sorted(part.indices + held.indices) == list(range(5))


def test_image_folder_without_a_size_follows_the_job(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs")
    follows = image_folder(folder, None)
    fit_to_job(follows, PHOTO)
    assert follows[0][0].shape == (3, 32, 32)
    pinned = image_folder(folder, 16)
    with pytest.raises(PreprocessingMismatch, match="image_size 16x16 != 32x32"):
        fit_to_job(pinned, PHOTO)


@pytest.mark.parametrize("shape, dtype, channels, size", [
    ((48, 64, 3), np.uint8, 3, (32, 32)), ((20, 30), np.uint8, 3, (24, 24)), ((40, 40, 4), np.uint8, 3, (16, 16)),
    ((33, 50, 3), np.uint8, 1, (8, 8)), ((30, 20, 3), np.float32, 3, (12, 16)), ((400, 300, 3), np.uint16, 3, (7, 7)),
])
def test_preprocess_matches_a_torch_reference(shape, dtype, channels, size) -> None:
    """Raw / scale -> channels -> torch antialiased bilinear resize -> normalise, computed with torch ops."""
    import torch.nn.functional as F

    from edge_sdk.data import adapt_channels, normalize

    rng = np.random.default_rng(0)
    scale = 1023.0 if dtype == np.uint16 else 255.0
    frame = rng.random(shape).astype(dtype) if dtype == np.float32 else rng.integers(0, scale + 1, shape).astype(dtype)
    norm = {"mean": [0.3] * channels, "std": [0.2] * channels}
    spec = Preprocessing.create(size, channels, norm, scale)
    hwc = frame if frame.ndim == 3 else frame[:, :, None]
    x = torch.from_numpy(hwc.astype(np.float32)).permute(2, 0, 1) / (1.0 if dtype == np.float32 else scale)
    x = F.interpolate(adapt_channels(x, channels)[None], size=size, mode="bilinear", align_corners=False,
                      antialias=True)[0]
    np.testing.assert_allclose(preprocess(frame, spec), normalize(x, norm).numpy(), atol=2e-4)
