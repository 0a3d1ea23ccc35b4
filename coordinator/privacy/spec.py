"""The job body's ``privacy`` object: strict validation, defaults, and noise calibration at job creation.

::

    "privacy": {"epsilon": 4.0,              # the budget (required): the job never releases more
                "delta": 1e-5,               # default 1e-5; keep it below 1 / number of devices
                "noise_multiplier": null,    # null: calibrated so that `rounds` rounds spend `epsilon`
                "clip": {"mode": "adaptive", # or "fixed"
                         "bound": 1.0,       # fixed bound, or the adaptive bound's starting value
                         "quantile": 0.5, "lr": 0.2,   # Andrew et al. 2021 target quantile and step size
                         "count_stddev": null}}        # noise on the unclipped count; null: max(K/20, 2 z)

The normalised object adds what the coordinator derived (``update_noise_multiplier``, ``rounds_within_budget``,
``sampling_probability`` = 1, i.e. no amplification claimed), so a job's record states exactly what it does.

With ``secure_aggregation`` (``distributed``) the devices add the noise (``distributed.py``): the clip is fixed
by default and adaptive clipping is refused (it needs one clipped/unclipped bit per device, which the
coordinator never sees); ``mechanism`` is ``"distributed"`` and ``update_noise_multiplier`` is what devices add.
"""
from __future__ import annotations

import math
from typing import Any

from coordinator.privacy import accountant
from coordinator.privacy.distributed import ADJACENCY_NOTE, MECHANISM, device_noise_multiplier

CLIP_MODES = ("fixed", "adaptive")
DEFAULT_DELTA = 1e-5
DEFAULT_CLIP = {"mode": "adaptive", "bound": 1.0, "quantile": 0.5, "lr": 0.2}
AMPLIFICATION_NOTE = ("none: devices are picked from those online, not sampled at random from a known "
                      "population, so no sampling amplification is claimed")


class PrivacySpecError(ValueError):
    """The ``privacy`` object is invalid; the message names the field."""


def _num(obj: dict[str, Any], key: str, default: Any, lo: float, hi: float, *, lo_open: bool = False,
         nullable: bool = False) -> Any:
    value = obj.get(key, default)
    where = f"privacy.{key}"
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PrivacySpecError(f"'{where}' must be a finite number{' or null' if nullable else ''}, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise PrivacySpecError(f"'{where}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _fields(obj: Any, allowed: set[str], path: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise PrivacySpecError(f"'{path}' must be an object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise PrivacySpecError(f"unknown field(s) {unknown} in '{path}'; allowed: {', '.join(sorted(allowed))}")
    return obj


def normalize_privacy(body: Any, rounds: int, clients_per_round: int, distributed: bool = False
                      ) -> dict[str, Any] | None:
    """Validate ``privacy`` (None: not a DP job) and derive the noise; PrivacySpecError names the bad field.
    ``distributed``: the job also has secure aggregation, so devices add the noise."""
    if body is None:
        return None
    body = _fields(body, {"epsilon", "delta", "noise_multiplier", "clip"}, "privacy")
    if "epsilon" not in body:
        raise PrivacySpecError("'privacy.epsilon' is required: the budget the job must not exceed")
    eps = _num(body, "epsilon", None, 0.0, 1e4, lo_open=True)
    delta = _num(body, "delta", DEFAULT_DELTA, 0.0, 0.1, lo_open=True)
    z_in = _num(body, "noise_multiplier", None, 0.0, accountant.MAX_NOISE_MULTIPLIER, lo_open=True, nullable=True)
    clip_in = _fields(body.get("clip", {}), {"mode", "bound", "quantile", "lr", "count_stddev"}, "privacy.clip")
    mode = clip_in.get("mode", "fixed" if distributed else DEFAULT_CLIP["mode"])
    if mode not in CLIP_MODES:
        raise PrivacySpecError(f"'privacy.clip.mode' must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if distributed and mode == "adaptive":
        raise PrivacySpecError("'privacy.clip.mode' 'adaptive' cannot be combined with 'secure_aggregation': "
                               "adaptive clipping (Andrew et al. 2021) counts the devices whose update was not "
                               "clipped, one bit per device, and under secure aggregation the coordinator never "
                               "sees one device's update; use {\"mode\": \"fixed\", \"bound\": C}")
    clip: dict[str, Any] = {"mode": mode, "bound": _clip_num(clip_in, "bound", 1e-6, 1e6)}
    if mode == "fixed":
        extra = sorted(set(clip_in) - {"mode", "bound"})
        if extra:
            raise PrivacySpecError(f"'privacy.clip' field(s) {extra} only apply to mode 'adaptive'")
    try:
        z = z_in if z_in is not None else accountant.calibrate_noise(eps, delta, rounds, distributed=distributed)
    except ValueError as exc:
        raise PrivacySpecError(f"'privacy': {exc}") from None
    allowed = accountant.rounds_within(eps, z, delta, rounds, distributed=distributed)
    if allowed == 0:
        raise PrivacySpecError(f"'privacy': one round with noise_multiplier {z:g} already spends epsilon "
                               f"{accountant.epsilon(z, 1, delta, distributed=distributed):.3g} > {eps:g}; raise "
                               "the noise multiplier or the budget")
    if distributed:
        return {"epsilon": eps, "delta": delta, "noise_multiplier": z, "update_noise_multiplier":
                device_noise_multiplier(z), "calibrated": z_in is None, "clip": clip, "rounds_within_budget": allowed,
                "sampling_probability": 1.0, "amplification": AMPLIFICATION_NOTE, "mechanism": MECHANISM,
                "adjacency": ADJACENCY_NOTE}
    z_update = z
    if mode == "adaptive":
        clip["quantile"] = _clip_num(clip_in, "quantile", 0.0, 1.0)
        clip["lr"] = _clip_num(clip_in, "lr", 0.0, 10.0)
        sigma_b = clip_in.get("count_stddev")
        if sigma_b is None:
            sigma_b = max(clients_per_round / 20.0, 2.0 * z)
        sigma_b = _num({"clip.count_stddev": sigma_b}, "clip.count_stddev", None, 0.0, 1e9, lo_open=True)
        if 2.0 * sigma_b <= z:
            raise PrivacySpecError(f"'privacy.clip.count_stddev' {sigma_b:g} is too small for noise multiplier "
                                   f"{z:g}: adaptive clipping needs count_stddev > z / 2 (Andrew et al. 2021); "
                                   f"use at least {z:g} or leave it out")
        clip["count_stddev"] = sigma_b
        z_update = (z ** -2 - (2.0 * sigma_b) ** -2) ** -0.5  # the update's share of the round's noise budget
    return {"epsilon": eps, "delta": delta, "noise_multiplier": z, "update_noise_multiplier": z_update,
            "calibrated": z_in is None, "clip": clip, "rounds_within_budget": allowed,
            "sampling_probability": 1.0, "amplification": AMPLIFICATION_NOTE}


def _clip_num(clip_in: dict[str, Any], key: str, lo: float, hi: float) -> float:
    return _num({f"clip.{key}": clip_in.get(key, DEFAULT_CLIP[key])}, f"clip.{key}", None, lo, hi)
