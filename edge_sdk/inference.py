"""On-device inference with an exported FedSight ONNX model — onnxruntime + numpy only, never torch.

Phones/gateways that only run the model should not pay for a torch install, so this module imports
nothing that imports torch (a test enforces it). Preprocessing is read from the model's
``metadata_props`` (written by ``converters/onnx_export.py``) and applied by
:func:`edge_sdk.preprocess.preprocess`, the same function training and server-side evaluation use.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .frames import frame_to_chw
from .preprocess import Preprocessing, adapt_channels, load_image, preprocess, resize_chw

__all__ = ["OnnxClassifier", "Prediction", "resize_chw"]

log = logging.getLogger(__name__)

META_PREFIX = "fedsight."

@dataclass
class Prediction:
    label: int
    name: str
    probability: float
    probs: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Preprocess:
    spec: Preprocessing | None  # None only for foreign ONNX files with no size in metadata or input shape
    channels: int
    scale: float
    class_names: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int] | None:
        return self.spec.image_size if self.spec else None


@dataclass(frozen=True)
class _State:
    """Everything tied to one model version; swapped as a whole by ``reload``."""

    session: ort.InferenceSession
    input_name: str
    fixed_batch: int | None
    meta: dict[str, str]
    pre: _Preprocess


def _json_list(meta: dict[str, str], key: str) -> list[Any] | None:
    raw = meta.get(META_PREFIX + key)
    if raw in (None, ""):
        return None
    try:
        val = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ONNX metadata {META_PREFIX}{key} is not JSON: {raw!r}") from exc
    if not isinstance(val, list):
        raise ValueError(f"ONNX metadata {META_PREFIX}{key} must be a JSON list, got {raw!r}")
    return val


def _parse_size(raw: str | None, shape: Sequence[Any]) -> tuple[int, int] | None:
    if raw:
        parts = raw.lower().replace(",", "x").split("x")
        dims = [int(p) for p in parts if p.strip()]
        return (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])
    if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return shape[2], shape[3]
    return None


def _preprocess_from(meta: dict[str, str], shape: Sequence[Any]) -> _Preprocess:
    if meta.get(META_PREFIX + "in_channels"):
        channels = int(meta[META_PREFIX + "in_channels"])
    else:
        channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 3

    def values(key: str) -> list[float] | None:
        vals = _json_list(meta, key)
        if vals is not None and len(vals) not in (1, channels):
            raise ValueError(f"ONNX metadata {META_PREFIX}{key} has {len(vals)} values for {channels} channels")
        return vals

    mean, std = values("mean"), values("std")
    names = _json_list(meta, "class_names") or []
    scale = float(meta.get(META_PREFIX + "input_scale") or 255.0)
    size = _parse_size(meta.get(META_PREFIX + "input_size"), shape)
    spec = None
    if size is not None:
        norm = {"mean": mean if mean is not None else [0.0], "std": std if std is not None else [1.0]}
        spec = Preprocessing.create(size, channels, norm, scale)
    return _Preprocess(spec=spec, channels=channels, scale=scale, class_names=tuple(str(n) for n in names))


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider") if p in available]
    return preferred + ["CPUExecutionProvider"]


class OnnxClassifier:
    """Thread-safe image classifier over an ONNX model; ``reload`` swaps in a new version atomically."""

    def __init__(self, path_or_bytes: str | Path | bytes, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        self._providers = list(providers) if providers else _default_providers()
        self._threads = intra_op_threads
        self._lock = threading.Lock()
        self._state = self._load(path_or_bytes)

    def _load(self, path_or_bytes: str | Path | bytes) -> _State:
        opts = ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = int(self._threads)
        src: str | bytes = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        if isinstance(src, str) and not Path(src).is_file():
            raise FileNotFoundError(f"ONNX model not found: {src}")
        session = ort.InferenceSession(src, sess_options=opts, providers=self._providers)
        inp = session.get_inputs()[0]
        meta = dict(session.get_modelmeta().custom_metadata_map)
        batch = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
        return _State(session, inp.name, batch, meta, _preprocess_from(meta, list(inp.shape)))

    def reload(self, path_or_bytes: str | Path | bytes) -> None:
        """Load a new model version; in-flight predictions finish on the old one."""
        state = self._load(path_or_bytes)  # slow part outside the lock
        with self._lock:
            old, self._state = self._state, state
        log.info("ONNX model reloaded: %s -> %s", old.meta.get(META_PREFIX + "version"),
                 state.meta.get(META_PREFIX + "version"))

    # ------------------------------------------------------------------------------------- metadata
    @property
    def version(self) -> str | None:
        return self._state.meta.get(META_PREFIX + "version")

    @property
    def job_id(self) -> str | None:
        return self._state.meta.get(META_PREFIX + "job_id")

    @property
    def round(self) -> int | None:
        raw = self._state.meta.get(META_PREFIX + "round")
        return int(raw) if raw not in (None, "") else None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._state.meta)

    @property
    def class_names(self) -> list[str]:
        return list(self._state.pre.class_names)

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self._state.pre.size

    @property
    def in_channels(self) -> int:
        return self._state.pre.channels

    # ---------------------------------------------------------------------------------- preprocessing
    def preprocess(self, images: Any) -> np.ndarray:
        """One image or a sequence of images -> float32 NCHW batch for the current model."""
        return self._preprocess(self._state.pre, images)

    @staticmethod
    def _preprocess(pre: _Preprocess, images: Any) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 4:  # NHWC uint8 batch
            items: list[Any] = list(images)
        elif isinstance(images, (np.ndarray, str, Path)) or hasattr(images, "convert"):
            items = [images]
        else:
            items = list(images)
        if not items:
            raise ValueError("no images given")
        return np.stack([OnnxClassifier._one(pre, im) for im in items]).astype(np.float32, copy=False)

    @staticmethod
    def _one(pre: _Preprocess, image: Any) -> np.ndarray:
        if pre.spec is not None:
            return preprocess(image, pre.spec)  # the same function the model was trained with
        if isinstance(image, (str, Path)) or hasattr(image, "convert"):
            image = load_image(image)
        return adapt_channels(frame_to_chw(image, pre.scale), pre.channels)

    # ------------------------------------------------------------------------------------- inference
    def predict(self, images: Any) -> list[Prediction]:
        """uint8 HxW/HxWxC arrays (one, a list or an NHWC batch), file paths or PIL images; a float32
        NCHW array is taken as already preprocessed (see :meth:`predict_tensor`)."""
        state = self._state  # one read: a concurrent reload cannot mix versions within a call
        if isinstance(images, np.ndarray) and images.ndim == 4 and np.issubdtype(images.dtype, np.floating):
            return self._predictions(state, self._run(state, images))
        return self._predictions(state, self._run(state, self._preprocess(state.pre, images)))

    def predict_tensor(self, batch: np.ndarray) -> list[Prediction]:
        """Already-preprocessed float32 NCHW batch."""
        state = self._state
        return self._predictions(state, self._run(state, batch))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self._state, batch)

    @staticmethod
    def _run(state: _State, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        if state.fixed_batch is not None and state.fixed_batch != len(batch):
            if state.fixed_batch != 1:
                raise ValueError(f"model takes batches of exactly {state.fixed_batch}, got {len(batch)}")
            outs = [state.session.run(None, {state.input_name: batch[i:i + 1]})[0] for i in range(len(batch))]
            return np.concatenate(outs).astype(np.float32, copy=False)
        return np.asarray(state.session.run(None, {state.input_name: batch})[0], dtype=np.float32)

    @staticmethod
    def _predictions(state: _State, logits: np.ndarray) -> list[Prediction]:
        logits = logits.reshape(len(logits), -1).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        names = state.pre.class_names
        out = []
        for p in probs:
            k = int(p.argmax())
            out.append(Prediction(k, names[k] if k < len(names) else str(k), float(p[k]), p))
        return out
