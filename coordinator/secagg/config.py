"""The job field ``secure_aggregation``: strict validation and what devices are told in each task.

    "secure_aggregation": {"clip": 10.0, "neighbours": 16, "noise_multiplier": 0.0, "phase_timeout_s": 30}

``null`` or absent: off. Under secure aggregation the coordinator never sees one update, so whatever needs
one update is refused here with the reason: top-k (its index set depends on the device's data and would be
sent in the clear), value codings other than the 32-bit ring, robust strategies (trimmed mean and median
need every update), and fewer than two devices (the "sum" of one device is its update).

With ``privacy`` as well, the privacy spec drives the devices' noise and clip (``coordinator/privacy/
distributed.py``): ``clip`` becomes ``privacy.clip.bound`` and ``noise_multiplier`` the calibrated one, so
neither may be set here.
"""
from __future__ import annotations

import math
from typing import Any

FIELDS = {"clip", "neighbours", "noise_multiplier", "phase_timeout_s"}
DEFAULTS = {"clip": 10.0, "neighbours": 16, "noise_multiplier": 0.0, "phase_timeout_s": 30.0}
ROBUST = ("trimmed_mean", "median")


def _number(value: Any, name: str, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"'secure_aggregation.{name}' must be {'an integer' if integer else 'a number'}, "
                         f"got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"'secure_aggregation.{name}' must be in [{lo:g}, {hi:g}], got {value!r}")
    return value


def normalize_secure_aggregation(value: Any, codec: dict[str, Any], strategy: dict[str, Any],
                                 min_clients: int, privacy: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The normalised field (defaults filled in) or None; ValueError says what to change. ``privacy``: the
    normalised DP spec, which then sets ``clip`` and ``noise_multiplier``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("'secure_aggregation' must be an object (or null to turn it off)")
    unknown = sorted(set(value) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in 'secure_aggregation'; allowed: {', '.join(sorted(FIELDS))}")
    name = codec.get("name")
    if name == "topk":
        raise ValueError("codec 'topk' is not offered under secure aggregation: each device's top-k index set depends "
                         "on its data and would travel in the clear; use codec 'randk' (every device of a round "
                         "sends the same seeded coordinates, so masking runs over k values)")
    if name != "randk":
        raise ValueError(f"secure aggregation needs codec 'randk' (got {name!r}); for a dense upload use randk with "
                         "density 1.0")
    if codec.get("values", "float32") != "float32" or codec.get("stochastic"):
        raise ValueError("under secure aggregation values are sent as 32-bit fixed point in the masking ring; "
                         "leave codec.values at 'float32' (and stochastic off)")
    if strategy.get("name") in ROBUST:
        raise ValueError(f"strategy {strategy['name']!r} needs every device's update, which secure aggregation "
                         "hides; use fedavg, fedprox, fedadam or fedyogi")
    if min_clients < 2:
        raise ValueError("secure aggregation needs min_clients >= 2: the sum of a single device is its update")
    if privacy is not None:
        given = sorted({"clip", "noise_multiplier"} & set(value))
        if given:
            raise ValueError(f"'secure_aggregation' field(s) {given} cannot be set with 'privacy': the devices clip "
                             "to 'privacy.clip.bound' and add the noise calibrated from 'privacy' (epsilon, delta, "
                             "noise_multiplier); set them there")
        if privacy["update_noise_multiplier"] > 100.0:
            raise ValueError(f"'privacy' calls for noise multiplier {privacy['update_noise_multiplier']:.4g} on the "
                             "devices, more than the 100 the secure-aggregation ring is sized for; allow a larger "
                             "epsilon or fewer rounds")
        value = {**value, "clip": privacy["clip"]["bound"], "noise_multiplier": privacy["update_noise_multiplier"]}
    out = {**DEFAULTS, **value}
    out["clip"] = float(_number(out["clip"], "clip", 1e-6, 1e6))
    out["neighbours"] = int(_number(out["neighbours"], "neighbours", 2, 10_000, integer=True))
    out["noise_multiplier"] = float(_number(out["noise_multiplier"], "noise_multiplier", 0.0, 100.0))
    out["phase_timeout_s"] = float(_number(out["phase_timeout_s"], "phase_timeout_s", 0.5, 3600.0))
    return out


def min_survivors(cfg: dict[str, Any]) -> int:
    """The fewest survivors any secure round of the job accepts (the noise is sized for at least this many)."""
    return max(2, int(cfg["min_clients"]))


def task_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a selected device needs to know before the roster arrives: the job's settings it checks the
    roster's noise against (``edge_sdk/secagg/terms.py``), so it never takes the stated variance on trust."""
    sa = cfg["secure_aggregation"]
    return {"clip": sa["clip"], "phase_timeout_s": sa["phase_timeout_s"], "noise_multiplier": sa["noise_multiplier"],
            "neighbours": sa["neighbours"], "min_survivors": min_survivors(cfg),
            "max_devices": int(cfg["clients_per_round"])}
