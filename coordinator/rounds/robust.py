"""Byzantine-robust aggregation with bounded memory: coordinate-wise trimmed mean and median.

Why: a mean, even of clipped updates, moves with every attacker in proportion to its share. The
coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning") drops the
``trim`` fraction of largest and smallest values of each coordinate before averaging, so a minority of
outliers on either side has no say at all; ``median`` is the limit ``trim -> 0.5``.

Both need all values of a coordinate at once, which a streaming sum cannot give. They hold at most
``buffer`` dense float32 updates (``buffer x numel x 4`` bytes); when the buffer fills, its robust
aggregate is folded into a running mean of chunk results (weighted by chunk size) and the buffer is
reused, so memory stays bounded whatever the number of participants. Chunking weakens the guarantee
only to "robust within each chunk of ``buffer`` updates"; with ``buffer >= clients_per_round`` (the
default 64 covers most jobs) it is the exact statistic. Weighting is uniform by construction: a claimed
``num_samples`` has no effect on these statistics. The job's clipping still applies to each update first.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.rounds.limits import UpdateLimits
from coordinator.rounds.strategy import Accumulator, DecodedLike, Strategy, register

_BLOCK = 1 << 16  # coordinates sorted per step: bounds the temporary copy to buffer x 64 Ki floats


class BufferedAccumulator(Accumulator):
    """Holds up to ``capacity`` densified, clipped updates and folds their robust mean in when full."""

    def __init__(self, global_vec: np.ndarray, finish: Any, limits: UpdateLimits, capacity: int,
                 trim: float) -> None:
        super().__init__(global_vec, finish, limits)
        self.capacity = capacity
        self.trim = trim
        self._rows: list[np.ndarray] = []  # grows to at most ``capacity``; no up-front allocation
        self._chunks = 0  # updates already folded into _sum (as chunk robust means x chunk size)

    def add(self, decoded: DecodedLike, num_samples: int) -> float:
        self.limits.weight(num_samples)  # still refuses a non-positive claim
        self._check(decoded)
        clipped = self.clipper.clip(decoded)
        if clipped.indices is None:
            row = np.array(clipped.values, dtype=np.float32)
        else:  # a robust statistic needs every coordinate: a sparse update's absent ones are zeros
            row = np.zeros(self.numel, dtype=np.float32)
            if np.asarray(clipped.values).size:
                row[np.asarray(clipped.indices)] = clipped.values
        self._rows.append(row)
        self.count += 1
        self.total_weight += 1.0
        if len(self._rows) >= self.capacity:
            self._flush()
        return 1.0

    def _flush(self) -> None:
        if not self._rows:
            return
        self._sum += len(self._rows) * self.robust_mean(self._rows)
        self._chunks += len(self._rows)
        self._rows = []

    def robust_mean(self, rows: list[np.ndarray]) -> np.ndarray:
        """Coordinate-wise trimmed mean (or median) of equal-length ``rows``, block by block."""
        n = len(rows)
        out = np.empty(self.numel, dtype=np.float64)
        k = min(int(self.trim * n), (n - 1) // 2)  # always keep at least one (median: the middle one(s))
        for start in range(0, self.numel, _BLOCK):
            block = np.stack([r[start : start + _BLOCK] for r in rows])
            if self.trim >= 0.5:
                out[start : start + block.shape[1]] = np.median(block, axis=0)
            else:
                ordered = np.sort(block, axis=0)
                out[start : start + block.shape[1]] = ordered[k : n - k].mean(axis=0, dtype=np.float64)
        return out

    def mean_delta(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no update was accumulated in this round")
        self._flush()
        return self._sum / self._chunks


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: drop the ``trim`` fraction at each end of every coordinate."""

    name = "trimmed_mean"
    defaults = {"trim": 0.2, "buffer": 64}

    def __init__(self, limits: UpdateLimits | None = None, **params: Any) -> None:
        super().__init__(limits, **params)
        if not 0.0 <= self.params["trim"] <= 0.5:
            raise ValueError("strategy parameter 'trim' must be in [0, 0.5]")
        if not 1 <= self.params["buffer"] <= 4096 or self.params["buffer"] != int(self.params["buffer"]):
            raise ValueError("strategy parameter 'buffer' must be an integer in [1, 4096]")

    def begin(self, global_vec: np.ndarray) -> Accumulator:
        return BufferedAccumulator(np.asarray(global_vec, dtype=np.float32), self._step, self.limits,
                                   int(self.params["buffer"]), self.params["trim"])


class Median(TrimmedMean):
    """Coordinate-wise median (the trimmed mean's limit); the most robust, and the noisiest when clean."""

    name = "median"
    defaults = {"buffer": 64}

    def __init__(self, limits: UpdateLimits | None = None, **params: Any) -> None:
        Strategy.__init__(self, limits, **params)
        self.params["trim"] = 0.5
        if not 1 <= self.params["buffer"] <= 4096 or self.params["buffer"] != int(self.params["buffer"]):
            raise ValueError("strategy parameter 'buffer' must be an integer in [1, 4096]")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "buffer": self.params["buffer"]}


register(TrimmedMean)
register(Median)
