"""FSP2 (XOR byte-plane) model patches: exact rebuild, chosen only when smaller, hostile patches refused."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_sdk.protocol import byte_planes
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.modelfile import dump_model
from edge_sdk.protocol.patch import apply_patch, make_patch, patch_target


def pair(changed: float = 1.0, n: int = 20_000) -> tuple[bytes, bytes]:
    w = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.05
    step = np.random.default_rng(1).standard_normal(n).astype(np.float32) * 1e-3
    step[int(changed * n):] = 0
    return dump_model({"w": w, "n": np.array(3, np.int64)}, {"round": 0}), \
        dump_model({"w": w + step, "n": np.array(4, np.int64)}, {"round": 1})


def rebuild(patch: bytes, **meta_changes: object) -> bytes:
    """The same patch with its metadata edited (lengths recomputed)."""
    (meta_len,) = struct.unpack_from("<I", patch, 4)
    meta = {**json.loads(patch[8:8 + meta_len]), **meta_changes}
    body = json.dumps(meta, sort_keys=True).encode()
    return patch[:4] + struct.pack("<I", len(body)) + body + patch[8 + meta_len:]


def test_dense_change_uses_xor_and_rebuilds_exactly() -> None:
    old, new = pair(1.0)
    patch = make_patch(old, new)
    assert patch is not None and patch[:4] == b"FSP2" and len(patch) < 0.8 * len(new)
    assert apply_patch(old, patch) == new
    assert patch_target(patch)[1] == patch_target(make_patch(old, new))[1]


def test_sparse_change_keeps_the_word_list_form() -> None:
    old, new = pair(0.05)
    patch = make_patch(old, new)
    assert patch is not None and patch[:4] == b"FSP1"
    assert apply_patch(old, patch) == new


HOSTILE = [
    ("zlen", lambda p: rebuild(p, zlen=1), "length does not match"),
    ("zlen-type", lambda p: rebuild(p, zlen="12"), "'zlen' must be a non-negative integer"),
    ("words-type", lambda p: rebuild(p, words=-1), "'words' must be a non-negative integer"),
    ("no-zlen", lambda p: rebuild(p, zlen=None), "'zlen' must be"),
    ("truncated", lambda p: p[:-7], "length does not match"),
    ("corrupt", lambda p: p[:-40] + bytes(40), "zlib"),
    ("magic", lambda p: b"FSP9" + p[4:], "bad magic"),
]


@pytest.mark.parametrize(("mutate", "reason"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_xor_patches_are_refused(mutate, reason: str) -> None:
    old, new = pair(1.0)
    patch = make_patch(old, new)
    with pytest.raises(ProtocolError, match=reason):
        apply_patch(old, mutate(patch))


def test_wrong_size_and_wrong_base_are_refused() -> None:
    old, new = pair(1.0)
    patch = make_patch(old, new)
    (meta_len,) = struct.unpack_from("<I", patch, 4)
    meta = json.loads(patch[8:8 + meta_len])
    (head_len,) = struct.unpack_from("<I", patch, 8 + meta_len)
    start = 8 + meta_len + 4 + head_len
    short = byte_planes.pack(bytes(4 * meta["words"] - 4), 4)  # one word short of the model
    with pytest.raises(ProtocolError, match="inflates to"):
        apply_patch(old, rebuild(patch[:start] + short, zlen=len(short)))
    other, _ = pair(1.0, n=20_001)
    with pytest.raises(ProtocolError, match="different base version"):
        apply_patch(other, patch)
    flipped = bytearray(patch)
    flipped[-1] ^= 0x01  # still valid zlib? if so the rebuilt model must fail its hash
    with pytest.raises(ProtocolError):
        apply_patch(old, bytes(flipped))
