"""Update codecs: turn a float32 update vector into payload bytes and back (dense, top-k, rand-k).

``encode`` also returns exactly what the receiver will decode, so the sender's error feedback is
``vec - sent.to_dense(numel)`` without a second decode. ``decode`` treats the payload as hostile: every
failure is a ``ProtocolError`` with a specific reason and nothing it allocates grows beyond O(numel).

Payload layout (little-endian; full byte map in docs/codecs.md)::

    dense   b"D" | flags u8 | count u32 (= numel) | vlen u32 | values
    topk    b"S" | flags u8 | count u32 (= k)     | ilen u32 | vlen u32 | indices | values
    randk   b"R" | flags u8 | count u32 (= k)     | vlen u32 | values      (indices come from the seed)

flags: bits 0-1 value coding (0 float32, 1 float16, 2 int8, 3 sign), bit 2 values zlib'd, bit 3 index bitmap,
bit 4 index zlib'd, bit 5 index Golomb-Rice (only for a spec with ``"index_coding": "rice"``; neither bit 3
nor bit 5: delta-varint), bit 6 values stored as zlib'd byte planes (dense only, always with bit 2; a device
sets it only under a spec with ``"planes": true``, so decoders that predate it never see it; ``byte_planes.py``);
bit 7 must be zero. Payloads of specs without the newer options (sign values, rice positions, a ``stats``
block, byte planes) are byte-identical to earlier releases; a decoder that predates them refuses such a spec.
Under ``"stats": "float16"`` (``float32``, ``int8``) a topk/randk payload covers the coordinates that are not
BatchNorm running statistics and a dense statistics block follows it (``stats_block.py``); encode and decode then
need the model's statistics mask.
"""
from __future__ import annotations

import logging
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import byte_planes, quant, sparse_index, stats_block
from .topk import top_k_indices
from .zblock import deflate as _deflate, inflate as _inflate
from .errors import ProtocolError

log = logging.getLogger(__name__)

FORMAT_BYTES: dict[str, bytes] = {"dense": b"D", "topk": b"S", "randk": b"R"}
F_VALUES_MASK = 0x03
F_VALUES_ZLIB = 0x04
F_INDEX_BITMAP = 0x08
F_INDEX_ZLIB = 0x10
F_INDEX_RICE = 0x20
F_VALUES_PLANES = 0x40
_F_RESERVED = 0x80
INDEX_CODINGS = ("auto", "rice")
_HEAD = struct.Struct("<cBI")
_U32 = struct.Struct("<I")
MIN_DENSITY = 1e-4
_ROUNDING_TAG = 0x46535251  # separates the stochastic-rounding stream from the rand-k index stream
_DEFAULT_ROUNDING_SEED = 0x5EED

_ALLOWED_KEYS = {
    "dense": {"name", "dtype", "error_feedback", "planes"},
    "topk": {"name", "density", "scope", "values", "stochastic", "error_feedback", "seed", "index_coding",
             "warmup_rounds", "warmup_density", "stats"},
    "randk": {"name", "density", "values", "stochastic", "error_feedback", "seed", "warmup_rounds", "warmup_density",
              "stats"},
}


@dataclass(eq=False)
class Decoded:
    """A decoded update: dense (``indices is None``) or sparse (sorted unique int64 indices)."""

    indices: np.ndarray | None
    values: np.ndarray

    def to_dense(self, numel: int) -> np.ndarray:
        """A fresh float32 vector of length ``numel`` (zeros where nothing was sent)."""
        if self.indices is None:
            if self.values.size != numel:
                raise ValueError(f"dense values have {self.values.size} elements, numel={numel}")
            return self.values.astype(np.float32, copy=True)
        out = np.zeros(numel, dtype=np.float32)
        out[self.indices] = self.values
        return out


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(f"bad codec spec: {reason}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def validate_spec(spec: dict) -> dict:
    """Return a normalised copy of ``spec`` with defaults filled in; ProtocolError on anything invalid."""
    if not isinstance(spec, dict):
        raise _bad("must be a dict")
    name = spec.get("name")
    if name not in _ALLOWED_KEYS:
        raise _bad(f"unknown codec name {name!r} (dense, topk, randk)")
    unknown = sorted(str(key) for key in spec if key not in _ALLOWED_KEYS[name])
    if unknown:
        raise _bad(f"unknown key(s) for {name}: {', '.join(unknown)}")
    if not isinstance(spec.get("error_feedback", False), bool):
        raise _bad("error_feedback must be a bool")
    if name == "dense":
        dtype = spec.get("dtype", "float32")
        if dtype not in ("float32", "float16"):
            raise _bad(f"dense dtype must be float32 or float16, got {dtype!r}")
        out_dense = {"name": "dense", "dtype": dtype, "error_feedback": spec.get("error_feedback", False)}
        if "planes" in spec:  # absent: plain zlib, byte-identical to releases before the option
            if not isinstance(spec["planes"], bool):
                raise _bad("planes must be a bool")
            out_dense["planes"] = spec["planes"]
        return out_dense
    density = spec.get("density", 0.01)
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
        raise _bad("density must be a number")
    density = float(density)
    if not MIN_DENSITY <= density <= 1.0:  # also rejects NaN
        raise _bad(f"density must be in [{MIN_DENSITY}, 1.0], got {density}")
    values = spec.get("values", "float32")
    if values not in quant.VALUE_CODES:
        raise _bad(f"values must be one of {sorted(quant.VALUE_CODES)}, got {values!r}")
    stochastic = spec.get("stochastic", False)
    if not isinstance(stochastic, bool):
        raise _bad("stochastic must be a bool")
    out: dict[str, Any] = {"name": name, "density": density}
    if name == "topk":
        scope = spec.get("scope", "global")
        if scope not in ("global", "per_tensor"):
            raise _bad(f"scope must be global or per_tensor, got {scope!r}")
        out["scope"] = scope
        coding = spec.get("index_coding", "auto")
        if coding not in INDEX_CODINGS:
            raise _bad(f"index_coding must be one of {', '.join(INDEX_CODINGS)}, got {coding!r}")
        if coding != "auto":  # absent = auto, so specs without the option normalise as before
            out["index_coding"] = coding
    out.update(values=values, stochastic=stochastic, error_feedback=spec.get("error_feedback", True))
    if "stats" in spec:  # absent: statistics compete for the k slots, as before the option (same bytes)
        if spec["stats"] != "sparse" and spec["stats"] not in stats_block.STATS_KINDS:
            raise _bad(f"stats must be one of sparse, {', '.join(stats_block.STATS_KINDS)}; got {spec['stats']!r}")
        out["stats"] = spec["stats"]
    out.update(_warmup(spec, density))
    if "seed" in spec or name == "randk":
        seed = spec.get("seed")
        if not _is_int(seed) or not 0 <= int(seed) < 1 << 64:
            raise _bad("randk needs an integer seed in [0, 2**64) announced for the round" if name == "randk"
                       else "seed must be an integer in [0, 2**64)")
        out["seed"] = int(seed)
    return out


def _warmup(spec: dict, density: float) -> dict[str, Any]:
    """Density warm-up keys (DGC's sparsity warm-up), present only when the job asks for them."""
    if "warmup_rounds" not in spec and "warmup_density" not in spec:
        return {}
    rounds = spec.get("warmup_rounds", 0)
    if not _is_int(rounds) or not 0 <= int(rounds) <= 1000:
        raise _bad("warmup_rounds must be an integer in [0, 1000]")
    start = spec.get("warmup_density", 0.25)
    if isinstance(start, bool) or not isinstance(start, (int, float, np.floating, np.integer)):
        raise _bad("warmup_density must be a number")
    if not density <= float(start) <= 1.0:
        raise _bad(f"warmup_density must be in [density={density}, 1.0], got {start}")
    return {"warmup_rounds": int(rounds), "warmup_density": float(start)}


def round_spec(spec: dict, round_: int) -> dict:
    """The spec devices use in ``round_`` (1-based): a warm-up schedule resolved to that round's density.

    Density falls geometrically from ``warmup_density`` in round 1 to ``density`` in round
    ``warmup_rounds + 1`` and stays there: early rounds, where the model moves most, get more coordinates.
    The result carries no warm-up keys, so devices and the payload check see a plain spec."""
    if "warmup_rounds" not in spec and "warmup_density" not in spec:
        return dict(spec)
    norm = validate_spec(spec)
    rounds = norm.pop("warmup_rounds", 0)
    start = norm.pop("warmup_density", norm.get("density"))
    if rounds and round_ <= rounds:
        frac = (max(1, int(round_)) - 1) / rounds
        norm["density"] = max(norm["density"], float(f"{start * (norm['density'] / start) ** frac:.3g}"))
    return norm


def uses_error_feedback(spec: dict) -> bool:
    """Whether a device should keep a residual for this codec (dense float32 never has one)."""
    norm = validate_spec(spec)
    return bool(norm["error_feedback"]) and not (norm["name"] == "dense" and norm["dtype"] == "float32")


def _check_layout(numel: int, layout_sizes: list[int]) -> list[int]:
    if not _is_int(numel) or not 0 <= numel <= sparse_index.MAX_NUMEL:
        raise ProtocolError(f"numel must be an integer in [0, {sparse_index.MAX_NUMEL}]")
    sizes = list(layout_sizes)
    if not all(_is_int(s) and s >= 0 for s in sizes):
        raise ProtocolError("layout sizes must be non-negative integers")
    if sum(sizes) != numel:
        raise ProtocolError(f"layout sizes sum to {sum(sizes)}, numel is {numel}")
    return [int(s) for s in sizes]


def _k_of(density: float, size: int) -> int:
    return 0 if size == 0 else min(size, max(1, math.ceil(density * size)))


def expected_counts(spec: dict, layout_sizes: list[int]) -> list[int]:
    """Values kept per tensor (per_tensor top-k) or a single total (global top-k, rand-k, dense)."""
    norm = validate_spec(spec)
    sizes = _check_layout(sum(layout_sizes), layout_sizes)
    numel = sum(sizes)
    if norm["name"] == "dense":
        return [numel]
    if norm.get("scope") == "per_tensor":
        return [_k_of(norm["density"], s) for s in sizes]
    return [_k_of(norm["density"], numel)]


def _rounding_rng(spec: dict, values: np.ndarray) -> np.random.Generator:
    """Deterministic given (seed, values); the crc of the values decorrelates clients sharing a seed."""
    seed = spec.get("seed", _DEFAULT_ROUNDING_SEED)
    return np.random.default_rng([_ROUNDING_TAG, seed, zlib.crc32(values.tobytes())])


def _select_topk(norm: dict, vec: np.ndarray, sizes: list[int]) -> np.ndarray:
    mag = np.abs(vec)
    if norm["scope"] == "global":
        return top_k_indices(mag, _k_of(norm["density"], vec.size))
    parts, offset = [], 0
    for size in sizes:
        parts.append(top_k_indices(mag[offset:offset + size], _k_of(norm["density"], size)) + offset)
        offset += size
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def encode(spec: dict, vec: np.ndarray, layout_sizes: list[int],
           stats: np.ndarray | None = None) -> tuple[bytes, Decoded]:
    """Encode update ``vec``; returns (payload, exactly what ``decode`` will return for it).

    ``stats``: bool mask of the BatchNorm-statistics coordinates, required by a spec with a dense ``stats``
    block (``stats_block``). ProtocolError for a bad spec, layout or mask, ValueError for a vector of the
    wrong length or with non-finite entries (a diverged update must not be sent).
    """
    norm = validate_spec(spec)
    vec = np.ascontiguousarray(vec, dtype=np.float32)
    numel = vec.size
    sizes = _check_layout(numel, layout_sizes)
    if vec.ndim != 1:
        raise ValueError("update vector must be 1-D")
    if not np.isfinite(vec).all():
        raise ValueError("update vector contains NaN or Inf")
    kind = norm.pop("stats", "sparse")
    if kind == "sparse":
        return _encode(norm, vec, sizes)
    mask = stats_block.check_mask(stats, numel)
    head, other = _encode(norm, vec[~mask], stats_block.other_layout(mask, sizes))
    block, sent_stats = stats_block.encode_block(kind, vec[mask], stats_block.stats_layout(mask, sizes))
    return head + block, Decoded(*stats_block.merge(other, mask, sent_stats))


def _encode(norm: dict, vec: np.ndarray, sizes: list[int]) -> tuple[bytes, Decoded]:
    numel = vec.size
    name = norm["name"]
    kind = norm["dtype"] if name == "dense" else norm["values"]
    if name == "dense":
        indices = None
        values = vec
    else:
        if name == "topk":
            indices = _select_topk(norm, vec, sizes)
        else:
            indices = sparse_index.seeded_indices(norm["seed"], numel, _k_of(norm["density"], numel))
        values = vec[indices]
    rng = _rounding_rng(norm, values) if kind == "int8" and norm.get("stochastic") else None
    raw_values, sent = quant.quantize(kind, values, stochastic=rng is not None, rng=rng)
    flags = quant.VALUE_CODES[kind]
    packed = byte_planes.deflate(raw_values, byte_planes.WIDTHS[kind]) if norm.get("planes") else None
    if packed is not None:
        raw_values, flags = packed, flags | F_VALUES_ZLIB | F_VALUES_PLANES
    elif (packed := _deflate(raw_values)) is not None:
        raw_values, flags = packed, flags | F_VALUES_ZLIB
    count = numel if indices is None else indices.size
    index_part = b""
    if name == "topk":
        method, raw_index = sparse_index.encode_indices(indices, numel, rice=norm.get("index_coding") == "rice")
        if method == sparse_index.BITMAP:
            flags |= F_INDEX_BITMAP
        elif method == sparse_index.RICE:
            flags |= F_INDEX_RICE
        packed = _deflate(raw_index)
        if packed is not None:
            raw_index, flags = packed, flags | F_INDEX_ZLIB
        index_part = _U32.pack(len(raw_index))
    head = _HEAD.pack(FORMAT_BYTES[name], flags, count) + index_part + _U32.pack(len(raw_values))
    body = [raw_index] if name == "topk" else []
    return b"".join([head, *body, raw_values]), Decoded(indices, sent)


def decode(spec: dict, payload: bytes, numel: int, layout_sizes: list[int],
           stats: np.ndarray | None = None) -> Decoded:
    """Decode a payload for a known spec and model size (``stats``: as for ``encode``); raises ProtocolError
    and nothing else."""
    try:
        return _decode(spec, payload, numel, layout_sizes, stats)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is "ProtocolError only" for hostile input
        log.debug("unexpected decode failure", exc_info=True)
        raise ProtocolError(f"malformed payload ({type(exc).__name__})") from None


def _take_u32(view: memoryview, pos: int, what: str) -> tuple[int, int]:
    if len(view) < pos + 4:
        raise ProtocolError(f"truncated payload header ({what})")
    return _U32.unpack_from(view, pos)[0], pos + 4


def _decode(spec: dict, payload: bytes, numel: int, layout_sizes: list[int], stats: np.ndarray | None) -> Decoded:
    norm = validate_spec(spec)
    sizes = _check_layout(numel, layout_sizes)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload must be bytes")
    view = memoryview(payload).cast("B")
    kind = norm.pop("stats", "sparse")
    if kind == "sparse":
        decoded, end = _decode_part(norm, view, numel, sizes)
    else:
        mask = stats_block.check_mask(stats, numel)
        other, pos = _decode_part(norm, view, numel - int(mask.sum()), stats_block.other_layout(mask, sizes))
        values, end = stats_block.decode_block(kind, view, pos, int(mask.sum()), stats_block.stats_layout(mask, sizes))
        decoded = Decoded(*stats_block.merge(other, mask, values))
    if len(view) > end:
        raise ProtocolError(f"trailing garbage: {len(view) - end} bytes after payload")
    return decoded


def _decode_part(norm: dict, view: memoryview, numel: int, sizes: list[int]) -> tuple[Decoded, int]:
    """One codec block at the start of ``view``; returns it and where it ends."""
    if len(view) < _HEAD.size:
        raise ProtocolError(f"truncated payload header ({len(view)} bytes)")
    fmt, flags, count = _HEAD.unpack_from(view, 0)
    name = norm["name"]
    if fmt != FORMAT_BYTES[name]:
        raise ProtocolError(f"wrong format byte 0x{fmt[0]:02x} for codec {name!r} (expected {FORMAT_BYTES[name]!r})")
    if flags & _F_RESERVED:
        raise ProtocolError(f"reserved flag bits set (flags=0x{flags:02x})")
    kind = norm["dtype"] if name == "dense" else norm["values"]
    got_kind = quant.VALUE_NAMES.get(flags & F_VALUES_MASK, "reserved")
    if got_kind != kind:
        raise ProtocolError(f"value coding mismatch: payload has {got_kind}, spec says {kind}")
    if name != "topk" and flags & (F_INDEX_BITMAP | F_INDEX_ZLIB | F_INDEX_RICE):
        raise ProtocolError(f"index flags set on a {name} payload, which carries no indices")
    if flags & F_INDEX_RICE and (flags & F_INDEX_BITMAP or norm.get("index_coding") != "rice"):
        raise ProtocolError("rice index flag set, but the spec does not allow rice positions (or bitmap also set)")
    if flags & F_VALUES_PLANES and not (name == "dense" and flags & F_VALUES_ZLIB):
        raise ProtocolError(f"byte-plane flag set on a {name} payload or without the zlib bit (dense only, with zlib)")
    expected = numel if name == "dense" else sum(expected_counts(norm, sizes))
    if count != expected:
        raise ProtocolError(f"count mismatch: payload declares k={count}, spec and numel imply {expected}")
    pos = _HEAD.size
    ilen = 0
    if name == "topk":
        ilen, pos = _take_u32(view, pos, "index length")
    vlen, pos = _take_u32(view, pos, "values length")
    total = pos + ilen + vlen
    if len(view) < total:
        raise ProtocolError(f"truncated payload: {len(view)} bytes, header promises {total}")
    indices = None
    if name == "topk":
        method = (sparse_index.BITMAP if flags & F_INDEX_BITMAP else
                  sparse_index.RICE if flags & F_INDEX_RICE else sparse_index.VARINT)
        raw_index: bytes | memoryview = view[pos:pos + ilen]
        if flags & F_INDEX_ZLIB:
            raw_index = _inflate(raw_index, sparse_index.max_raw_size(method, count, numel), "index")
        indices = sparse_index.decode_indices(method, raw_index, count, numel)
        if norm["scope"] == "per_tensor":
            _check_per_tensor(indices, sizes, expected_counts(norm, sizes))
        pos += ilen
    elif name == "randk":
        indices = sparse_index.seeded_indices(norm["seed"], numel, count)
    raw_values: bytes | memoryview = view[pos:pos + vlen]
    if flags & F_VALUES_PLANES:
        raw_values = byte_planes.inflate_planes(raw_values, quant.block_size(kind, count), byte_planes.WIDTHS[kind])
    elif flags & F_VALUES_ZLIB:
        raw_values = _inflate(raw_values, quant.block_size(kind, count), "values")
    return Decoded(indices, quant.dequantize(kind, raw_values, count)), total


def _check_per_tensor(indices: np.ndarray, sizes: list[int], counts: list[int]) -> None:
    bounds = np.cumsum([0] + sizes)
    per = np.diff(np.searchsorted(indices, bounds))
    bad = np.flatnonzero(per != np.asarray(counts))
    if bad.size:
        t = int(bad[0])
        raise ProtocolError(f"per-tensor count mismatch: tensor {t} has {int(per[t])} indices, expected {counts[t]}")
