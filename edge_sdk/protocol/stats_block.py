"""BatchNorm running statistics as a dense block next to a sparse payload (codec key ``stats``).

With top-k or rand-k, a device that re-estimates its BatchNorm statistics produces large statistics deltas
that win most of the round's k coordinates, so the weights barely move (BENCHMARKS.md, deployment). Under
``"stats": "float16"`` (``float32``, ``int8``) the sparse selection covers only the non-statistics
coordinates and every statistic travels in a dense block after it:

    <topk/randk payload over the other coordinates> | b"B" | flags u8 | count u32 | vlen u32 | values

``flags`` bits 0-1 value coding (as the codecs' flags), bit 2 values zlib'd; other bits must be 0. ``count``
must equal the number of statistics the receiver's model has. Values are rounded toward zero, so
``|sent| <= |delta|`` coordinate by coordinate: a running variance the device holds at >= 0 can never be
carried below 0 by rounding, and a weighted mean of such updates stays >= 0 too.

Which coordinates are statistics is a boolean mask both sides derive from the model's tensor names
(``edge_sdk.update.statistics_mask``); a spec with a ``stats`` block refuses to encode or decode without it.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from . import quant
from .errors import ProtocolError
from .zblock import deflate, inflate

if TYPE_CHECKING:
    from .codecs import Decoded

FORMAT = b"B"
STATS_KINDS = ("float16", "float32", "int8")  # "sparse" (the default) = statistics compete for the k slots
F_VALUES_MASK = 0x03
F_VALUES_ZLIB = 0x04
_F_RESERVED = 0xF8
_HEAD = struct.Struct("<cBII")
# what a NEW sparse job gets when its codec does not say: int8 matched float16's accuracy at ~20 % fewer bytes
# (BENCHMARKS.md, compression notes, "stats"); stored jobs keep their spec
NEW_JOB_DEFAULT = "int8"


def with_new_job_default(spec: dict, secure_aggregation: object = None) -> dict:
    """A normalised spec for a job being created: a top-k/rand-k codec without ``stats`` gets
    ``NEW_JOB_DEFAULT`` (``"stats": "sparse"`` keeps the old behaviour). Not under secure aggregation, whose
    masking covers only the round's shared k coordinates."""
    if spec["name"] == "dense" or "stats" in spec or secure_aggregation is not None:
        return spec
    return {**spec, "stats": NEW_JOB_DEFAULT}


def check_mask(stats: np.ndarray | None, numel: int) -> np.ndarray:
    """The statistics mask as a bool vector of length ``numel``; ProtocolError if missing or the wrong size."""
    if stats is None:
        raise ProtocolError("codec spec has a 'stats' block but no statistics mask was given")
    mask = np.asarray(stats)
    if mask.dtype != np.bool_ or mask.shape != (numel,):
        raise ProtocolError(f"statistics mask must be a bool vector of length numel={numel}")
    return mask


def _stats_per_tensor(mask: np.ndarray, sizes: list[int]) -> np.ndarray:
    bounds = np.cumsum([0, *sizes])
    running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return running[bounds[1:]] - running[bounds[:-1]]


def other_layout(mask: np.ndarray, sizes: list[int]) -> list[int]:
    """Per-tensor sizes of the coordinates that are not statistics (the sparse part's layout)."""
    return [int(s - n) for s, n in zip(sizes, _stats_per_tensor(mask, sizes))]


def stats_layout(mask: np.ndarray, sizes: list[int]) -> list[int]:
    """Statistics per tensor, tensors without any left out: int8 scales restart at each of them."""
    return [int(n) for n in _stats_per_tensor(mask, sizes) if n]


def _toward_zero_fp16(x: np.ndarray) -> np.ndarray:
    h = np.clip(x, -quant.FP16_MAX, quant.FP16_MAX).astype(np.float16)
    over = np.abs(h.astype(np.float32)) > np.abs(x)
    h[over] = np.nextafter(h[over], np.float16(0))
    return h


def _toward_zero_int8(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    k = x.size
    nb = quant.num_blocks(k)
    padded = np.zeros(nb * quant.BLOCK, dtype=np.float32)
    padded[:k] = x
    blocks = padded.reshape(nb, quant.BLOCK)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.trunc(blocks / scales[:, None])
    q[~np.isfinite(q)] = 0.0
    codes = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:k]
    sent = quant.dequantize("int8", scales.astype("<f4").tobytes() + codes.tobytes(), k)
    over = np.abs(sent) > np.abs(x)  # float rounding of code * scale: step the code one toward zero
    if over.any():
        codes[over] -= np.sign(codes[over]).astype(np.int8)
    raw = scales.astype("<f4").tobytes() + codes.tobytes()
    return raw, quant.dequantize("int8", raw, k)


def _chunks(count: int, tensors: list[int] | None) -> list[int]:
    tensors = [count] if tensors is None else tensors
    if sum(tensors) != count:
        raise ProtocolError(f"statistics layout sums to {sum(tensors)}, block has {count}")
    return tensors


def encode_block(kind: str, values: np.ndarray, tensors: list[int] | None = None) -> tuple[bytes, np.ndarray]:
    """The dense statistics block for ``values`` (rounded toward zero); returns (bytes, what is decoded).

    ``tensors``: statistics per tensor (``stats_layout``). int8 quantises each tensor on its own (scales per
    256 values of one tensor), so a layer with small deltas is not truncated to 0 by a neighbour's scale."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if kind == "float32":
        raw, sent = x.astype("<f4").tobytes(), x.copy()
    elif kind == "float16":
        h = _toward_zero_fp16(x)
        raw, sent = h.astype("<f2").tobytes(), h.astype(np.float32)
    elif kind == "int8":
        parts, pos = [], 0
        for n in _chunks(x.size, tensors):
            parts.append(_toward_zero_int8(x[pos:pos + n]))
            pos += n
        raw = b"".join(p[0] for p in parts)
        sent = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    else:
        raise ProtocolError(f"stats must be one of sparse, {', '.join(STATS_KINDS)}; got {kind!r}")
    flags = quant.VALUE_CODES[kind]
    packed = deflate(raw)
    if packed is not None:
        raw, flags = packed, flags | F_VALUES_ZLIB
    return _HEAD.pack(FORMAT, flags, x.size, len(raw)) + raw, sent


def decode_block(kind: str, view: memoryview, pos: int, count: int,
                 tensors: list[int] | None = None) -> tuple[np.ndarray, int]:
    """Parse the statistics block at ``pos``; returns (values, end). ``count``: statistics the model has;
    ``tensors``: their split into tensors (as for ``encode_block``)."""
    if len(view) < pos + _HEAD.size:
        raise ProtocolError("truncated payload: the statistics block header is missing")
    fmt, flags, got, vlen = _HEAD.unpack_from(view, pos)
    if fmt != FORMAT:
        raise ProtocolError(f"wrong statistics block byte 0x{fmt[0]:02x} (expected {FORMAT!r})")
    if flags & _F_RESERVED:
        raise ProtocolError(f"reserved statistics block flag bits set (flags=0x{flags:02x})")
    got_kind = quant.VALUE_NAMES.get(flags & F_VALUES_MASK)
    if got_kind != kind:
        raise ProtocolError(f"statistics value coding mismatch: block has {got_kind}, spec says {kind}")
    if got != count:
        raise ProtocolError(f"statistics block declares {got} statistics, the model has {count}")
    start = pos + _HEAD.size
    if len(view) < start + vlen:
        raise ProtocolError(f"truncated payload: statistics block promises {vlen} bytes, {len(view) - start} left")
    chunks = _chunks(count, tensors) if kind == "int8" else [count]
    raw: bytes | memoryview = view[start:start + vlen]
    if flags & F_VALUES_ZLIB:
        raw = inflate(raw, sum(quant.block_size(kind, n) for n in chunks), "statistics")
    if len(raw) != sum(quant.block_size(kind, n) for n in chunks):
        raise ProtocolError(f"statistics values length mismatch: {len(raw)} bytes for {count} {kind} values")
    values, at = [], 0
    for n in chunks:
        size = quant.block_size(kind, n)
        values.append(quant.dequantize(kind, raw[at:at + size], n))
        at += size
    return (np.concatenate(values) if values else np.zeros(0, np.float32)), start + vlen


def merge(other: Decoded, mask: np.ndarray, stats_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted full-vector (indices, values) of the sparse part (indices over the non-statistics coordinates)
    and the dense statistics."""
    rest = np.flatnonzero(~mask)
    sparse_idx = rest[other.indices] if other.indices is not None else rest
    idx = np.concatenate([sparse_idx, np.flatnonzero(mask)]).astype(np.int64)
    values = np.concatenate([np.asarray(other.values, np.float32), stats_values])
    order = np.argsort(idx, kind="stable")
    return idx[order], values[order]
