"""FSM1: the file format of a global model version.

Deterministic bytes (sorted JSON header, fixed tensor order, little-endian C-order data) so that a device
that rebuilds a version from a downlink patch gets the same sha256 the coordinator published. No pickle:
loading a model file can never execute code.

Layout: ``b"FSM1" | header_len u32 | header JSON | tensor bytes...`` where the header lists each tensor's
name, dtype, shape and byte offset, plus free-form ``meta`` (arch, classes, normalisation, job, round ...).
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from .errors import ProtocolError

MAGIC = b"FSM1"
_LEN = struct.Struct("<I")
_DTYPES = {"float32", "float16", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_MAX_HEADER = 16 << 20

Arrays = dict[str, np.ndarray]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_model(arrays: Arrays, meta: dict[str, Any]) -> bytes:
    """Serialise ``arrays`` (in insertion order) and ``meta``; same input, same bytes."""
    entries, chunks, offset = [], [], 0
    for name, arr in arrays.items():
        a = np.asarray(arr, order="C")  # not ascontiguousarray: it turns 0-d buffers into shape (1,)
        if a.dtype.name not in _DTYPES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        raw = a.tobytes()
        entries.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset,
                        "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps({"meta": meta, "tensors": entries}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()
    return b"".join([MAGIC, _LEN.pack(len(head)), head, *chunks])


def load_model(data: bytes) -> tuple[Arrays, dict[str, Any]]:
    """Parse FSM1 bytes into ``(arrays, meta)``; a ``ProtocolError`` says what is wrong."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ProtocolError("not a FedSight model file (bad magic bytes)")
    (head_len,) = _LEN.unpack_from(data, 4)
    if head_len > _MAX_HEADER or 8 + head_len > len(data):
        raise ProtocolError("model file header length does not fit the file (truncated?)")
    try:
        head = json.loads(data[8 : 8 + head_len])
        tensors, meta = head["tensors"], head["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"model file header is malformed: {exc}") from None
    base = 8 + head_len
    body = memoryview(data)[base:]
    arrays: Arrays = {}
    expected = 0
    for t in tensors:
        try:
            name, dtype, shape = str(t["name"]), str(t["dtype"]), tuple(int(s) for s in t["shape"])
            offset, nbytes = int(t["offset"]), int(t["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"model file tensor entry malformed: {exc}") from None
        if dtype not in _DTYPES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype}")
        dt = np.dtype(dtype).newbyteorder("<")
        if offset != expected or nbytes != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ProtocolError(f"tensor {name!r} size/offset inconsistent with its shape")
        if offset + nbytes > len(body):
            raise ProtocolError(f"model file truncated inside tensor {name!r}")
        arrays[name] = np.frombuffer(body[offset : offset + nbytes], dtype=dt).reshape(shape).astype(
            dt.newbyteorder("="), copy=True)
        expected = offset + nbytes
    if expected != len(body):
        raise ProtocolError("model file has trailing bytes after the last tensor")
    return arrays, meta


def is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f"


def float_layout(arrays: Arrays) -> list[tuple[str, tuple[int, ...]]]:
    """The floating-point entries, in order: the coordinates of an update vector."""
    return [(name, tuple(a.shape)) for name, a in arrays.items() if is_float(a)]


def layout_sizes(arrays: Arrays) -> list[int]:
    return [int(a.size) for a in arrays.values() if is_float(a)]


def flatten(arrays: Arrays) -> np.ndarray:
    """Concatenate the float entries as one float32 vector."""
    parts = [a.reshape(-1).astype(np.float32, copy=False) for a in arrays.values() if is_float(a)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def unflatten(vec: np.ndarray, template: Arrays) -> Arrays:
    """Inverse of ``flatten``: float entries from ``vec``, integer buffers copied from ``template``."""
    total = sum(int(a.size) for a in template.values() if is_float(a))
    if vec.size != total:
        raise ProtocolError(f"vector has {vec.size} values, model has {total} float parameters")
    out: Arrays = {}
    pos = 0
    for name, a in template.items():
        if is_float(a):
            out[name] = vec[pos : pos + a.size].reshape(a.shape).astype(a.dtype)
            pos += a.size
        else:
            out[name] = a.copy()
    return out
