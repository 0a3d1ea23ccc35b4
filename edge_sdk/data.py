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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .frames import frame_to_chw
from .preprocess import (DIGITS_NORMALIZATION, IMAGENET_NORMALIZATION, Preprocessing, PreprocessingMismatch,
                         adapt_channels as adapt_channels_np, digits_preprocessing, preprocess, resize_chw)

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
    test_fraction: float = 0.2, seed: int = 0, image_size: int = 8, channels: int = 1
) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 8x8 digits (shipped with scikit-learn, no download), stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    bunch = load_digits()
    spec = digits_preprocessing(image_size, channels)
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
    image_size: int,
    normalization: dict[str, Sequence[float]] | None = None,
    channels: int = 3,
    *,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """torchvision ImageFolder with the SDK preprocessing: ``preprocessing`` (e.g. a job's) when given, else
    built from the other arguments (ImageNet normalisation when None)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist. " + _FOLDER_LAYOUT.format(root=root))
    spec = preprocessing or folder_preprocessing(image_size, channels, normalization)
    try:
        dataset = ImageFolder(str(root), transform=_FilePreprocess(spec))
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"no images found under {root} ({exc}). " + _FOLDER_LAYOUT.format(root=root)
        ) from exc
    dataset.preprocessing = spec  # type: ignore[attr-defined]
    return dataset


def cifar10(
    root: str | Path,
    train: bool = True,
    image_size: int = 32,
    normalization: dict[str, Sequence[float]] | None = None,
) -> Dataset:
    """torchvision CIFAR10 from local files only (``download=False``)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    spec = folder_preprocessing(image_size, 3, normalization or CIFAR10_NORMALIZATION)
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
    return dataset


# ---------------------------------------------------------------------------------------- live buffer

class SampleBuffer(Dataset):
    """Bounded, thread-safe store of labelled frames that a camera app fills while training runs.

    The app passes raw frames only (HxW / HxWxC, any size, uint8 or float in [0, 1]); ``EdgeClient``
    calls :meth:`configure` with the job's :class:`~edge_sdk.preprocess.Preprocessing`, so frames are
    prepared exactly as the model (and its ONNX export) expects. Arguments given here pin that field:
    a job whose model differs is refused with :class:`PreprocessingMismatch` naming each difference.
    Until configured, frames are kept raw; afterwards they are preprocessed on ``add`` (outside the lock).

    ``policy="reservoir"`` (default) keeps a uniform random sample of every frame ever added (Algorithm R),
    so old scenes are not forgotten; ``policy="ring"`` keeps the most recent ``capacity`` frames. Each frame
    draws a fixed key in [0, 1) when added: for a held-out fraction f, frames with key < f are evaluation-only
    (:meth:`holdout`) and never in :meth:`snapshot` ``(holdout_fraction=f)``, the training view.
    """

    def __init__(
        self,
        capacity: int = 1024,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        normalization: dict[str, Sequence[float]] | None = None,
        policy: str = "reservoir",
        input_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if policy not in ("reservoir", "ring"):
            raise ValueError("policy must be 'reservoir' or 'ring'")
        self.capacity, self.policy = capacity, policy
        self.image_size, self.channels = image_size, channels
        self.normalization, self.input_scale = normalization, input_scale
        self.spec: Preprocessing | None = None
        if image_size is not None and channels is not None and normalization and input_scale is not None:
            self.spec = Preprocessing.create(image_size, channels, normalization, input_scale)
        self._images: list[torch.Tensor | np.ndarray] = []  # tensors once configured, raw frames before
        self._labels: list[int] = []
        self._keys: list[float] = []
        self._seen = 0
        self._next = 0  # ring write position
        self._rng = np.random.default_rng(seed)
        self._key_rng = np.random.default_rng([seed, 1])
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ preprocessing
    def pinned_differences(self, spec: Preprocessing) -> list[str]:
        """How the fields given to the constructor differ from ``spec`` (empty: compatible)."""
        mine: dict[str, object] = {}
        if self.image_size is not None:
            h, w = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
            mine["image_size"] = (int(h), int(w))
        if self.channels is not None:
            mine["channels"] = int(self.channels)
        if self.normalization:
            try:
                pinned = Preprocessing.create(spec.image_size, spec.channels, self.normalization)
                mine["mean"], mine["std"] = pinned.mean, pinned.std
            except ValueError as exc:
                return [f"normalization {self.normalization} does not fit {spec.channels} channels ({exc})"]
        if self.input_scale is not None:
            mine["input_scale"] = float(self.input_scale)
        merged = Preprocessing(**{**spec.__dict__, **mine})
        return merged.differences(spec)

    def configure(self, spec: Preprocessing) -> None:
        """Adopt a job model's preprocessing (idempotent); raises PreprocessingMismatch and changes
        nothing when a pinned field or an earlier job's preprocessing differs."""
        diffs = self.pinned_differences(spec)
        if diffs:
            raise PreprocessingMismatch(
                "SampleBuffer preprocessing differs from the job's model: " + "; ".join(diffs)
                + " (leave these SampleBuffer arguments unset to take them from the job)")
        with self._lock:
            if self.spec == spec:
                return
            if self.spec is not None:
                raise PreprocessingMismatch(
                    "SampleBuffer already holds frames prepared for another model: "
                    + "; ".join(self.spec.differences(spec)) + " (use one SampleBuffer per job)")
            converted = [torch.from_numpy(preprocess(raw, spec)) for raw in self._images]
            self._images = list(converted)
            self.spec = spec
        log.info("SampleBuffer configured: %s", spec)

    def _partial(self, frame: np.ndarray) -> torch.Tensor:
        """Before :meth:`configure`: apply only the pinned fields (so the buffer is usable on its own)."""
        x = frame_to_chw(frame, 255.0 if self.input_scale is None else float(self.input_scale))
        if self.channels is not None:
            x = adapt_channels_np(x, self.channels)
        if self.image_size is not None:
            x = resize_chw(x, (self.image_size, self.image_size) if isinstance(self.image_size, int)
                           else tuple(self.image_size))
        if self.normalization:
            p = Preprocessing.create(x.shape[1:], x.shape[0], self.normalization)
            x = (x - np.asarray(p.mean, np.float32).reshape(-1, 1, 1)) / np.asarray(p.std, np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    @staticmethod
    def _raw(image: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(image, torch.Tensor):  # CHW float tensor -> HWC float array (taken as [0, 1])
            if image.dim() != 3:
                raise ValueError(f"tensor frames must be CHW, got shape {tuple(image.shape)}")
            return image.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy().copy()
        arr = np.array(image, copy=True)
        if arr.ndim not in (2, 3):
            raise ValueError(f"frames must be HxW or HxWxC, got shape {arr.shape}")
        return arr

    def preprocess(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One raw frame -> CHW float32 tensor, exactly as training will see it."""
        spec = self.spec
        raw = self._raw(image)
        return torch.from_numpy(preprocess(raw, spec)) if spec is not None else self._partial(raw)

    def _ready(self, item: torch.Tensor | np.ndarray) -> torch.Tensor:
        return item if isinstance(item, torch.Tensor) else self._partial(item)

    # ------------------------------------------------------------------------------ storage
    def add(self, image: np.ndarray | torch.Tensor, label: int) -> bool:
        """Add one frame; returns False when the reservoir chose to drop it."""
        spec, raw = self.spec, self._raw(image)
        x: torch.Tensor | np.ndarray = raw if spec is None else torch.from_numpy(preprocess(raw, spec))
        label = int(label)
        with self._lock:
            if spec is None and self.spec is not None:  # configured meanwhile: prepare it like the rest
                x = torch.from_numpy(preprocess(raw, self.spec))
            self._seen += 1
            key = float(self._key_rng.random())
            if len(self._images) < self.capacity:
                self._images.append(x)
                self._labels.append(label)
                self._keys.append(key)
                return True
            if self.policy == "ring":
                slot = self._next
                self._next = (self._next + 1) % self.capacity
            else:
                slot = int(self._rng.integers(self._seen))
                if slot >= self.capacity:
                    return False
            self._images[slot] = x
            self._labels[slot] = label
            self._keys[slot] = key
            return True

    @property
    def seen(self) -> int:
        """Frames offered so far (including dropped ones)."""
        with self._lock:
            return self._seen

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            item, label = self._images[i], self._labels[i]
        return self._ready(item), torch.tensor(label, dtype=torch.int64)

    def _select(self, keep: Callable[[float], bool]) -> TensorDataset | None:
        with self._lock:
            picked = [(x, y) for x, y, k in zip(self._images, self._labels, self._keys) if keep(k)]
        if not picked:
            return None
        try:
            x = torch.stack([self._ready(item) for item, _ in picked])
        except RuntimeError as exc:
            raise ValueError("frames differ in shape; the buffer is not configured for a job yet "
                             "(or set image_size/channels)") from exc
        return TensorDataset(x, torch.tensor([y for _, y in picked], dtype=torch.int64))

    def snapshot(self, holdout_fraction: float = 0.0) -> TensorDataset:
        """Consistent copy of the training frames (all but the held-out ``holdout_fraction``)."""
        data = self._select(lambda k: k >= holdout_fraction)
        if data is None:
            raise ValueError("SampleBuffer is empty" if not len(self) else
                             f"SampleBuffer holds no training frames outside the {holdout_fraction:.0%} held out")
        return data

    def holdout(self, fraction: float) -> TensorDataset | None:
        """The frames held out for evaluation at this fraction (never in ``snapshot(fraction)``), or None."""
        return self._select(lambda k: k < fraction) if fraction > 0 else None

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._labels.clear()
            self._keys.clear()
            self._seen = self._next = 0
