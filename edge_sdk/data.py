"""Datasets for edge training (torch): digits, non-IID partitioning, folder/CIFAR adapters, a live buffer.

Every image goes through :func:`edge_sdk.preprocess.preprocess` (numpy), the function on-device ONNX
inference and the coordinator's evaluation use too. Datasets built here carry a ``preprocessing``
attribute (a :class:`~edge_sdk.preprocess.Preprocessing`) so ``EdgeClient`` can check it against a job's
model; a :class:`SampleBuffer` is configured from the job instead.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .preprocess import (DIGITS_NORMALIZATION, IMAGENET_NORMALIZATION, Preprocessing, PreprocessingMismatch,
                         digits_preprocessing, preprocess)

log = logging.getLogger(__name__)

__all__ = ["DIGITS_NORMALIZATION", "IMAGENET_NORMALIZATION", "CIFAR10_NORMALIZATION", "SampleBuffer",
           "PreprocessingMismatch", "load_digits_split", "image_folder", "cifar10", "dirichlet_partition"]
CIFAR10_NORMALIZATION: dict[str, list[float]] = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
_LUMA = (0.299, 0.587, 0.114)


class DatasetNotFoundError(FileNotFoundError):
    """Local data is missing; the message says where it must be and how to lay it out."""


def digits_normalization(channels: int = 1) -> dict[str, list[float]]:
    return {k: v * channels for k, v in DIGITS_NORMALIZATION.items()}


def _per_channel(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    vals = list(values)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"normalization {what} has {len(vals)} values for {channels} channels")
    return torch.tensor(vals, dtype=torch.float32).view(-1, 1, 1)


def normalize(x: torch.Tensor, normalization: dict[str, Sequence[float]] | None) -> torch.Tensor:
    """(x - mean) / std per channel on a CHW or NCHW tensor; None leaves x unchanged."""
    if not normalization:
        return x
    c = x.shape[-3]
    return (x - _per_channel(normalization["mean"], c, "mean")) / _per_channel(normalization["std"], c, "std")


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a CHW or NCHW float tensor (the SDK-wide resize)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    batched = x.dim() == 4
    out = F.interpolate(x if batched else x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out if batched else out[0]


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """CHW: grey -> repeated, RGB(A) -> luma for 1 channel, RGBA -> RGB."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, *x.shape[1:]).clone()
    if c in (3, 4) and channels == 1:
        return (x[:3] * torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)).sum(0, keepdim=True)
    if c == 4 and channels == 3:
        return x[:3]
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


# ---------------------------------------------------------------------------------------------- digits

def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0, image_size: int = 8, channels: int = 1,
    *, preprocessing: Preprocessing | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 8x8 digits (shipped with scikit-learn, no download), stratified train/test split.

    Raw pixels (0..16) go through ``preprocessing`` (a job's) or the digits convention at the given size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if preprocessing is None and channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    bunch = load_digits()
    spec = preprocessing or digits_preprocessing(image_size, channels)
    x = torch.from_numpy(np.stack([preprocess(img.astype(np.uint8), spec) for img in bunch.images]))
    y = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    train, test = TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])
    train.preprocessing = test.preprocessing = spec  # type: ignore[attr-defined]
    return train, test


# --------------------------------------------------------------------------------------- partitioning

def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float | str, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Split sample indices over clients, label-skewed by Dirichlet(alpha) per class.

    Small alpha -> each client sees few classes; ``alpha=inf`` or ``"iid"`` -> uniform random split.
    Every index lands in exactly one client; each client gets >= ``min_size`` samples (redraws, then
    moves samples from the largest clients if the draw is too skewed). Returns sorted int64 arrays.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if num_clients * min_size > n:
        raise ValueError(f"{n} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    iid = (isinstance(alpha, str) and alpha.lower() == "iid") or (not isinstance(alpha, str) and math.isinf(alpha))
    if iid:
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), num_clients)]
    alpha = float(alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, inf or 'iid' (got {alpha})")
    parts: list[list[int]] = []
    for _attempt in range(20):
        parts = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        for part in parts:  # top up the starved clients from the largest ones
            while len(part) < min_size:
                donor = max(parts, key=len)
                part.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ------------------------------------------------------------------------------------- disk adapters

_FOLDER_LAYOUT = (
    "Lay it out as one sub-folder per class, e.g.\n"
    "  {root}/cat/0001.jpg\n  {root}/cat/0002.png\n  {root}/dog/0001.jpg\n"
    "(class names are the sorted folder names; jpg/png/bmp/webp files)"
)


class _FilePreprocess:
    """PIL image -> normalised CHW tensor (a class, not lambdas, so DataLoader workers can pickle it)."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, img: object) -> torch.Tensor:
        return torch.from_numpy(preprocess(img, self.spec))


def folder_preprocessing(image_size: int, channels: int = 3,
                         normalization: dict[str, Sequence[float]] | None = None) -> Preprocessing:
    """8-bit image files: ImageNet normalisation for 3 channels, digits-style 0.5/0.5 for grey, scale 255."""
    norm = normalization or (IMAGENET_NORMALIZATION if channels == 3 else DIGITS_NORMALIZATION)
    return Preprocessing.create(image_size, channels, norm, 255.0)


def image_folder(
    root: str | Path,
    image_size: int | None,
    normalization: dict[str, Sequence[float]] | None = None,
    channels: int = 3,
    *,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """torchvision ImageFolder with the SDK preprocessing: ``preprocessing`` (e.g. a job's) when given, else
    built from the other arguments (ImageNet normalisation when None). ``image_size=None``: the dataset
    follows the job's model (see :func:`fit_to_job`), 32x32 until then."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist. " + _FOLDER_LAYOUT.format(root=root))
    spec = preprocessing or folder_preprocessing(image_size or 32, channels, normalization)
    try:
        dataset = ImageFolder(str(root), transform=_FilePreprocess(spec))
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"no images found under {root} ({exc}). " + _FOLDER_LAYOUT.format(root=root)
        ) from exc
    dataset.preprocessing = spec  # type: ignore[attr-defined]
    dataset.preprocessing_pinned = preprocessing is not None or image_size is not None  # type: ignore[attr-defined]
    return dataset


def cifar10(
    root: str | Path,
    train: bool = True,
    image_size: int | None = 32,
    normalization: dict[str, Sequence[float]] | None = None,
) -> Dataset:
    """torchvision CIFAR10 from local files only (``download=False``); ``image_size=None`` and no
    ``normalization``: follows the job's model (see :func:`edge_sdk.job_data.fit_to_job`)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    spec = folder_preprocessing(image_size or 32, 3, normalization or CIFAR10_NORMALIZATION)
    try:
        dataset = CIFAR10(str(root), train=train, transform=_FilePreprocess(spec), download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {root}: expected {root / 'cifar-10-batches-py'}/ containing "
            "data_batch_1..5, test_batch and batches.meta. Get cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into that folder "
            "(FedSight never downloads data at run time)."
        ) from exc
    dataset.preprocessing = spec  # type: ignore[attr-defined]
    dataset.preprocessing_pinned = image_size is not None or normalization is not None  # type: ignore[attr-defined]
    return dataset


from .sample_buffer import SampleBuffer  # noqa: E402 - re-exported: edge_sdk.data.SampleBuffer
