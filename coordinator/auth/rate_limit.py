"""Token buckets keyed by caller (e.g. remote address): bursts are allowed, sustained floods are not."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """``capacity`` requests at once per key, refilled at ``per_second``; at most ``max_keys`` keys tracked."""

    def __init__(self, capacity: float, per_second: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1 or per_second <= 0:
            raise ValueError("rate limit needs capacity >= 1 and a positive refill rate")
        self.capacity = float(capacity)
        self.per_second = float(per_second)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 if the request may proceed (one token taken), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.per_second)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._trim()
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second

    def _trim(self) -> None:
        """Forget the fullest buckets first when too many keys are tracked (they behave as new keys)."""
        if len(self._buckets) > self._max_keys:
            for key, _ in sorted(self._buckets.items(), key=lambda kv: -kv[1][0])[: len(self._buckets) // 10]:
                del self._buckets[key]


def retry_after(seconds: float) -> str:
    """An HTTP ``Retry-After`` value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
