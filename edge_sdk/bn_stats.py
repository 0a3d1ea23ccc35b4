"""BatchNorm running statistics that survive federation (torch).

Why: a BatchNorm layer trains on batch statistics but evaluates (and exports to ONNX) with its *running*
statistics, an exponential average updated with ``momentum`` once per training step. torchvision builds
MobileNetV3 and EfficientNet with ``momentum=0.01``: a device that trains a few dozen steps per round moves
them about 1 - 0.99**steps of the way from their initial (0, 1) towards the real activations, FedAvg
averages those half-moved values, and the eval-mode model stays broken (one class for every image) long after
the weights are good. Raising the momentum only shrinks the lag; it never removes it, and it ties eval
correctness to the number of local steps.

The fix used by :class:`edge_sdk.trainer.LocalTrainer`: after the round's last optimiser step, reset the
statistics of every BatchNorm that trained and re-estimate them with one no-grad forward pass over the local
data, using a cumulative average (``momentum=None``). The update then carries this device's exact statistics
for its final weights, and FedAvg's sample-weighted mean of them is the mean over all devices' data.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


def training_batchnorms(model: nn.Module) -> list[BatchNorm]:
    """BatchNorm layers in train mode that track running statistics (frozen, eval-mode ones are left alone)."""
    return [m for m in model.modules()
            if isinstance(m, BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, norms: list[BatchNorm], batches: Iterable[torch.Tensor],
                          max_samples: int | None = None) -> int:
    """Replace the running statistics of ``norms`` by their cumulative average over ``batches``.

    ``model`` runs forward in its current (train) mode, so every other layer behaves as in training; the
    momentum of each layer is restored afterwards. Returns the number of samples used (0 leaves the statistics
    untouched: with no data there is nothing better than what they were).
    """
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]  # type: ignore[union-attr]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    seen = 0
    try:
        for x in batches:
            if max_samples is not None and seen >= max_samples:
                break
            if len(x) < 2:  # BatchNorm cannot take statistics of a single sample
                continue
            model(x)
            seen += len(x)
    finally:
        for m, momentum, mean, var in saved:
            m.momentum = momentum
            if seen == 0:
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(var)  # type: ignore[union-attr]
    return seen
