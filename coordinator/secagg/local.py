"""A whole secure-aggregation round in one process: real devices, real coordinator, real cryptography, with
messages passed through the wire encoding (so byte counts are what MQTT would carry) instead of a broker.

Used by the tests and ``benchmarks/secagg.py``; the MQTT flow (``flow.py``) drives the same two objects.
Times are CPU seconds of the calling thread, so other load on shared cores does not inflate them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.secagg.device import SecAggDevice
from edge_sdk.secagg.ring import FixedPoint
from edge_sdk.secagg.terms import RoundTerms

from coordinator.secagg.server import RoundResult, SecAggParams, SecAggServer

KEY = b"k" * 32  # the simulated devices' HMAC key (MACs are computed and checked as on the wire)


@dataclass
class Traffic:
    """Bytes per device and per phase, uplink and downlink, as framed on the wire."""

    up: dict[str, dict[str, int]] = field(default_factory=dict)
    down: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, direction: str, device: str, kind: str, n: int) -> None:
        table = self.up if direction == "up" else self.down
        table.setdefault(device, {})
        table[device][kind] = table[device].get(kind, 0) + n

    def mean(self, direction: str) -> dict[str, float]:
        table = self.up if direction == "up" else self.down
        kinds = sorted({k for per in table.values() for k in per})
        return {k: float(np.mean([per.get(k, 0) for per in table.values()])) for k in kinds} if table else {}


@dataclass
class LocalRound:
    result: RoundResult | None
    server: SecAggServer
    traffic: Traffic
    coordinator_s: float  # CPU seconds of this thread (robust to other load on shared cores)
    devices_s: float
    error: str | None = None
    finish_s: float = 0.0  # of coordinator_s: rebuilding seeds and removing masks


def run_round(inputs: dict[str, np.ndarray], params: SecAggParams, *, drop_before_sharing: Iterable[str] = (),
              drop_after_masking: Iterable[str] = (), drop_before_reveal: Iterable[str] = (),
              tamper: Callable[[str, int, bytes], bytes] | None = None, job_id: str = "job-1", round_: int = 1,
              attempt: int = 1, seed: int = 0, rng: np.random.Generator | None = None,
              encode: Callable[[str, FixedPoint], np.ndarray] | None = None) -> LocalRound:
    """Run one round over ``inputs`` (device id -> float vector of length k).

    ``encode(device, fixed)`` may produce a device's ring vector itself (error feedback needs the round's
    fixed-point grid); by default ``inputs[device]`` is clipped and encoded.
    ``tamper(device, kind, frame)`` may replace a device's uplink frame before it is decoded (tests of
    rejection). Devices in the ``drop_*`` sets stop at that point."""
    before, after, no_reveal = set(drop_before_sharing), set(drop_after_masking), set(drop_before_reveal)
    server = SecAggServer(job_id, round_, attempt, sorted(inputs), params, seed)
    terms = RoundTerms(k=params.k, clip=params.clip, noise_multiplier=params.noise_multiplier,
                       min_survivors=params.min_survivors, neighbours=params.degree, max_devices=len(inputs))
    devices = {d: SecAggDevice(d, job_id, round_, attempt, terms) for d in sorted(inputs)}  # rosters are checked
    traffic = Traffic()
    clock = {"coord": 0.0, "dev": 0.0}

    def up(d: str, msg: sw.SecAggMessage) -> None:
        frame = sw.encode(msg, KEY)
        if tamper is not None:
            frame = tamper(d, msg.kind, frame)
        traffic.add("up", d, msg.name, len(frame))
        t0 = time.thread_time()
        decoded = sw.decode(frame)
        if sw.verify(frame, KEY):
            server.receive(d, decoded, len(frame))
        clock["coord"] += time.thread_time() - t0

    def down(out: dict[str, sw.SecAggMessage]) -> dict[str, sw.SecAggMessage]:
        t0 = time.thread_time()
        frames = {d: sw.encode(m) for d, m in out.items()}
        clock["coord"] += time.thread_time() - t0
        for d, f in frames.items():
            traffic.add("down", d, out[d].name, len(f))
        return {d: sw.decode(f) for d, f in frames.items()}

    def device(fn: Callable[[], sw.SecAggMessage | None]) -> sw.SecAggMessage | None:
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            clock["dev"] += time.thread_time() - t0

    def coord(fn: Callable[[], dict[str, sw.SecAggMessage]]) -> dict[str, sw.SecAggMessage]:
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            clock["coord"] += time.thread_time() - t0

    try:
        for d, dev in devices.items():
            up(d, device(dev.advertise))
        rosters = down(coord(server.close_keys))
        for d, msg in rosters.items():
            if d not in before:
                up(d, device(lambda dev=devices[d], msg=msg: dev.share(msg)))
        inboxes = down(coord(server.close_shares))
        for d, msg in inboxes.items():
            dev = devices[d]
            device(lambda dev=dev, msg=msg: dev.receive_inbox(msg))
            if d in after:
                continue
            encoded = encode(d, dev.fixed) if encode is not None else dev.fixed.encode(inputs[d])
            up(d, device(lambda dev=dev, e=encoded: dev.mask(e, rng)))
        requests = down(coord(server.close_masked))
        for d, msg in requests.items():
            if d not in no_reveal:
                up(d, device(lambda dev=devices[d], msg=msg: dev.reveal(msg)))
        t0 = time.thread_time()
        result = server.finish()
        finish_s = time.thread_time() - t0
        clock["coord"] += finish_s
        return LocalRound(result, server, traffic, clock["coord"], clock["dev"], finish_s=finish_s)
    except Exception as exc:  # SecAggAbort, or a device refusing (ProtocolError): the round failed
        return LocalRound(None, server, traffic, clock["coord"], clock["dev"], f"{type(exc).__name__}: {exc}")
