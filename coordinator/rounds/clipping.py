"""Server-side L2 clipping of client updates: a fixed bound, or one that tracks a quantile of update norms.

Why: a device can send any finite vector that passes validation. Scaling every update down to at most
norm ``C`` caps how far one device can move the global model in a round, whatever it sends.

The adaptive bound follows Andrew et al. 2021 ("Differentially Private Learning with Adaptive Clipping"):
after each round, with ``b`` the fraction of updates whose norm was ``<= C``, the bound moves geometrically,
``C <- C * exp(-lr * (b - quantile))``. More updates under the bound than the target quantile means the bound
is looser than needed and it shrinks; fewer means it grows. Malicious updates in a minority cannot drag a
median-targeting bound up, since each counts once however large its norm is.

Built to be reused by differential privacy (clip + Gaussian noise): :func:`clip_update` is the clipping
step on its own, and :meth:`AdaptiveBound.update` takes the unclipped fraction as an argument so that a DP
aggregator can pass a *noised* fraction instead of the exact count. Sparse updates are clipped on their
decoded values only: their L2 norm is the norm of the non-zero values, so nothing is densified.
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

CLIP_MODES = ("none", "fixed", "adaptive")


@dataclass
class ClippedUpdate:
    """A clipped copy of a decoded update (same shape: dense values, or sorted unique indices + values)."""

    indices: np.ndarray | None
    values: np.ndarray


def l2_norm(values: np.ndarray) -> float:
    """Norm in float64 so that huge-but-finite float32 values do not overflow to inf."""
    v = np.asarray(values, dtype=np.float64)
    return float(math.sqrt(float(np.dot(v, v)))) if v.size else 0.0


def clip_values(values: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``values`` scaled by ``min(1, bound / norm)`` (float32) and the norm before clipping."""
    norm = l2_norm(values)
    if norm <= bound or norm == 0.0:
        return np.asarray(values, dtype=np.float32), norm
    scaled = np.asarray(values, dtype=np.float64) * (bound / norm)
    return scaled.astype(np.float32), norm


def clip_update(decoded: Any, bound: float) -> tuple[ClippedUpdate, float]:
    """Clip a ``Decoded``-like update (dense or sparse) to L2 norm ``bound``; returns (clipped, norm)."""
    values, norm = clip_values(decoded.values, bound)
    return ClippedUpdate(decoded.indices, values), norm


@dataclass
class ClipBound:
    """A fixed bound (``bound=inf`` disables clipping). ``update`` is a no-op; see :class:`AdaptiveBound`."""

    bound: float = math.inf

    @property
    def active(self) -> bool:
        return math.isfinite(self.bound)

    def update(self, unclipped_fraction: float) -> float:
        return self.bound

    def state(self) -> dict[str, Any]:
        return {"mode": "fixed" if self.active else "none", "bound": self.bound if self.active else None}


@dataclass
class AdaptiveBound(ClipBound):
    """Geometric quantile tracking (Andrew et al. 2021); ``bound`` is the current value.

    ``step="round"`` is the paper's rule, one step per round from the round's unclipped fraction (what DP needs,
    with a noised fraction). ``step="update"`` takes one step per accepted update with ``b`` in {0, 1}, so a
    starting bound far from the real norms (they differ by orders of magnitude between models, codecs and error
    feedback) is corrected in one round instead of clipping honest updates to nothing for many. The steps are
    taken at the round's close, over the round's norms in an order fixed by their values (``RoundClipper``): every
    update of a round is clipped against the bound the round opened with, so the round's aggregate depends on
    which updates arrived, never on the order the network delivered them. A minority still cannot drag it: the
    bound settles where a ``quantile`` fraction of updates is below it.
    """

    quantile: float = 0.5
    lr: float = 0.5
    min_bound: float = 1e-6
    max_bound: float = 1e6
    step: str = "round"

    def update(self, unclipped_fraction: float) -> float:
        """One round's step from the fraction of updates with norm <= bound (exact, or noised by DP)."""
        b = min(max(float(unclipped_fraction), 0.0), 1.0)
        self.bound = min(max(self.bound * math.exp(-self.lr * (b - self.quantile)), self.min_bound), self.max_bound)
        return self.bound

    def state(self) -> dict[str, Any]:
        return {"mode": "adaptive", "bound": self.bound, "quantile": self.quantile, "lr": self.lr, "step": self.step}


def make_bound(spec: dict[str, Any] | None) -> ClipBound:
    """Normalised clip spec (see ``coordinator.rounds.limits``) -> a fresh bound object."""
    spec = spec or {"mode": "none"}
    mode = spec.get("mode", "none")
    if mode == "none":
        return ClipBound()
    if mode == "fixed":
        return ClipBound(float(spec["bound"]))
    if mode == "adaptive":
        return AdaptiveBound(float(spec["bound"]), quantile=float(spec["quantile"]), lr=float(spec["lr"]),
                             step=str(spec.get("step", "round")))
    raise ValueError(f"unknown clip mode {mode!r}; valid: {', '.join(CLIP_MODES)}")


def _replay_key(norm: float) -> bytes:
    return hashlib.blake2b(struct.pack("<d", norm), digest_size=8).digest()


class RoundClipper:
    """Clips every update of one round against the bound the round opened with, and counts how many were
    already within it; an adaptive bound moves only in :meth:`end_round`, so arrival order cannot matter."""

    def __init__(self, bound: ClipBound) -> None:
        self.bound = bound
        self.seen = 0
        self.unclipped = 0
        self.max_norm = 0.0
        self.norms: list[float] = []  # per-update steps replay these at the close

    @property
    def _per_update(self) -> bool:
        return isinstance(self.bound, AdaptiveBound) and self.bound.step == "update"

    def clip(self, decoded: Any) -> Any:
        if not self.bound.active:
            return decoded
        clipped, norm = clip_update(decoded, self.bound.bound)
        self.seen += 1
        self.unclipped += int(norm <= self.bound.bound)
        self.max_norm = max(self.max_norm, norm)
        if self._per_update:
            self.norms.append(norm)
        return clipped

    def unclipped_fraction(self) -> float | None:
        return self.unclipped / self.seen if self.seen else None

    def end_round(self) -> None:
        """Adapt the bound to this round's norms (no-op for a fixed bound or an empty round).

        Per-update steps replay the round's norms in a pseudo-random order keyed by their values, each compared
        with the bound as it has moved so far: the result depends on the set of norms, not on the order they
        arrived in, and it behaves like steps in arrival order (a sorted replay would end every round on the
        largest norms and bias the bound upwards)."""
        if self._per_update:
            for norm in sorted(self.norms, key=_replay_key):
                self.bound.update(1.0 if norm <= self.bound.bound else 0.0)
            self.norms.clear()
            return
        frac = self.unclipped_fraction()
        if frac is not None:
            self.bound.update(frac)
