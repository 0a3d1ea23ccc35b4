"""Fitting a device's local data to a job: same preprocessing as the job's model, and a held-out share.

``EdgeClient`` calls :func:`fit_to_job` with the :class:`~edge_sdk.preprocess.Preprocessing` read from the
job's model file before every round, so training data is prepared exactly as the model expects (and as
its ONNX export prepares frames on devices), or the round is refused with the differences spelled out.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from .data import _FilePreprocess
from .preprocess import Preprocessing, PreprocessingMismatch

HOLDOUT_SEED = 0x5EED  # fixed: a sample's held-out key never changes between rounds


def _declared(dataset: Dataset) -> tuple[Dataset, Preprocessing | None]:
    """The dataset (looking through Subsets) that carries a ``preprocessing`` attribute, and that spec."""
    inner: Dataset = dataset
    while not hasattr(inner, "preprocessing") and hasattr(inner, "dataset"):
        inner = inner.dataset  # type: ignore[attr-defined]
    return inner, getattr(inner, "preprocessing", None)


def fit_to_job(dataset: Dataset, spec: Preprocessing) -> None:
    """Make ``dataset`` prepare images as ``spec`` says, or raise PreprocessingMismatch naming the differences.

    A SampleBuffer is configured; an image folder created without a size follows the job; any other dataset
    must declare the same ``preprocessing`` or at least yield CxHxW tensors of the model's shape."""
    if hasattr(dataset, "configure"):
        dataset.configure(spec)
        return
    inner, declared = _declared(dataset)
    if declared is not None:
        if getattr(inner, "preprocessing_pinned", True) is False and isinstance(
                getattr(inner, "transform", None), _FilePreprocess):
            inner.transform.spec = inner.preprocessing = spec  # type: ignore[attr-defined]
            return
        diffs = declared.differences(spec)
        if diffs:
            raise PreprocessingMismatch("local dataset preprocessing differs from the job's model: " + "; ".join(diffs))
        return
    if len(dataset) == 0:  # type: ignore[arg-type]
        return
    shape = tuple(dataset[0][0].shape)
    want = (spec.channels, *spec.image_size)
    if shape != want:
        raise PreprocessingMismatch(f"local samples have shape {'x'.join(map(str, shape))} but the job's model "
                                    f"takes {'x'.join(map(str, want))}")


def split_for_job(dataset: Dataset, holdout_fraction: float) -> tuple[Dataset, Dataset | None]:
    """(training view, held-out view or None): each sample keeps a fixed key in [0, 1); keys below the
    fraction are evaluation-only, so a held-out sample is never trained on while the fraction is unchanged."""
    if hasattr(dataset, "snapshot") and hasattr(dataset, "holdout"):
        return dataset.snapshot(holdout_fraction), dataset.holdout(holdout_fraction)
    if holdout_fraction <= 0:
        return dataset, None
    keys = np.random.default_rng(HOLDOUT_SEED).random(len(dataset))  # type: ignore[arg-type]
    train, held = np.flatnonzero(keys >= holdout_fraction), np.flatnonzero(keys < holdout_fraction)
    if not len(train):
        raise ValueError(f"no training samples left after holding out {holdout_fraction:.0%}")
    return Subset(dataset, train.tolist()), (Subset(dataset, held.tolist()) if len(held) else None)


def preprocessing_from_job(config: dict) -> Preprocessing:
    """The preprocessing of a job from its REST config (the same fields its model files carry)."""
    model = config["model"]
    return Preprocessing.create(model["image_size"], int(model["in_channels"]), config.get("normalization"),
                                float(config.get("input_scale") or 255.0))
