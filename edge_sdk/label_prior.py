"""A device's own label distribution, used to calibrate its local loss under label skew.

Why: on label-skewed shards a device's classifier learns "my classes are common", and averaging those
biased heads is most of FedAvg's client drift. Training on ``logits + tau * log(prior)`` (balanced softmax /
logit adjustment) lets the raw logits model the class-conditional evidence instead, which averages well.
The prior never leaves the device; at inference the raw logits are used, so nothing changes downstream.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

ABSENT_COUNT = 0.01  # pseudo-count of a class the device has no sample of: strongly, not infinitely, masked


def _labels(dataset: Dataset) -> torch.Tensor:
    """Every label of ``dataset`` without loading its images where the dataset allows it."""
    if hasattr(dataset, "snapshot"):  # SampleBuffer
        dataset = dataset.snapshot()
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].reshape(-1).long().cpu()
    if isinstance(dataset, Subset):
        inner = _labels(dataset.dataset)
        return inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).reshape(-1).long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def label_counts(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """Samples per class (float32, length ``num_classes``); a label outside the range is a ValueError."""
    labels = _labels(dataset)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}, the model has {num_classes} classes")
    return torch.bincount(labels, minlength=num_classes).float()


def logit_offset(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * log(prior)`` per class, with absent classes at a pseudo-count of :data:`ABSENT_COUNT`."""
    prior = counts.clamp_min(ABSENT_COUNT)
    return tau * torch.log(prior / prior.sum())
