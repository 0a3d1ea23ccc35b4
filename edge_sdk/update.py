"""Turning a local model delta into the bytes a device sends: error feedback, then the round's codec.

Shared by ``EdgeClient`` and the benchmarks so that what is measured is what devices do.

BatchNorm running statistics are averaged state, not accumulating parameters: feeding back what a sparse
codec left out of them lets residuals pile up until a running variance turns negative and the model emits
NaN. So those coordinates never use the residual (they are sent fresh each round: when selected, or all of
them in the dense block of a spec with ``stats``, see ``protocol/stats_block.py``).

Metrics are rounded to 4 significant digits (:func:`wire_metrics`): wire v3 carries them as float32, which
holds those digits exactly, so what a device reports is what the coordinator stores.
"""
from __future__ import annotations

import numpy as np

from .dp_clip import clip_encoded
from .error_feedback import ResidualStore
from .protocol import codecs
from .protocol.codecs import Decoded
from .protocol.modelfile import Arrays, is_float

_STAT_SUFFIXES = ("running_mean", "running_var")
METRIC_DIGITS = 4  # significant digits of the display-only metrics a device reports


def wire_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics rounded to ``METRIC_DIGITS`` significant digits (they are dashboards' numbers, not state)."""
    return {k: float(f"{float(v):.{METRIC_DIGITS}g}") for k, v in metrics.items()}


def statistics_mask(arrays: Arrays) -> np.ndarray:
    """Boolean mask over update coordinates that belong to BatchNorm running statistics."""
    parts = [np.full(a.size, name.endswith(_STAT_SUFFIXES)) for name, a in arrays.items() if is_float(a)]
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def clamp_variances(arrays: Arrays) -> int:
    """Clamp aggregated BatchNorm ``running_var`` at 0 in place; returns how many entries were negative.

    A lossy codec (int8 blocks, sparse selection) applied to large statistics deltas can carry a variance just
    below zero; BatchNorm then takes the square root of a negative number and the model outputs NaN."""
    clamped = 0
    for name, a in arrays.items():
        if name.endswith("running_var") and is_float(a):
            neg = int((a < 0).sum())
            if neg:
                clamped += neg
                arrays[name] = np.maximum(a, 0).astype(a.dtype)
    return clamped


def encode_delta(spec: dict, delta: np.ndarray, layout_sizes: list[int], residuals: ResidualStore | None,
                 job_id: str, stats: np.ndarray | None = None, clip_bound: float | None = None
                 ) -> tuple[bytes, Decoded]:
    """Codec payload for ``delta`` (local - global), applying and updating error feedback when enabled.

    ``stats``: the :func:`statistics_mask` of the model (required by a spec with a ``stats`` block).
    ``clip_bound`` (differential privacy): the transmitted vector is scaled to at most this L2 norm
    (``dp_clip``); the residual keeps only what the codec dropped, not what clipping removed."""
    delta = np.asarray(delta, dtype=np.float32)
    if residuals is None or not codecs.uses_error_feedback(spec):
        encoded = codecs.encode(spec, delta, layout_sizes, stats)
        return encoded if clip_bound is None else clip_encoded(spec, delta, layout_sizes, clip_bound, encoded, stats)
    corrected = residuals.apply(job_id, delta)
    if stats is not None and stats.any():
        corrected[stats] = delta[stats]
    payload, sent = codecs.encode(spec, corrected, layout_sizes, stats)
    residuals.update(job_id, corrected, sent)
    if clip_bound is not None:
        return clip_encoded(spec, corrected, layout_sizes, clip_bound, (payload, sent), stats)
    return payload, sent
