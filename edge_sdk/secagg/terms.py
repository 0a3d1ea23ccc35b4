"""What a device checks in a roster before it shares anything: the round must carry the noise the job promises.

Each roster states the fixed-point scale, the survivor floor ``t`` and the noise variance each device adds
(``sigma^2 / t``). Taken on trust, a coordinator that states a smaller variance, or a larger ``t``, strips the
sum of its noise and no device notices. So the device recomputes the variance from what it can check
itself (:class:`RoundTerms`): the job's settings that came with its task (noise multiplier, clip,
``min_clients``, ``neighbours``, ``clients_per_round``), its own ``k`` (from the codec seed and the model) and
the roster's size; and :func:`refusal` names the first thing that would give less noise than that. The
device then takes no further part: no shares, no masked input.

What it cannot check (docs/secagg.md): in a neighbour graph a device sees only its neighbourhood, so it
bounds the number of devices in the round by ``clients_per_round``, not by how many actually advertised keys;
and it trusts the job settings in its task, which are the same for every device and what REST shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edge_sdk.protocol.errors import ProtocolError

from . import noise, shares
from .ring import FixedPoint

# the job settings a device needs in its task's ``secure_aggregation`` (coordinator/secagg/config.py sends them)
TASK_FIELDS = ("clip", "noise_multiplier", "min_survivors", "neighbours", "max_devices")
# a variance the coordinator computed with the same function and inputs is bit-identical; allow wire rounding
RELATIVE_SLACK = 1e-9
# numpy's Poisson sampler drifts above ~1e14 and fails past ~1e19; an honest roster stays near 1e12
MAX_SAMPLED_VARIANCE = 100 * noise.MAX_DEVICE_VARIANCE


class RosterRefused(ProtocolError):
    """The roster would give less noise (or a different round) than the job promises: the device stays out."""


@dataclass(frozen=True)
class RoundTerms:
    """The public terms of one secure round, as the device knows them without the roster."""

    k: int  # ring elements each device sends (the round's random-k coordinates)
    clip: float  # L2 bound of what each device sends
    noise_multiplier: float  # z the devices add (with ``privacy``: its ``update_noise_multiplier``)
    min_survivors: int  # max(2, min_clients): the fewest survivors any round accepts
    neighbours: int  # graph degree: up to neighbours + 1 devices, everyone is in everyone's roster
    max_devices: int  # clients_per_round: no round has more devices than were selected

    @classmethod
    def from_task(cls, sa: dict[str, Any], k: int) -> RoundTerms:
        """From the task's ``config.secure_aggregation``; ValueError when a setting is missing or malformed
        (a coordinator older than this device states none of them: the device cannot check the noise)."""
        missing = [name for name in TASK_FIELDS if name not in sa]
        if missing:
            raise ValueError(f"the task does not state the job's secure-aggregation setting(s) {missing}, so the "
                             "roster's noise cannot be checked (is the coordinator older than this device?)")
        try:
            terms = cls(k=int(k), clip=float(sa["clip"]), noise_multiplier=float(sa["noise_multiplier"]),
                        min_survivors=int(sa["min_survivors"]), neighbours=int(sa["neighbours"]),
                        max_devices=int(sa["max_devices"]))
        except (TypeError, ValueError):
            raise ValueError(f"malformed secure-aggregation settings in the task: {sa!r}") from None
        if not (terms.clip > 0 and math.isfinite(terms.clip) and math.isfinite(terms.noise_multiplier)
                and terms.noise_multiplier >= 0 and terms.min_survivors >= 2 and terms.neighbours >= 1
                and terms.max_devices >= 1):
            raise ValueError(f"out-of-range secure-aggregation settings in the task: {sa!r}")
        return terms

    def max_t(self, devices: int) -> int:
        """The largest survivor floor the job allows for a round of ``devices``: the coordinator's own rule."""
        return max(self.min_survivors, shares.threshold(devices))


def refusal(fields: dict[str, Any], terms: RoundTerms) -> str | None:
    """Why this device must not take part in the round a roster describes (None: the roster keeps the job's
    promise). ``fields``: the decoded roster's fields (peers, k, clip, scale, noise_var, t, devices)."""
    m = len(fields["peers"])
    if int(fields["k"]) != terms.k:
        return f"roster says k={fields['k']}, but this round's codec seed and model give k={terms.k}"
    if float(fields["clip"]) != terms.clip:
        return f"roster clip bound {fields['clip']} differs from the job's {terms.clip}"
    n, t = fields.get("devices"), fields.get("t")
    if n is None or t is None:
        return "roster does not state how many devices are in the round and the survivor floor t"
    if not m <= n <= terms.max_devices:
        return (f"roster claims {n} devices in the round; with {m} in this device's roster and at most "
                f"{terms.max_devices} selected (clients_per_round) it must lie in [{m}, {terms.max_devices}]")
    if n <= terms.neighbours + 1 and m != n:
        return (f"roster claims {n} devices, few enough for everyone to be everyone's neighbour "
                f"(neighbours {terms.neighbours}), but lists {m}")
    t_max = terms.max_t(n)
    if n < t_max:
        return (f"roster has {n} devices, fewer than the {t_max} survivors the job requires (min_clients): "
                "the round's noise promise cannot hold")
    if t > t_max:
        return (f"roster sets t={t}, but {n} devices and min_clients allow at most t={t_max}: each device would "
                f"add only 1/{t} of the noise, and {t_max} survivors would carry {t_max}/{t} of it")
    scale, var = float(fields["scale"]), float(fields["noise_var"])
    if scale < 1.0:
        return f"roster scale {scale:g} is below one ring unit per unit of update"
    if var > MAX_SAMPLED_VARIANCE:
        return f"roster noise variance {var:.6g} is beyond what this device can sample accurately"
    z = terms.noise_multiplier
    if z > 0:
        span = terms.clip * scale
        if span < noise.MIN_NOISY_SENSITIVITY:
            return (f"roster scale {scale:g} leaves one update {span:.0f} ring units, under the "
                    f"{noise.MIN_NOISY_SENSITIVITY:.0f} the distributed-DP accounting assumes")
        want = noise.per_device_variance(z, terms.clip, scale, terms.k, t_max)
        if var < want * (1.0 - RELATIVE_SLACK):
            return (f"roster noise variance {var:.6g} per device is below the {want:.6g} that the job's noise "
                    f"multiplier {z:g} needs at clip {terms.clip:g}, scale {scale:g}, k={terms.k} and t={t_max}")
    try:
        room = FixedPoint.for_round(terms.clip, n, terms.k, z, t_max, noise.max_scale(z, terms.clip, t_max)).scale
    except ValueError as exc:
        return f"the round does not fit the ring: {exc}"
    if scale > room:
        return f"roster scale {scale:g} exceeds the ring's room for {n} devices ({room:g}): the sum could wrap"
    return None
