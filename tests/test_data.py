from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.data import (
    DIGITS_NORMALIZATION,
    DatasetNotFoundError,
    SampleBuffer,
    cifar10,
    dirichlet_partition,
    image_folder,
    load_digits_split,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_digits_split_shapes_range_and_determinism() -> None:
    train, test = load_digits_split(test_fraction=0.2, seed=0)
    x, y = train.tensors
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = x * DIGITS_NORMALIZATION["std"][0] + DIGITS_NORMALIZATION["mean"][0]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.max() == 1
    assert set(y.tolist()) == set(range(10)) == set(test.tensors[1].tolist())
    again, _ = load_digits_split(test_fraction=0.2, seed=0)
    other, _ = load_digits_split(test_fraction=0.2, seed=1)
    assert torch.equal(again.tensors[0], x)
    assert not torch.equal(other.tensors[1], y)


def test_digits_upsampled_rgb() -> None:
    train, test = load_digits_split(image_size=16, channels=3)
    x = test.tensors[0]
    assert x.shape[1:] == (3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])
    small, _ = load_digits_split()
    # upsampling keeps the mean intensity of each image (bilinear is a local average)
    torch.testing.assert_close(train.tensors[0][:, :1].mean((1, 2, 3)), small.tensors[0].mean((1, 2, 3)),
                               atol=0.05, rtol=0)


def _max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("alpha", [0.1, 1.0, float("inf"), "iid"])
def test_dirichlet_partition_covers_every_index_once(alpha: float | str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    parts = dirichlet_partition(labels, num_clients=10, alpha=alpha, seed=3, min_size=5)
    assert len(parts) == 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(labels, num_clients=10, alpha=alpha, seed=3, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_small_alpha_is_label_skewed_and_iid_is_not() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    skewed = _max_class_share(dirichlet_partition(labels, 10, 0.1, seed=0), labels)
    iid = _max_class_share(dirichlet_partition(labels, 10, "iid", seed=0), labels)
    assert skewed > 0.5
    assert iid < 0.2


def test_dirichlet_tops_up_starved_clients_and_rejects_impossible_requests() -> None:
    labels = np.repeat(np.arange(4), 30)
    parts = dirichlet_partition(labels, num_clients=40, alpha=0.01, seed=0, min_size=3)
    assert min(len(p) for p in parts) >= 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(120))
    with pytest.raises(ValueError):
        dirichlet_partition(labels, num_clients=100, alpha=1.0, seed=0, min_size=2)


def test_image_folder_missing_or_empty_says_how_to_lay_it_out(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="one sub-folder per class") as err:
        image_folder(tmp_path / "nope", image_size=16)
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="sub-folder per class"):
        image_folder(tmp_path / "empty", image_size=16)


def test_image_folder_loads_a_valid_layout(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = image_folder(tmp_path, image_size=16)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and y == 1
    grey = image_folder(tmp_path, image_size=8, channels=1)
    assert grey[0][0].shape == (1, 8, 8)


def test_cifar10_missing_says_where_the_files_go(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        cifar10(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_sample_buffer_preprocesses_frames() -> None:
    buf = SampleBuffer(capacity=4, image_size=8, channels=1, normalization={"mean": [0.5], "std": [0.25]})
    frame = np.full((16, 12, 3), 255, dtype=np.uint8)
    buf.add(frame, 3)
    buf.add(np.zeros((16, 12), dtype=np.uint8), 4)
    buf.add(torch.full((1, 8, 8), 0.5), 5)  # CHW float tensor: already in [0, 1]
    x, y = buf[0]
    assert x.shape == (1, 8, 8) and int(y) == 3
    torch.testing.assert_close(x, torch.full((1, 8, 8), 2.0))  # (1 - 0.5) / 0.25
    torch.testing.assert_close(buf[1][0], torch.full((1, 8, 8), -2.0))
    torch.testing.assert_close(buf[2][0], torch.zeros(1, 8, 8))
    snap = buf.snapshot()
    assert snap.tensors[0].shape == (3, 1, 8, 8) and snap.tensors[1].tolist() == [3, 4, 5]


def test_ring_buffer_keeps_the_most_recent_frames() -> None:
    buf = SampleBuffer(capacity=5, policy="ring")
    for i in range(23):
        buf.add(np.full((2, 2), i, dtype=np.uint8), i)
    assert len(buf) == 5 and buf.seen == 23
    assert sorted(buf.snapshot().tensors[1].tolist()) == list(range(18, 23))


def test_reservoir_keeps_a_sample_of_the_whole_stream() -> None:
    buf = SampleBuffer(capacity=100, policy="reservoir", seed=0)
    for i in range(2000):
        buf.add(np.zeros((2, 2), dtype=np.uint8), i)
    labels = np.array(buf.snapshot().tensors[1].tolist())
    assert len(labels) == 100 and len(set(labels)) == 100
    # uniform over the stream: about 25 per quarter, neither only-old nor only-recent
    counts = np.bincount(labels // 500, minlength=4)
    assert counts.min() >= 10, counts


def test_sample_buffer_is_thread_safe_while_training_snapshots() -> None:
    buf = SampleBuffer(capacity=64, image_size=4, channels=3)
    errors: list[BaseException] = []
    stop = threading.Event()

    def producer(offset: int) -> None:
        try:
            rng = np.random.default_rng(offset)
            for i in range(300):
                buf.add(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), offset + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def consumer() -> None:
        try:
            while not stop.is_set():
                if len(buf):
                    snap = buf.snapshot()
                    assert snap.tensors[0].shape[1:] == (3, 4, 4)
                    assert len(snap) == len(snap.tensors[1]) <= 64
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(4)]
    reader = threading.Thread(target=consumer)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert not errors
    assert len(buf) == 64 and buf.seen == 1200
    assert len(set(buf.snapshot().tensors[1].tolist())) == 64
