"""Remembers the MACs of authenticated updates so a captured message cannot be played back.

A MAC covers job, round, attempt, client, base version, header and payload, so an old message can only be
replayed verbatim; every verbatim copy after the first is refused as ``replayed``. The memory is bounded
(oldest tags are forgotten first): a tag old enough to be forgotten belongs to a round that has closed,
and an update for a closed round or an earlier attempt is refused as ``stale_round`` anyway.
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class ReplayGuard:
    def __init__(self, capacity: int = 200_000) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def first_time(self, tag: bytes) -> bool:
        """True the first time ``tag`` is seen (and remember it), False for every repeat."""
        with self._lock:
            if tag in self._seen:
                return False
            self._seen[tag] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return True
