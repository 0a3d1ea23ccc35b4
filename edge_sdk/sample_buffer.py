"""SampleBuffer: the live, bounded store of labelled camera frames a device trains on (torch)."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .frames import frame_to_chw
from .preprocess import Preprocessing, PreprocessingMismatch, preprocess, resize_chw
from .preprocess import adapt_channels as adapt_channels_np

log = logging.getLogger(__name__)


class SampleBuffer(Dataset):
    """Bounded, thread-safe store of labelled frames that a camera app fills while training runs.

    The app passes raw frames only (HxW / HxWxC, any size, uint8 or float in [0, 1]); ``EdgeClient``
    calls :meth:`configure` with the job's :class:`~edge_sdk.preprocess.Preprocessing`, so frames are
    prepared exactly as the model (and its ONNX export) expects. Arguments given here pin that field:
    a job whose model differs is refused with :class:`PreprocessingMismatch` naming each difference.
    Until configured, frames are kept raw (``EdgeClient.start`` configures the buffer at once when its
    ``jobs``, or the running jobs, agree on one preprocessing); afterwards they are preprocessed on ``add``.

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


