"""Remembers the MACs of authenticated updates so a captured message cannot be played back.

A MAC covers job, round, attempt, client, base version, header and payload, so an old message can only be
replayed verbatim; a verbatim copy of an accepted update is refused as ``replayed``. (A copy of a rejected
one meets the same checks that rejected the original: everything they look at is fixed by the MAC.)
The memory is bounded (oldest tags are forgotten first): a tag old enough to be forgotten belongs to a
round that has closed, and an update for a closed round or an earlier attempt is ``stale_round`` anyway.
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class ReplayGuard:
    def __init__(self, capacity: int = 200_000) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def seen(self, tag: bytes) -> bool:
        with self._lock:
            return tag in self._seen

    def remember(self, tag: bytes) -> None:
        with self._lock:
            self._seen[tag] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
