"""Downlink patches as the REST API serves them: built once per (from, to) pair, and only when worth it.

Every device one version behind asks for the same patch within milliseconds of a round's announcement.
An ``lru_cache`` alone builds it once per *concurrent* request (ten 50 ms builds of a 6 MB model on a
loaded machine), so builds go through one lock and later callers find the cached result.

A patch is only worth its cost when it is clearly smaller than the model (applying it costs each device two
extra sha256 passes and a rebuild). After a dense FedAvg round nearly every weight changes; the word-list
patch would be larger than the model, but the XOR form (``FSP2``, ``edge_sdk/protocol/patch.py``) is ~0.6 of
a MobileNetV3 model. A pair where neither form is at most ``MAX_SHARE`` of the model gets no patch (the route
answers 404 and the device downloads the version itself, as it does for a layout change).
"""
from __future__ import annotations

import threading
from functools import lru_cache

from edge_sdk.protocol.patch import make_patch

from coordinator.storage.model_store import ModelStore

MAX_SHARE = 0.9  # serve a patch only when it is at most this share of the target model's size

_build_lock = threading.Lock()


@lru_cache(maxsize=16)
def _cached(models: ModelStore, old: str, new: str) -> bytes | None:
    target = models.get(new)
    patch = make_patch(models.get(old), target)
    return patch if patch is not None and len(patch) <= MAX_SHARE * len(target) else None


def patch_for(models: ModelStore, old: str, new: str) -> bytes | None:
    """The patch from version ``old`` to ``new``, or None (layouts differ, or not worth it)."""
    with _build_lock:
        return _cached(models, old, new)
