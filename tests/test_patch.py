"""Downlink patches rebuild the exact target version and are small when few weights changed."""
from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.modelfile import dump_model, sha256_hex
from edge_sdk.protocol.patch import apply_patch, make_patch, patch_target


def model(round_: int, change: float = 0.0, frac: float = 0.0, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(100_003).astype(np.float32)  # odd size: data not a multiple of 4 bytes with h
    h = rng.standard_normal(7).astype(np.float16)
    if frac:
        pick = np.random.default_rng(round_).choice(w.size, int(frac * w.size), replace=False)
        w[pick] += change
    return dump_model({"w": w, "h": h, "n": np.array(round_, np.int64)}, {"round": round_, "job": "j"})


def test_patch_rebuilds_exact_version_and_is_small() -> None:
    old, new = model(1), model(12, change=0.25, frac=0.01)
    patch = make_patch(old, new)
    assert patch is not None
    assert patch_target(patch) == (sha256_hex(old), sha256_hex(new))
    assert apply_patch(old, patch) == new
    assert len(patch) < len(new) / 20  # 1 % of weights changed -> a few % of the bytes


def test_dense_change_still_correct() -> None:
    old, new = model(1), model(2, seed=1)
    patch = make_patch(old, new)
    assert patch is not None and apply_patch(old, patch) == new


def test_layout_change_gives_no_patch() -> None:
    a = dump_model({"w": np.zeros(10, np.float32)}, {})
    b = dump_model({"w": np.zeros(11, np.float32)}, {})
    assert make_patch(a, b) is None


def test_wrong_base_and_corruption_rejected() -> None:
    old, new = model(1), model(2, change=1.0, frac=0.01)
    patch = make_patch(old, new)
    assert patch is not None
    with pytest.raises(ProtocolError, match="different base"):
        apply_patch(model(3, change=2.0, frac=0.01), patch)
    corrupt = patch[:-1] + bytes([patch[-1] ^ 1])
    with pytest.raises(ProtocolError, match="does not match the target"):
        apply_patch(old, corrupt)
    with pytest.raises(ProtocolError, match="length"):
        apply_patch(old, patch[:-4])
    with pytest.raises(ProtocolError, match="magic"):
        apply_patch(old, b"junk")
