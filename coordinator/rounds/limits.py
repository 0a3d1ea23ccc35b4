"""Per-job limits on what one device can do to the model: a cap on its claimed sample count, the weighting
rule, and server-side L2 clipping of its update.

Why: ``num_samples`` is the device's own claim and the FedAvg weight; unchecked, one device reporting 1e15
samples replaces the global model with its own. The cap bounds the claim, ``"uniform"`` ignores it, and
clipping bounds the update's magnitude, so a device's influence on a round is at most ``weight share x C``.
The direction screen (``direction.py``) keeps updates that point against the federation's last step out of
the round's mean, which clipping alone cannot do.

Job body field ``"limits"`` (all optional)::

    {"max_num_samples": 10000, "weighting": "num_samples" | "uniform",
     "clip": {"mode": "adaptive" | "fixed" | "none", "bound": 1.0, "quantile": 0.5, "lr": 0.5,
              "step": "update" | "round"},
     "direction": {"mode": "cosine" | "none", "min_cosine": 0.0, "min_agree": 0.5}}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from coordinator.rounds.clipping import CLIP_MODES, ClipBound, RoundClipper, make_bound
from coordinator.rounds.direction import DirectionReference, normalize_direction

WEIGHTINGS = ("num_samples", "uniform")
DEFAULT_MAX_NUM_SAMPLES = 10_000
DEFAULT_WEIGHTING = "uniform"
DEFAULT_CLIP = {"mode": "adaptive", "bound": 10.0, "quantile": 0.5, "lr": 0.5, "step": "update"}
CLIP_STEPS = ("update", "round")


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"'{where}' must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"'{where}' must be in [{lo}, {hi}], got {value}")
    return float(value)


def normalize_limits(body: Any) -> dict[str, Any]:
    """Validate the job's ``limits`` object and fill in defaults; ValueError names the bad field."""
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ValueError("'limits' must be an object")
    unknown = sorted(set(body) - {"max_num_samples", "weighting", "clip", "direction"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in 'limits'; allowed: clip, direction, max_num_samples, "
                         "weighting")
    cap = body.get("max_num_samples", DEFAULT_MAX_NUM_SAMPLES)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 2**53:
        raise ValueError(f"'limits.max_num_samples' must be an integer in [1, 2**53], got {cap!r}")
    weighting = body.get("weighting", DEFAULT_WEIGHTING)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"'limits.weighting' must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    clip_in = body.get("clip", DEFAULT_CLIP)
    if not isinstance(clip_in, dict):
        raise ValueError("'limits.clip' must be an object")
    unknown = sorted(set(clip_in) - {"mode", "bound", "quantile", "lr", "step"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in 'limits.clip'; allowed: bound, lr, mode, quantile, step")
    mode = clip_in.get("mode", DEFAULT_CLIP["mode"])
    if mode not in CLIP_MODES:
        raise ValueError(f"'limits.clip.mode' must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    clip: dict[str, Any] = {"mode": mode}
    if mode in ("fixed", "adaptive"):
        clip["bound"] = _number(clip_in.get("bound", DEFAULT_CLIP["bound"]), "limits.clip.bound", 1e-6, 1e6)
    if mode == "adaptive":
        clip["quantile"] = _number(clip_in.get("quantile", DEFAULT_CLIP["quantile"]), "limits.clip.quantile",
                                   0.0, 1.0)
        clip["lr"] = _number(clip_in.get("lr", DEFAULT_CLIP["lr"]), "limits.clip.lr", 0.0, 10.0)
        clip["step"] = clip_in.get("step", DEFAULT_CLIP["step"])
        if clip["step"] not in CLIP_STEPS:
            raise ValueError(f"'limits.clip.step' must be one of {', '.join(CLIP_STEPS)}, got {clip['step']!r}")
    return {"max_num_samples": cap, "weighting": weighting, "clip": clip,
            "direction": normalize_direction(body.get("direction"))}


@dataclass
class UpdateLimits:
    """The job's limits as objects; the clip bound is state that lives across the job's rounds."""

    max_num_samples: int | None = None
    weighting: str = "num_samples"
    bound: ClipBound = field(default_factory=ClipBound)
    direction: DirectionReference = field(default_factory=DirectionReference)

    @classmethod
    def from_config(cls, limits: dict[str, Any] | None) -> UpdateLimits:
        """From a stored job config's ``limits`` (None: the defaults, so jobs created before limits existed
        are protected too)."""
        norm = normalize_limits(limits)
        return cls(norm["max_num_samples"], norm["weighting"], make_bound(norm["clip"]),
                   DirectionReference.from_config(norm["direction"]))

    def weight(self, num_samples: int) -> float:
        """The aggregation weight of an update whose device claims ``num_samples``."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if self.weighting == "uniform":
            return 1.0
        return float(min(num_samples, self.max_num_samples) if self.max_num_samples else num_samples)

    def clipper(self) -> RoundClipper:
        return RoundClipper(self.bound)

