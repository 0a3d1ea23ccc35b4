"""Fixed-point encoding of clipped updates into the ring Z_{2^32}, where masks are added and cancel.

Why a ring: masks are uniform over Z_{2^32}, so a masked value is uniform too and tells its reader nothing;
the sum of n masked values is the sum of the encoded values modulo 2^32. Overflow is ruled out by the
scale, not by luck: every device clips its vector to L2 norm ``clip`` (so each coordinate is within
``[-clip, clip]``), and the scale leaves room for ``max_devices`` such vectors, their rounding, and the
distributed noise's tails (``noise_std`` in ring units, 12 standard deviations), inside ``[-2^31, 2^31)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
HALF = 1 << (RING_BITS - 1)
NOISE_TAIL_STDS = 12.0  # Skellam tails beyond 12 sigma have probability < 1e-30


def clip_l2(values: np.ndarray, clip: float) -> np.ndarray:
    """``values`` scaled down to L2 norm ``clip`` if longer (float64 copy)."""
    out = np.asarray(values, dtype=np.float64).copy()
    norm = float(np.linalg.norm(out))
    if norm > clip > 0:
        out *= clip / norm
    return out


@dataclass(frozen=True)
class FixedPoint:
    """``scale`` ring units per unit of update; encode/decode between float vectors and uint32 ring vectors."""

    clip: float
    max_devices: int
    scale: float

    @classmethod
    def for_round(cls, clip: float, max_devices: int, k: int, noise_multiplier: float = 0.0,
                  min_devices: int = 1, max_scale: float = math.inf) -> "FixedPoint":
        """The largest scale at which the sum of ``max_devices`` clipped vectors plus noise cannot wrap.

        With noise multiplier ``z`` the total noise std in ring units is ``z * (clip*scale + sqrt(k)/2)``
        (see ``noise.py``), spread over at least ``min_devices`` devices, so the worst case is
        ``n*(clip*scale + 1/2) + 12 * z * (clip*scale + sqrt(k)/2) * sqrt(n / min_devices) < 2^31``.
        ``max_scale`` caps it (the noise sampler's range, ``noise.max_scale``).
        """
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a positive finite number, got {clip}")
        if max_devices < 1 or min_devices < 1 or k < 0:
            raise ValueError("max_devices and min_devices must be >= 1 and k >= 0")
        tail = NOISE_TAIL_STDS * noise_multiplier * math.sqrt(max_devices / min_devices)
        budget = (HALF - 1) - max_devices * 0.5 - tail * 0.5 * math.sqrt(k)
        scale = budget / (clip * (max_devices + tail))
        if scale < 1.0:
            raise ValueError(f"no room in a 2^{RING_BITS} ring for {max_devices} devices at clip {clip} "
                             f"and noise multiplier {noise_multiplier}; lower the clip bound or the noise")
        return cls(clip=float(clip), max_devices=int(max_devices), scale=float(math.floor(min(scale, max_scale))))

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Round ``clip_l2(values)`` to ring units, as uint32 (negative numbers in two's complement)."""
        q = np.rint(clip_l2(values, self.clip) * self.scale).astype(np.int64)
        return q.astype(np.uint32)  # wraps modulo 2^32: two's complement for negatives

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """The float sum behind a ring sum (uint32, interpreted as signed 32-bit)."""
        return np.asarray(ring_sum, dtype=np.uint32).view(np.int32).astype(np.float64) / self.scale

    def decode_one(self, ring_vec: np.ndarray) -> np.ndarray:
        """What one encoded vector stands for (the device's error feedback uses this)."""
        return self.decode_sum(ring_vec)

    @property
    def resolution(self) -> float:
        """The largest rounding error per coordinate of one device's encoding."""
        return 0.5 / self.scale
