"""Datasets for edge training (torch): digits, non-IID partitioning, folder/CIFAR adapters, a live buffer.

Preprocessing convention shared with :mod:`edge_sdk.inference` (which re-implements it in numpy):
raw pixels / input_scale -> [0, 1]; channel adaptation (grey->repeat, RGB->luma); bilinear resize
(``align_corners=False``, antialiased, as ``F.interpolate(..., antialias=True)``); ``(x - mean) / std``.
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

from .frames import frame_to_chw

log = logging.getLogger(__name__)

# digits pixels are mapped to [0, 1] then normalised per channel; lists are per channel and a
# length-1 list applies to every channel (use digits_normalization(3) for an explicit 3-channel copy)
DIGITS_NORMALIZATION: dict[str, list[float]] = {"mean": [0.5], "std": [0.5]}
IMAGENET_NORMALIZATION: dict[str, list[float]] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
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
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8 in [0,1]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if image_size != 8:
        x = resize(x, image_size)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    x = normalize(x, DIGITS_NORMALIZATION).contiguous()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


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

    def __init__(self, image_size: int, normalization: dict[str, Sequence[float]], channels: int) -> None:
        self.image_size, self.normalization, self.channels = image_size, normalization, channels

    def __call__(self, img: object) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        img = img.convert("L" if self.channels == 1 else "RGB")  # type: ignore[attr-defined]
        x = pil_to_tensor(img).float() / 255.0
        return normalize(resize(x, self.image_size), self.normalization)


def image_folder(
    root: str | Path,
    image_size: int,
    normalization: dict[str, Sequence[float]] | None = None,
    channels: int = 3,
) -> Dataset:
    """torchvision ImageFolder with the SDK preprocessing (ImageNet normalisation when None)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist. " + _FOLDER_LAYOUT.format(root=root))
    norm = normalization or (IMAGENET_NORMALIZATION if channels == 3 else DIGITS_NORMALIZATION)
    try:
        return ImageFolder(str(root), transform=_FilePreprocess(image_size, norm, channels))
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"no images found under {root} ({exc}). " + _FOLDER_LAYOUT.format(root=root)
        ) from exc


def cifar10(
    root: str | Path,
    train: bool = True,
    image_size: int = 32,
    normalization: dict[str, Sequence[float]] | None = None,
) -> Dataset:
    """torchvision CIFAR10 from local files only (``download=False``)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    tf = _FilePreprocess(image_size, normalization or CIFAR10_NORMALIZATION, 3)
    try:
        return CIFAR10(str(root), train=train, transform=tf, download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {root}: expected {root / 'cifar-10-batches-py'}/ containing "
            "data_batch_1..5, test_batch and batches.meta. Get cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into that folder "
            "(FedSight never downloads data at run time)."
        ) from exc


# ---------------------------------------------------------------------------------------- live buffer

class SampleBuffer(Dataset):
    """Bounded, thread-safe store of labelled frames that a camera app fills while training runs.

    ``policy="reservoir"`` (default) keeps a uniform random sample of every frame ever added (Algorithm R),
    so old scenes are not forgotten; ``policy="ring"`` keeps the most recent ``capacity`` frames.
    Frames are preprocessed on ``add`` (outside the lock) with the SDK convention, so training reads
    ready tensors. Train on :meth:`snapshot` (a consistent copy) while frames keep arriving.
    """

    def __init__(
        self,
        capacity: int = 1024,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        normalization: dict[str, Sequence[float]] | None = None,
        policy: str = "reservoir",
        input_scale: float = 255.0,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if policy not in ("reservoir", "ring"):
            raise ValueError("policy must be 'reservoir' or 'ring'")
        self.capacity, self.policy = capacity, policy
        self.image_size, self.channels = image_size, channels
        self.normalization, self.input_scale = normalization, float(input_scale)
        self._images: list[torch.Tensor] = []
        self._labels: list[int] = []
        self._seen = 0
        self._next = 0  # ring write position
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def preprocess(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """HxW / HxWxC numpy (uint8 scaled by input_scale, floats as-is) or CHW float tensor -> CHW float32."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"tensor frames must be CHW, got shape {tuple(image.shape)}")
            x = image.detach().to("cpu", torch.float32)
        else:
            x = torch.from_numpy(frame_to_chw(image, self.input_scale))
        if self.channels is not None:
            x = adapt_channels(x, self.channels)
        if self.image_size is not None:
            x = resize(x, self.image_size)
        return normalize(x, self.normalization).contiguous()

    def add(self, image: np.ndarray | torch.Tensor, label: int) -> bool:
        """Add one frame; returns False when the reservoir chose to drop it."""
        x = self.preprocess(image)
        label = int(label)
        with self._lock:
            self._seen += 1
            if len(self._images) < self.capacity:
                self._images.append(x)
                self._labels.append(label)
                return True
            if self.policy == "ring":
                slot = self._next
                self._next = (self._next + 1) % self.capacity
            else:
                slot = int(self._rng.integers(self._seen))
                if slot >= self.capacity:
                    return False
            if x.shape != self._images[slot].shape:
                raise ValueError("frame shape changed; set image_size/channels to make frames uniform")
            self._images[slot] = x
            self._labels[slot] = label
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
            return self._images[i], torch.tensor(self._labels[i], dtype=torch.int64)

    def snapshot(self) -> TensorDataset:
        """Consistent copy of the current contents as a TensorDataset (stacked tensors)."""
        with self._lock:
            images, labels = list(self._images), list(self._labels)
        if not images:
            raise ValueError("SampleBuffer is empty")
        try:
            x = torch.stack(images)
        except RuntimeError as exc:
            raise ValueError("frames differ in shape; set image_size/channels on the SampleBuffer") from exc
        return TensorDataset(x, torch.tensor(labels, dtype=torch.int64))

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._labels.clear()
            self._seen = self._next = 0
