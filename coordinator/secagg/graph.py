"""Who shares secrets and masks with whom: everyone (Bonawitz 2017) or a k-regular graph (SecAgg+).

With n devices in a complete graph each device does O(n) key agreements and Shamir evaluations and the
coordinator rebuilds secrets from O(n) shares each, which is O(n^2) work in pure-Python GF(2^128). Past
``degree + 1`` devices the round instead uses a Harary (circulant) graph over a permutation drawn from the
round seed: each device is joined to ``degree`` others, as in Bell et al. 2020 (SecAgg+). Masks still cancel
pairwise, and each secret is held by the device's neighbourhood, so costs grow as O(n * degree).
"""
from __future__ import annotations

import random


def neighbours(devices: list[str], degree: int, seed: int) -> dict[str, list[str]]:
    """Each device's neighbours (symmetric, self excluded, sorted)."""
    devices = sorted(devices)
    n = len(devices)
    if n - 1 <= degree:
        return {d: [e for e in devices if e != d] for d in devices}
    order = devices[:]
    random.Random(seed).shuffle(order)
    half = max(1, degree // 2)
    out: dict[str, set[str]] = {d: set() for d in devices}
    for i, d in enumerate(order):
        for step in range(1, half + 1):
            e = order[(i + step) % n]
            out[d].add(e)
            out[e].add(d)
    return {d: sorted(v) for d, v in out.items()}
