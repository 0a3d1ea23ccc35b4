"""Distributed DP noise in the ring: each device adds Skellam noise, so the sum carries Skellam noise.

Skellam(mu) = Poisson(mu/2) - Poisson(mu/2) is closed under addition (Agarwal, Kairouz, Liu 2021), so if
each of at least ``t`` surviving devices adds variance ``sigma^2 / t``, the sum carries at least
``sigma^2`` whatever subset survives, and no party (not even the coordinator) sees a noise-free sum.
``sigma = z * sensitivity`` with the L2 sensitivity of one device's encoded vector in ring units,
``clip * scale + sqrt(k) / 2`` (the rounding can lengthen it by half a unit per coordinate).
Accounting (``coordinator/privacy/distributed.py``): a DP job charges each round as a Gaussian of multiplier
slightly below ``z``, an upper bound on the Skellam sum's RDP (Agarwal et al. 2021) as long as the ring is
fine enough: rounds with noise refuse ``clip * scale < MIN_NOISY_SENSITIVITY``.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

# numpy's Poisson sampler (PTRS) matches the requested variance to within sampling error up to ~1e14 and
# drifts beyond (12 % too high at 1.6e15); rounds keep each device's variance at or below this:
MAX_DEVICE_VARIANCE = 1e12
# the accounting's bound on the Skellam surcharge assumes one update spans at least this many ring units
# (relative surcharge 9 / (4 z^2 S^2) <= 1.4e-7 / z^2); typical rounds have S of 1e5-1e7
MIN_NOISY_SENSITIVITY = 2.0 ** 12


def sensitivity(clip: float, scale: float, k: int) -> float:
    return clip * scale + 0.5 * math.sqrt(k)


def max_scale(noise_multiplier: float, clip: float, min_devices: int) -> float:
    """The largest ring scale at which each device's share of the noise stays within MAX_DEVICE_VARIANCE
    (a coarser grid costs nothing: the noise std is then still >= 1e6 times the rounding step)."""
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(MAX_DEVICE_VARIANCE * max(1, min_devices)) / (noise_multiplier * clip)


def per_device_variance(noise_multiplier: float, clip: float, scale: float, k: int, min_devices: int) -> float:
    return (noise_multiplier * sensitivity(clip, scale, k)) ** 2 / max(1, min_devices)


def skellam(variance: float, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``k`` Skellam samples of the given variance, int64; seeded from the OS's CSPRNG unless ``rng``."""
    if variance <= 0:
        return np.zeros(k, dtype=np.int64)
    rng = rng or np.random.default_rng(secrets.randbits(128))
    half = variance / 2.0
    return rng.poisson(half, k).astype(np.int64) - rng.poisson(half, k).astype(np.int64)


def effective_noise_multiplier(noise_multiplier: float, survivors: int, min_devices: int) -> float:
    """The noise multiplier the round's sum actually carries: ``survivors`` devices each added
    ``1/min_devices`` of the target variance."""
    return noise_multiplier * math.sqrt(survivors / max(1, min_devices))
