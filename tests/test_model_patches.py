"""Downlink patches as served: one build for many concurrent askers, none when it is not clearly smaller."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.api import model_patches
from coordinator.storage.model_store import ModelStore
from edge_sdk.protocol.modelfile import dump_model
from edge_sdk.protocol.patch import apply_patch


def versions(store: ModelStore, changed: float) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(50_000).astype(np.float32)
    old = dump_model({"w": w}, {"round": 0})
    w2 = w.copy()
    w2[: int(changed * w.size)] += 1.0
    return store.put(old), store.put(dump_model({"w": w2}, {"round": 1}))


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    model_patches._cached.cache_clear()


def test_sparse_change_is_patched(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old, new = versions(store, 0.01)
    patch = model_patches.patch_for(store, old, new)
    assert patch is not None and len(patch) < len(store.get(new)) / 10
    assert apply_patch(store.get(old), patch) == store.get(new)


def test_unrelated_weights_get_no_patch(tmp_path: Path) -> None:
    """Every word changed to something unrelated: no form of patch is clearly smaller, so the device downloads
    the model."""
    store = ModelStore(tmp_path)
    old, _ = versions(store, 0.0)
    bits = np.random.default_rng(9).integers(0, 2**30, 50_000, dtype=np.uint32)  # random exponents and mantissas
    fresh = store.put(dump_model({"w": bits.view(np.float32)}, {"round": 1}))
    assert model_patches.patch_for(store, old, fresh) is None
    _, half = versions(store, 0.5)  # half the words changed: still clearly smaller, so still served
    assert model_patches.patch_for(store, old, half) is not None


def test_dense_round_is_served_as_an_xor_patch(tmp_path: Path) -> None:
    """After a dense FedAvg round every weight moves a little: the XOR of the two versions is mostly zero in
    the sign/exponent bytes, so the FSP2 patch is well below the model."""
    store = ModelStore(tmp_path)
    w = np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 0.05
    old = store.put(dump_model({"w": w}, {"round": 0}))
    step = np.random.default_rng(1).standard_normal(w.size).astype(np.float32) * 1e-3
    new = store.put(dump_model({"w": w + step}, {"round": 1}))
    patch = model_patches.patch_for(store, old, new)
    assert patch is not None and patch[:4] == b"FSP2" and len(patch) < 0.8 * len(store.get(new))
    assert apply_patch(store.get(old), patch) == store.get(new)


def test_concurrent_requests_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)
    old, new = versions(store, 0.01)
    calls = []
    real = model_patches.make_patch

    def slow(a: bytes, b: bytes) -> bytes | None:
        calls.append(1)
        time.sleep(0.2)  # long enough that every asker arrives while the first build runs
        return real(a, b)

    monkeypatch.setattr(model_patches, "make_patch", slow)
    results: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: results.append(model_patches.patch_for(store, old, new)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 8 and all(r is not None and r == results[0] for r in results)
