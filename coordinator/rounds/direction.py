"""Screening each update's direction against the direction the federation already moves in.

Why: clipping bounds how *far* one device moves the model, not *where*. A 20 % minority that sends its honest
update sign-flipped and scaled is clipped to the honest norm, yet still cancels the progress of as many honest
devices every round (and the classes the attackers hold are unlearned first): 5.4 points behind the clean run
in ``BENCHMARKS.md`` (robustness). A mean cannot tell such an update apart by its norm, only by its direction.

Rule (a cosine filter against a reference, in the spirit of FLTrust, Cao et al. 2021, but needing no server
data): the reference is the previous round's aggregated mean delta, i.e. the defended direction the model
actually moved in. An update whose cosine similarity to it is below ``min_cosine`` (default 0: it points
backwards) is kept out of the round's mean. Honest updates of consecutive rounds point roughly the same way
(they descend the same loss from nearby points), so in the benchmark's clean runs almost all pass.

Safeguards:

* No reference yet (a job's first round): every update passes; clipping alone bounds that round.
* Stale reference: if fewer than ``min_agree`` (default half) of the round's updates pass, the honest majority
  has changed direction (or the model was replaced); the round then uses every update, as clipping alone
  would. Counts, not weights, decide this, so an inflated ``num_samples`` claim cannot force the fallback.
* Either way the round's result becomes the next reference, so the reference follows the federation.

Memory: the reference (one float32 model-sized vector per job) plus, only once an update is held back, one
float64 running sum of held-back updates per round: O(model), whatever the number of devices. A sparse update
costs O(k): its cosine needs only the reference at its own indices and the norm of its values.

The reference is server state: ``Strategy.state()`` persists it with the adaptive clip bound after every
committed round, so a coordinator restart screens (and re-folds) exactly as before. See ``docs/security.md``
for what an attacker just above the threshold can still do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DIRECTION_MODES = ("cosine", "none")
DEFAULT_DIRECTION = {"mode": "cosine", "min_cosine": 0.0, "min_agree": 0.5, "momentum": 0.5}


def normalize_direction(spec: Any) -> dict[str, Any]:
    """Validate ``limits.direction`` and fill in defaults; ValueError names the bad field."""
    spec = DEFAULT_DIRECTION if spec is None else spec
    if not isinstance(spec, dict):
        raise ValueError("'limits.direction' must be an object")
    unknown = sorted(set(spec) - set(DEFAULT_DIRECTION))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in 'limits.direction'; allowed: {', '.join(sorted(DEFAULT_DIRECTION))}")
    mode = spec.get("mode", DEFAULT_DIRECTION["mode"])
    if mode not in DIRECTION_MODES:
        raise ValueError(f"'limits.direction.mode' must be one of {', '.join(DIRECTION_MODES)}, got {mode!r}")
    if mode == "none":
        return {"mode": "none"}
    out: dict[str, Any] = {"mode": mode}
    for key, lo, hi, lo_open in (("min_cosine", -1.0, 1.0, False), ("min_agree", 0.0, 1.0, True),
                                 ("momentum", 0.0, 0.99, False)):
        value = spec.get(key, DEFAULT_DIRECTION[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"'limits.direction.{key}' must be a finite number, got {value!r}")
        if not (lo < value if lo_open else lo <= value) or value > hi:
            raise ValueError(f"'limits.direction.{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
        out[key] = float(value)
    return out


@dataclass
class DirectionReference:
    """Per-job state: the previous round's aggregated mean delta (None: no round aggregated yet)."""

    active: bool = False
    min_cosine: float = 0.0
    min_agree: float = 0.5
    momentum: float = 0.0
    vector: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, spec: dict[str, Any] | None) -> DirectionReference:
        norm = normalize_direction(spec)
        if norm["mode"] == "none":
            return cls()
        return cls(True, norm["min_cosine"], norm["min_agree"], norm["momentum"])

    def screen(self, numel: int) -> RoundScreen:
        """A fresh per-round screen against the current reference."""
        ref = self.vector if self.active and self.vector is not None and self.vector.size == numel else None
        return RoundScreen(self, ref, numel)

    def set(self, delta: np.ndarray) -> None:
        """Adopt a round's aggregated mean delta as the next reference (ignored if not finite or all zero)."""
        if not self.active:
            return
        vec = np.asarray(delta, dtype=np.float32)
        if not (np.isfinite(vec).all() and np.any(vec)):
            return
        if self.vector is None or self.vector.shape != vec.shape or self.momentum == 0.0:
            self.vector = vec.copy()
        else:
            self.vector = (self.momentum * self.vector + (1.0 - self.momentum) * vec).astype(np.float32)

    def state(self) -> dict[str, Any]:
        """Summary for logs and benchmark records (the vector itself is persisted by the strategy)."""
        return {"mode": "cosine" if self.active else "none", "min_cosine": self.min_cosine,
                "min_agree": self.min_agree, "has_reference": self.vector is not None}


class RoundScreen:
    """One round's screening: counts passes, keeps the held-back updates' weighted sum for the fallback."""

    def __init__(self, owner: DirectionReference, ref: np.ndarray | None, numel: int) -> None:
        self.owner = owner
        self.numel = numel
        self.ref = None if ref is None else np.asarray(ref, dtype=np.float64)
        self.ref_norm = 0.0 if self.ref is None else float(np.linalg.norm(self.ref))
        self.seen = 0
        self.passed = 0
        self._held: np.ndarray | None = None  # allocated on the first held-back update only
        self.held_weight = 0.0

    def cosine(self, decoded: Any) -> float | None:
        """Cosine similarity of a dense or sparse update to the reference (None: no reference, or a zero vector)."""
        if self.ref is None or self.ref_norm == 0.0:
            return None
        values = np.asarray(decoded.values, dtype=np.float64)
        norm = float(np.linalg.norm(values)) if values.size else 0.0
        if norm == 0.0:
            return None
        ref = self.ref if decoded.indices is None else self.ref[np.asarray(decoded.indices)]
        return float(np.dot(ref, values)) / (norm * self.ref_norm)

    def admits(self, decoded: Any) -> bool:
        """Whether the (already clipped) update joins the round's mean; counted for the stale-reference rule."""
        cos = self.cosine(decoded)
        ok = cos is None or cos >= self.owner.min_cosine
        self.seen += 1
        self.passed += int(ok)
        return ok

    def hold(self, decoded: Any, weight: float) -> None:
        """Keep a rejected update's weighted values, in case the round falls back to using every update."""
        if self._held is None:
            self._held = np.zeros(self.numel, dtype=np.float64)
        values = np.asarray(decoded.values)
        if decoded.indices is None:
            self._held += values * np.float64(weight)
        elif values.size:
            self._held[np.asarray(decoded.indices)] += values * np.float64(weight)
        self.held_weight += weight

    @property
    def fallback(self) -> bool:
        """Too few updates agreed with the reference: it is stale, and the round uses every update."""
        return self.seen > 0 and self.passed < self.owner.min_agree * self.seen

    def merge(self, total: np.ndarray, weight: float) -> tuple[np.ndarray, float]:
        """The round's (weighted sum, total weight) after screening; does not change the screen."""
        if self.fallback and self._held is not None:
            return total + self._held, weight + self.held_weight
        return total, weight

    def stats(self) -> dict[str, Any]:
        return {"seen": self.seen, "passed": self.passed, "fallback": self.fallback}
