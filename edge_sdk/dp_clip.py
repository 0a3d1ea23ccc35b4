"""Client-level DP on the device: clip what is actually transmitted to the round's L2 bound.

With a sparse or quantised codec the vector that leaves the device is the codec's output, not the local
delta, so the bound is enforced on the decoded payload: encode, measure the sent values, and if their norm
exceeds the bound re-encode the input scaled down (top-k keeps the same coordinates, random-k uses the
round's mask; int8/fp16 rounding can move the norm a little, hence the short loop). The coordinator clips
again anyway: it never relies on this.

Error feedback: the residual is what the *codec* left out (computed from the unclipped encoding by the
caller); what clipping removes is not fed back, or the residual would grow without bound whenever updates
are clipped. The residual never leaves the device.
"""
from __future__ import annotations

import math

import numpy as np

from .protocol import codecs
from .protocol.codecs import Decoded

_MAX_TRIES = 8


def sent_norm(sent: Decoded) -> float:
    v = np.asarray(sent.values, dtype=np.float64)
    return float(math.sqrt(float(np.dot(v, v)))) if v.size else 0.0


def clip_encoded(spec: dict, vec: np.ndarray, layout_sizes: list[int], bound: float,
                 encoded: tuple[bytes, Decoded] | None = None, stats: np.ndarray | None = None
                 ) -> tuple[bytes, Decoded]:
    """Payload of ``vec`` whose decoded values have L2 norm <= ``bound`` (``encoded``: vec's plain encoding;
    ``stats``: the statistics mask a spec with a ``stats`` block needs)."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"clip bound must be a positive finite number, got {bound!r}")
    payload, sent = encoded if encoded is not None else codecs.encode(spec, vec, layout_sizes, stats)
    norm = sent_norm(sent)
    scale = 1.0
    for _ in range(_MAX_TRIES):
        if norm <= bound:
            return payload, sent
        scale *= bound / norm * (1.0 - 1e-6)
        payload, sent = codecs.encode(spec, (np.asarray(vec, dtype=np.float64) * scale).astype(np.float32),
                                      layout_sizes, stats)
        norm = sent_norm(sent)
    if norm <= bound:
        return payload, sent
    return codecs.encode(spec, np.zeros_like(vec, dtype=np.float32), layout_sizes, stats)  # never send over the bound
