"""The one image preprocessing of FedSight: raw frame -> normalised CHW float32, numpy only.

Training (``SampleBuffer``, image folders, digits), the coordinator's evaluation and on-device ONNX inference
all call :func:`preprocess` with a :class:`Preprocessing` read from the job's model metadata, so a device
classifies a frame exactly the way the model was trained on it. Steps, in order::

    pixels / input_scale (integer frames only; float frames are taken as already in [0, 1])
    -> channel adaptation (grey -> repeated, RGB(A) -> luma for 1 channel, RGBA -> RGB)
    -> antialiased bilinear resize (same weights as torch ``F.interpolate(..., antialias=True)``)
    -> (x - mean) / std per channel

No torch here: ``edge_sdk.inference`` imports this module on devices that only run ONNX.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .frames import frame_to_chw

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)
DIGITS_INPUT_SCALE = 16.0  # sklearn's 8x8 digits store pixels as 0..16
DIGITS_NORMALIZATION: dict[str, list[float]] = {"mean": [0.5], "std": [0.5]}
IMAGENET_NORMALIZATION: dict[str, list[float]] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class PreprocessingMismatch(ValueError):
    """A dataset's preprocessing differs from the job's model; the message lists every difference."""


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        h = w = int(value)
    else:
        dims = [int(v) for v in value]
        if len(dims) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {value!r}")
        h, w = dims
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {value!r}")
    return h, w


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"normalization {what} needs 1 or {channels} finite values, got {list(values)}")
    return tuple(vals)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects as input; equal specs give bit-identical tensors for the same frame."""

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_scale: float

    @classmethod
    def create(cls, image_size: int | Sequence[int], channels: int,
               normalization: Mapping[str, Sequence[float]] | None = None,
               input_scale: float = 255.0) -> Preprocessing:
        """Validated spec; ``normalization`` None means mean 0, std 1, 1-value lists apply to every channel."""
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        channels = int(channels)
        norm = normalization or {"mean": [0.0], "std": [1.0]}
        mean = _per_channel(norm["mean"], channels, "mean")
        std = _per_channel(norm["std"], channels, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"normalization std values must be positive, got {list(std)}")
        scale = float(input_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input_scale must be a positive number, got {input_scale!r}")
        return cls(_size(image_size), channels, mean, std, scale)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Preprocessing:
        """From FSM1 model metadata (``in_channels``, ``image_size``, ``normalization``, ``input_scale``)."""
        missing = [k for k in ("in_channels", "image_size", "input_scale") if meta.get(k) is None]
        if missing:
            raise ValueError(f"model metadata lacks {', '.join(missing)}: it was not made by this coordinator "
                             "version; recreate the job")
        return cls.create(meta["image_size"], int(meta["in_channels"]), meta.get("normalization"),
                          float(meta["input_scale"]))

    def to_meta(self) -> dict[str, Any]:
        """The FSM1 metadata fields this spec is read back from (see :meth:`from_meta`)."""
        h, w = self.image_size
        return {"in_channels": self.channels, "image_size": h if h == w else [h, w],
                "normalization": {"mean": list(self.mean), "std": list(self.std)}, "input_scale": self.input_scale}

    def differences(self, other: Preprocessing) -> list[str]:
        """Readable ``"field mine != theirs"`` lines; empty when both give the same tensors."""
        out = []
        for name in ("image_size", "channels", "mean", "std", "input_scale"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                fmt = (lambda s: f"{s[0]}x{s[1]}") if name == "image_size" else str
                out.append(f"{name} {fmt(a)} != {fmt(b)}")
        return out

    def __call__(self, image: Any) -> np.ndarray:
        return preprocess(image, self)


@lru_cache(maxsize=64)
def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of antialiased bilinear resampling, identical to torch
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` along one axis."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((j - center + 0.5) / support), 0.0, None)
        total = w.sum()
        mat[i, lo:hi] = w / total if total > 0 else 0.0
    return mat.astype(np.float32)


def resize_chw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a CHW float32 array (see :func:`_resize_matrix`)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    return _resize_matrix(h, size[0]) @ x @ _resize_matrix(w, size[1]).T


def adapt_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """CHW: grey -> repeated, RGB(A) -> luma for 1 channel, RGBA -> RGB."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, channels, axis=0)
    if c in (3, 4) and channels == 1:
        return (x[:3] * _LUMA).sum(axis=0, keepdims=True)
    if c == 4 and channels == 3:
        return x[:3]
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels (a 3-D array is one HxWxC "
                     "image; pass a list of HxW arrays or an NxHxWxC array for several)")


def load_image(source: str | Path | Any) -> np.ndarray:
    """An image file or PIL image -> HxWx3 uint8 RGB (Pillow imported only here)."""
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as img:
            return np.asarray(img.convert("RGB"))
    return np.asarray(source.convert("RGB"))


def preprocess(image: Any, spec: Preprocessing) -> np.ndarray:
    """One raw frame (HxW / HxWxC array of any size, file path or PIL image) -> CxHxW float32 for the model."""
    if isinstance(image, (str, Path)) or hasattr(image, "convert"):
        image = load_image(image)
    x = adapt_channels(frame_to_chw(image, spec.input_scale), spec.channels)
    x = resize_chw(x, spec.image_size)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def digits_preprocessing(image_size: int = 8, channels: int = 1) -> Preprocessing:
    """The digits convention: pixels 0..16, mean 0.5, std 0.5 (what ``--eval digits`` jobs default to)."""
    return Preprocessing.create(image_size, channels, DIGITS_NORMALIZATION, DIGITS_INPUT_SCALE)
