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


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero band of :func:`_resize_matrix` as (out, K) source indices and weights: a camera frame
    shrunk 720 -> 224 needs ~8 taps per output pixel, not all 720 a dense matrix product would multiply."""
    mat = _resize_matrix(in_size, out_size)
    nz = mat != 0
    any_nz = nz.any(axis=1)
    lo = np.where(any_nz, nz.argmax(axis=1), 0)
    hi = np.where(any_nz, in_size - nz[:, ::-1].argmax(axis=1), 0)
    k = max(int((hi - lo).max()), 1)
    idx = np.minimum(lo[:, None] + np.arange(k), in_size - 1)
    weights = np.take_along_axis(mat, idx, axis=1) * (np.arange(k) < (hi - lo)[:, None])
    return idx, weights.astype(np.float32)


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample axis 0 (rows) or 1 (columns) of an HxWxC array: gather each output's K source rows/columns
    (uint8 stays uint8 until the weighted sum, which accumulates in float32)."""
    idx, w = _taps(x.shape[axis], out_size)
    gathered = np.take(x, idx, axis=axis)  # (out, K, W, C) or (H, out, K, C)
    spec = "ok,okwc->owc" if axis == 0 else "ok,hokc->hoc"
    return np.einsum(spec, w, gathered, dtype=np.float32, casting="unsafe")


def _resize_hwc(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of an HxWxC array (any real dtype) to float32, cheaper axis order first."""
    h, w = x.shape[:2]
    oh, ow = size
    if (h, w) == (oh, ow):
        return x.astype(np.float32, copy=False)
    kh, kw = _taps(h, oh)[1].shape[1], _taps(w, ow)[1].shape[1]
    if oh * kh * w + oh * ow * kw <= h * ow * kw + oh * ow * kh:
        return _resize_axis(_resize_axis(x, oh, 0), ow, 1)
    return _resize_axis(_resize_axis(x, ow, 1), oh, 0)


def resize_chw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of a CHW float32 array (same weights as :func:`_resize_matrix`)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return np.ascontiguousarray(_resize_hwc(x.transpose(1, 2, 0), size).transpose(2, 0, 1))


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


def _adapt_hwc(x: np.ndarray, channels: int) -> np.ndarray:
    """:func:`adapt_channels` on an HxWxC array (uint8 stays uint8 unless luma needs floats)."""
    c = x.shape[2]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, channels, axis=2)
    if c in (3, 4) and channels == 1:
        return (x[:, :, :3].astype(np.float32) @ _LUMA.reshape(3, 1))
    if c == 4 and channels == 3:
        return x[:, :, :3]
    return adapt_channels(x.transpose(2, 0, 1), channels)  # raises the readable error


def preprocess(image: Any, spec: Preprocessing) -> np.ndarray:
    """One raw frame (HxW / HxWxC array of any size, file path or PIL image) -> CxHxW float32 for the model.

    Every step is linear up to the normalisation, so they run in the cheapest order: shrink channels, resize
    (on the raw pixels), then scale and normalise the small result."""
    if isinstance(image, (str, Path)) or hasattr(image, "convert"):
        image = load_image(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"frames must be HxW or HxWxC, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"frames must hold integer or float pixels, got {arr.dtype}")
    scale = spec.input_scale if np.issubdtype(arr.dtype, np.integer) else 1.0
    grow = arr.shape[2] < spec.channels  # repeat grey after resizing: less work
    x = arr if grow else _adapt_hwc(arr, spec.channels)
    x = _resize_hwc(x, spec.image_size)
    if grow:
        x = _adapt_hwc(x, spec.channels)
    mean = np.asarray(spec.mean, dtype=np.float32) * np.float32(scale)
    inv = np.float32(1.0) / (np.asarray(spec.std, dtype=np.float32) * np.float32(scale))
    return np.ascontiguousarray(((x - mean) * inv).transpose(2, 0, 1), dtype=np.float32)


def digits_preprocessing(image_size: int = 8, channels: int = 1) -> Preprocessing:
    """The digits convention: pixels 0..16, mean 0.5, std 0.5 (what ``--eval digits`` jobs default to)."""
    return Preprocessing.create(image_size, channels, DIGITS_NORMALIZATION, DIGITS_INPUT_SCALE)
