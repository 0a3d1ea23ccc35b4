"""The in-memory state of one open round attempt: who may send, what was accepted, the running aggregate.

Everything that changes while updates arrive lives here behind one condition variable: the update path
checks-and-adds under it (so a duplicate can never be counted twice and nothing is added after close), and
the job's round thread waits on it for "all selected clients accepted" or the deadline.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.rounds.strategy import Accumulator, DecodedLike

# a device's score of the round's base model on its held-out share (see EdgeClient._score)
FEDERATED_KEYS = ("eval_loss", "eval_accuracy", "eval_samples")


@dataclass
class OpenRound:
    job_id: str
    round: int
    attempt: int
    base_version: str
    codec: dict[str, Any]
    numel: int
    layout_sizes: list[int]
    selected: frozenset[str]
    max_update_bytes: int
    accumulator: Accumulator
    deadline: float
    started_at: float = field(default_factory=time.time)
    task: dict[str, Any] | None = None  # the task every selected client got (re-sent to one that reconnects)
    closed: bool = False
    accepted_clients: dict[str, int] = field(default_factory=dict)  # client -> raw message bytes
    rejected: int = 0  # authenticated senders' rejected updates (each also stored as an ``updates`` row)
    uplink_bytes: int = 0  # accepted updates only: what compression ratios are computed from
    rejected_bytes: int = 0
    junk: int = 0  # unauthenticated messages (rate-limited, oversize, malformed, bad credentials): counted only
    junk_bytes: int = 0
    _metric_sums: dict[str, float] = field(default_factory=dict)
    _metric_weights: dict[str, float] = field(default_factory=dict)
    _scored: list[tuple[float, float, float]] = field(default_factory=list)  # (loss, accuracy, weight)
    cond: threading.Condition = field(default_factory=threading.Condition)
    secagg: Any = None  # the round's SecAggServer under secure aggregation (coordinator/secagg/flow.py)
    failure: str | None = None  # why the round cannot close (e.g. the secure-aggregation protocol failed)
    protocol_metrics: dict[str, float] = field(default_factory=dict)  # e.g. secure aggregation's survivors, noise
    statistics: np.ndarray | None = None  # BatchNorm-statistics mask of the base model (a codec ``stats`` block)

    @property
    def target(self) -> int:
        """Accepted updates after which the round closes early: every selected client."""
        return len(self.selected)

    @property
    def accepted(self) -> int:
        return len(self.accepted_clients)

    def add(self, client_id: str, decoded: DecodedLike, num_samples: int, nbytes: int,
            metrics: dict[str, float]) -> None:
        """Fold an already-validated update in; caller holds ``cond``. Metrics get the capped weight the
        update got, so an inflated ``num_samples`` cannot dominate the reported loss either."""
        weight = self.accumulator.add(decoded, num_samples)
        if not self.accumulator.keeps_client_metrics:
            metrics = {}
        self.accepted_clients[client_id] = nbytes
        self.uplink_bytes += nbytes
        self._add_score(metrics, num_samples)
        for key, value in metrics.items():
            if key in FEDERATED_KEYS:
                continue
            if np.isfinite(value):
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + weight * float(value)
                self._metric_weights[key] = self._metric_weights.get(key, 0.0) + weight
        self.cond.notify_all()

    def _add_score(self, metrics: dict[str, float], num_samples: int) -> None:
        loss, acc, n = (metrics.get(k) for k in FEDERATED_KEYS)
        if loss is None or acc is None or n is None:
            return
        if not (np.isfinite(loss) and loss >= 0 and 0.0 <= acc <= 1.0 and n >= 1):
            return  # implausible: left out rather than skewing the mean
        self._scored.append((float(loss), float(acc), float(min(n, num_samples))))  # weight capped by its data

    def federated_eval(self) -> dict[str, float] | None:
        """Held-out scores of the base model, weighted by each device's held-out count; None if none came."""
        total = sum(w for _, _, w in self._scored)
        if not total:
            return None
        return {"loss": sum(l * w for l, _, w in self._scored) / total,
                "accuracy": sum(a * w for _, a, w in self._scored) / total,
                "num_samples": total, "clients": float(len(self._scored))}

    def count_rejected(self, nbytes: int, junk: bool = False) -> None:
        with self.cond:
            if junk:
                self.junk += 1
                self.junk_bytes += nbytes
            else:
                self.rejected += 1
                self.rejected_bytes += nbytes

    def traffic(self) -> dict[str, int]:
        """The round's byte and message counters, as stored on its record."""
        return {"uplink_bytes": self.uplink_bytes, "rejected_bytes": self.rejected_bytes, "junk": self.junk,
                "junk_bytes": self.junk_bytes}

    def wait(self, stop: threading.Event, poll_s: float = 0.25) -> None:
        """Block until every selected client was accepted, the deadline passes or ``stop`` is set."""
        with self.cond:
            while self.accepted < self.target and not stop.is_set():
                left = self.deadline - time.time()
                if left <= 0:
                    break
                self.cond.wait(min(left, poll_s))

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def metrics(self) -> dict[str, float]:
        """Client-reported metrics averaged with num_samples as weights."""
        return {**{k: self._metric_sums[k] / w for k, w in self._metric_weights.items() if w > 0},
                **self.protocol_metrics}

    def compression_ratio(self) -> float | None:
        """Raw float32 size (4 x numel) over the mean size of the accepted messages: "vs raw fp32", not a
        measured dense message (those carry a header and may be zlib'd; benchmarks/compression.py measures them)."""
        if not self.accepted_clients:
            return None
        mean_bytes = sum(self.accepted_clients.values()) / len(self.accepted_clients)
        return (4.0 * self.numel) / mean_bytes if mean_bytes else None
