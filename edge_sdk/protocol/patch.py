"""Downlink patches: rebuild global version B from a cached version A with far fewer bytes than B.

A patch carries B's model-file header whole and, for the tensor data, only the 32-bit words that changed
(their positions coded like sparse update indices, then their new bit patterns). It is lossless: the
device verifies that the rebuilt file hashes to B. Sparse aggregation changes few weights per round, so a
device one version behind typically downloads a small fraction of the model.

Layout: ``b"FSP1" | meta_len u32 | meta JSON | header_len u32 | B's header | index block | words (u32 LE)``
with meta ``{"from", "to", "data_len", "words", "k", "method", "index_bytes"}``.

After a dense round nearly every word changes, and such a patch is larger than the model. The XOR of the two
versions' words is then mostly zero bytes in the sign/exponent planes, so ``make_patch`` also builds
``b"FSP2" | meta_len u32 | meta JSON | header_len u32 | B's header | byte_planes.pack(A xor B words)`` with meta
``{"from", "to", "data_len", "words", "zlen"}`` and returns the smaller (a MobileNetV3 dense round: ~0.59 of
the model). A device that predates FSP2 refuses the magic bytes and downloads the full model.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from . import byte_planes
from .errors import ProtocolError
from .modelfile import sha256_hex
from .sparse_index import decode_indices, encode_indices, max_raw_size

MAGIC = b"FSP1"
MAGIC_XOR = b"FSP2"
_XOR_WHEN = 0.25  # try the XOR form only when this share of the words changed (a sparse round stays FSP1)
_U32 = struct.Struct("<I")


def _split(model: bytes) -> tuple[bytes, bytes]:
    if len(model) < 8:
        raise ProtocolError("model file truncated")
    (head_len,) = _U32.unpack_from(model, 4)
    return model[: 8 + head_len], model[8 + head_len :]


def _words(data: bytes, count: int) -> np.ndarray:
    padded = data + b"\x00" * (count * 4 - len(data))
    return np.frombuffer(padded, dtype="<u4")


def make_patch(old: bytes, new: bytes) -> bytes | None:
    """A patch turning ``old`` into ``new``, or None when the tensor layouts differ."""
    _, old_data = _split(old)
    new_head, new_data = _split(new)
    if len(old_data) != len(new_data):
        return None
    count = -(-len(new_data) // 4)
    a, b = _words(old_data, count), _words(new_data, count)
    idx = np.flatnonzero(a != b)
    ends = {"from": sha256_hex(old), "to": sha256_hex(new), "data_len": len(new_data), "words": count}
    xor = None
    if idx.size >= _XOR_WHEN * count:
        packed = byte_planes.pack(np.bitwise_xor(a, b).tobytes(), 4)
        meta = json.dumps({**ends, "zlen": len(packed)}, sort_keys=True).encode()
        xor = b"".join([MAGIC_XOR, _U32.pack(len(meta)), meta, _U32.pack(len(new_head)), new_head, packed])
        if len(xor) <= 4 * idx.size:  # the changed words alone would make FSP1 larger: do not build it
            return xor
    method, index_block = encode_indices(idx, count)
    meta = json.dumps({**ends, "k": int(idx.size), "method": method, "index_bytes": len(index_block)},
                      sort_keys=True).encode()
    patch = b"".join([MAGIC, _U32.pack(len(meta)), meta, _U32.pack(len(new_head)), new_head, index_block,
                      b[idx].astype("<u4").tobytes()])
    return xor if xor is not None and len(xor) < len(patch) else patch


def patch_target(patch: bytes) -> tuple[str, str]:
    """``(from_version, to_version)`` of a patch."""
    meta, _ = _meta(patch)
    return str(meta["from"]), str(meta["to"])


def _meta(patch: bytes) -> tuple[dict, int]:
    if len(patch) < 8 or patch[:4] not in (MAGIC, MAGIC_XOR):
        raise ProtocolError("not a FedSight model patch (bad magic bytes)")
    (meta_len,) = _U32.unpack_from(patch, 4)
    if 8 + meta_len > len(patch):
        raise ProtocolError("patch truncated in its metadata")
    keys = ("zlen",) if patch[:4] == MAGIC_XOR else ("k", "method", "index_bytes")
    try:
        meta = json.loads(patch[8 : 8 + meta_len])
        for key in ("from", "to", "data_len", "words", *keys):
            meta[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"patch metadata malformed: {exc}") from None
    return meta, 8 + meta_len


def _int(meta: dict, key: str) -> int:
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"patch metadata malformed: {key!r} must be a non-negative integer")
    return value


def apply_patch(old: bytes, patch: bytes) -> bytes:
    """Rebuild the target version; raises ProtocolError unless the result hashes to it."""
    meta, pos = _meta(patch)
    if sha256_hex(old) != meta["from"]:
        raise ProtocolError("patch was made for a different base version")
    _, old_data = _split(old)
    words, data_len = _int(meta, "words"), _int(meta, "data_len")
    xor = patch[:4] == MAGIC_XOR
    k = words if xor else _int(meta, "k")
    if data_len != len(old_data) or words != -(-data_len // 4) or not 0 <= k <= words:
        raise ProtocolError("patch does not fit the base model's layout")
    if len(patch) < pos + 4:
        raise ProtocolError("patch truncated in its header")
    (head_len,) = _U32.unpack_from(patch, pos)
    pos += 4
    head = patch[pos : pos + head_len]
    pos += head_len
    if xor:
        if pos + _int(meta, "zlen") != len(patch):
            raise ProtocolError("patch length does not match its metadata")
        flips = np.frombuffer(byte_planes.inflate_planes(patch[pos:], 4 * words, 4, "patch"), dtype="<u4")
        data = np.bitwise_xor(_words(old_data, words), flips)
    else:
        index_bytes, method = _int(meta, "index_bytes"), _int(meta, "method")
        if index_bytes > max_raw_size(method, k, words) or pos + index_bytes + 4 * k != len(patch):
            raise ProtocolError("patch length does not match its metadata")
        idx = decode_indices(method, patch[pos : pos + index_bytes], k, words)
        values = np.frombuffer(patch, dtype="<u4", count=k, offset=pos + index_bytes)
        data = _words(old_data, words).copy()
        data[idx] = values
    rebuilt = head + data.tobytes()[:data_len]
    if sha256_hex(rebuilt) != meta["to"]:
        raise ProtocolError("patched model does not match the target version (corrupted patch)")
    return rebuilt
