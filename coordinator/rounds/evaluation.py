"""Server-side evaluation of a global model version on a held-out set (today: the digits test split).

Gives every round an accuracy measured the same way on the same data, independent of what devices
report about themselves. torch is imported lazily so a coordinator without evaluation never loads it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from edge_sdk.protocol.modelfile import load_model

log = logging.getLogger(__name__)

DATASETS = ("digits",)


class Evaluator:
    """Evaluates FSM1 bytes; caches the test split per (dataset, image_size, channels)."""

    def __init__(self, batch_size: int = 512) -> None:
        self.batch_size = batch_size
        self._cache: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()

    def _dataset(self, name: str, image_size: int, channels: int) -> Any:
        if name not in DATASETS:
            raise ValueError(f"unknown eval dataset {name!r}; valid: {', '.join(DATASETS)}")
        key = (name, image_size, channels)
        with self._lock:
            if key not in self._cache:
                from edge_sdk.data import load_digits_split

                _, test = load_digits_split(image_size=image_size, channels=channels)
                self._cache[key] = test
            return self._cache[key]

    def evaluate(self, model_bytes: bytes, job_config: dict[str, Any]) -> dict[str, float]:
        """``{"loss", "accuracy", "num_samples"}`` of the model in ``model_bytes``."""
        import torch
        import torch.nn.functional as F

        from edge_sdk.models import build_model
        from edge_sdk.params import load_arrays

        spec = job_config.get("eval") or {}
        arrays, meta = load_model(model_bytes)
        model_cfg = job_config["model"]
        arch = meta.get("arch", model_cfg["arch"])
        num_classes = int(meta.get("num_classes", model_cfg["num_classes"]))
        channels = int(meta.get("in_channels", model_cfg["in_channels"]))
        image_size = int(meta.get("image_size", model_cfg["image_size"]))
        test = self._dataset(spec.get("dataset", "digits"), image_size, channels)
        model = build_model(arch, num_classes, in_channels=channels)
        load_arrays(model, arrays)
        model.eval()
        x_all, y_all = test.tensors
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(y_all), self.batch_size):
                x, y = x_all[start:start + self.batch_size], y_all[start:start + self.batch_size]
                out = model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
        n = max(len(y_all), 1)
        return {"loss": loss_sum / n, "accuracy": correct / n, "num_samples": float(len(y_all))}
