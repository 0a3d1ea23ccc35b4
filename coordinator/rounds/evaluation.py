"""Server-side evaluation of a global model version on a held-out set: sklearn digits or an operator's
ImageFolder (``{"dataset": "imagefolder", "path": ...}``).

Gives every round an accuracy measured the same way on the same data, independent of what devices
report about themselves. Images are prepared by :func:`edge_sdk.preprocess.preprocess` with the
preprocessing recorded in the model version itself, exactly as devices train on them and as the ONNX
export runs on them. torch is imported lazily so a coordinator without evaluation never loads it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from edge_sdk.preprocess import Preprocessing
from edge_sdk.protocol.modelfile import load_model

log = logging.getLogger(__name__)

DATASETS = ("digits", "imagefolder")
DIGITS_CLASSES = 10


class EvaluationError(ValueError):
    """The evaluation set does not fit the model (or cannot be read); the message says why."""


class Evaluator:
    """Evaluates FSM1 bytes; caches the prepared test set per (dataset, path, preprocessing)."""

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str, Preprocessing], Any] = {}
        self._lock = threading.Lock()
        # One built network per (arch, classes, channels), reused every round: building MobileNetV3 costs
        # ~0.1 s of random init that the round's weights overwrite anyway. Used under ``_model_lock``.
        self._models: dict[tuple[str, int, int], Any] = {}
        self._model_lock = threading.Lock()

    def _dataset(self, spec: dict[str, Any], pre: Preprocessing, class_names: list[str]) -> Any:
        name, path = spec.get("dataset"), str(spec.get("path") or "")
        if name not in DATASETS:
            raise EvaluationError(f"unknown eval dataset {name!r}; valid: {', '.join(DATASETS)}")
        key = (name, path, pre)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(name, path, pre, class_names)
            return self._cache[key]

    @staticmethod
    def _load(name: str, path: str, pre: Preprocessing, class_names: list[str]) -> Any:
        import torch
        from torch.utils.data import TensorDataset

        from edge_sdk.data import DatasetNotFoundError, image_folder, load_digits_split

        if name == "digits":
            if len(class_names) != DIGITS_CLASSES:
                raise EvaluationError(f"the digits set has {DIGITS_CLASSES} classes but the model has "
                                      f"{len(class_names)}")
            return load_digits_split(preprocessing=pre)[1]
        try:
            folder = image_folder(path, pre.image_size[0], preprocessing=pre)
        except DatasetNotFoundError as exc:
            raise EvaluationError(str(exc).splitlines()[0]) from None
        if list(folder.classes) != list(class_names):
            raise EvaluationError(f"evaluation folder {path} now has classes {folder.classes}, the job's "
                                  f"class_names are {class_names}")
        xs, ys = [], []
        for i in range(len(folder)):
            x, y = folder[i]
            xs.append(x)
            ys.append(int(y))
        log.info("evaluation set %s: %d images, %d classes", path, len(ys), len(folder.classes))
        return TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.int64))

    def evaluate(self, model_bytes: bytes, job_config: dict[str, Any]) -> dict[str, float]:
        """``{"loss", "accuracy", "num_samples"}`` of the model in ``model_bytes``; EvaluationError if the
        set does not fit the model."""
        import torch

        from edge_sdk.models import build_model
        from edge_sdk.params import load_arrays

        spec = job_config.get("eval") or {}
        arrays, meta = load_model(model_bytes)
        model_cfg = job_config["model"]
        arch = meta.get("arch", model_cfg["arch"])
        num_classes = int(meta.get("num_classes", model_cfg["num_classes"]))
        class_names = list(meta.get("class_names") or job_config.get("class_names") or range(num_classes))
        try:
            pre = Preprocessing.from_meta(meta)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        test = self._dataset(spec, pre, [str(c) for c in class_names])
        x_all, y_all = test.tensors
        if len(y_all) == 0:
            raise EvaluationError("the evaluation set is empty")
        key = (arch, num_classes, pre.channels)
        with self._model_lock:
            model = self._models.get(key)
            if model is None:  # channels_last: oneDNN's CPU convolutions run 1.2-4x faster on it (MobileNetV3 ~4x)
                model = build_model(arch, num_classes, in_channels=pre.channels).to(memory_format=torch.channels_last)
                self._models[key] = model
            load_arrays(model, arrays)  # every parameter and buffer: nothing of the last round survives
            model.eval()
            with torch.inference_mode():
                loss_sum, correct = self._score(model, x_all, y_all)
        n = len(y_all)
        return {"loss": loss_sum / n, "accuracy": correct / n, "num_samples": float(n)}

    def _score(self, model: Any, x_all: Any, y_all: Any) -> tuple[float, int]:
        import torch
        import torch.nn.functional as F

        loss_sum, correct = 0.0, 0
        for start in range(0, len(y_all), self.batch_size):
            x, y = x_all[start:start + self.batch_size], y_all[start:start + self.batch_size]
            out = model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        return loss_sum, correct
