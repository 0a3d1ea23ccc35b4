"""Per-device token buckets for update messages, so a flood is refused before it is parsed.

Why: every update costs the coordinator a CRC pass, a parse and (if it gets that far) a decode; a device
sending thousands of messages a second would otherwise spend the coordinator's time, not its own. Each
client id (the one in the topic, before anything is authenticated) gets a bucket of ``burst`` tokens refilled
at ``rate_per_s``; a message without a token is rejected with code ``rate_limited``. The table of buckets is
bounded (least recently used evicted), so spraying made-up client ids cannot grow it without limit.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    told: bool = False  # the device has been acked 'rate_limited' since its last admitted message


class RateLimiter:
    """``allow(client_id)`` -> (admitted, first refusal since the last admitted message, seconds to wait)."""

    def __init__(self, rate_per_s: float, burst: float, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError("rate_per_s must be >= 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, client_id: str) -> tuple[bool, bool, float]:
        if not self.enabled:
            return True, False, 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client_id)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
                self._buckets[client_id] = bucket
                if len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client_id)
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                bucket.told = False
                return True, False, 0.0
            first = not bucket.told
            bucket.told = True
            return False, first, (1.0 - bucket.tokens) / self.rate
