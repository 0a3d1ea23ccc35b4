"""Coding of sorted, unique int64 index sets over ``range(numel)``, and seeded index sets for rand-k.

Two codings, the sender picks the smaller:

* **varint** — LEB128 of the deltas: the first index as is, then ``idx[i] - idx[i-1]`` (>= 1). Deltas are
  unsigned, so an unsorted set cannot be expressed at all; a zero delta is a duplicate and is rejected.
* **bitmap** — ``ceil(numel / 8)`` bytes, bit ``i`` of byte ``i // 8`` (LSB first) set when ``i`` is kept.

Both encoder and decoder are vectorised (a loop over varint byte positions, at most 5 for numel < 2**32),
never over elements. Decoders raise ProtocolError only.
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import ProtocolError

VARINT = 0
BITMAP = 1
MAX_NUMEL = (1 << 32) - 1  # counts travel as u32; also keeps the 64-bit arithmetic below exact


def varint_max_len(numel: int) -> int:
    """Longest canonical varint a delta below ``numel`` can need (>= 1 byte)."""
    return max(1, -(-max(1, (numel - 1).bit_length()) // 7))


def _deltas(indices: np.ndarray) -> np.ndarray:
    return np.diff(indices.astype(np.uint64, copy=False), prepend=np.uint64(0))


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lens = np.ones(values.size, dtype=np.int64)
    if values.size:
        top = int(values.max())
        shift = 7
        while shift < 64 and top >> shift:
            lens += values >= np.uint64(1 << shift)
            shift += 7
    return lens


def varint_size(indices: np.ndarray) -> int:
    """Byte size the varint coding of ``indices`` would take, without building it."""
    return int(_varint_lengths(_deltas(indices)).sum())


def bitmap_size(numel: int) -> int:
    return (numel + 7) // 8


def encode_varint(indices: np.ndarray) -> bytes:
    values = _deltas(indices)
    lens = _varint_lengths(values)
    if not values.size:
        return b""
    ends = np.cumsum(lens)
    starts = ends - lens
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(lens.max())):
        sel = lens > j
        chunk = ((values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        chunk |= (lens[sel] > j + 1).astype(np.uint8) << 7
        out[starts[sel] + j] = chunk
    return out.tobytes()


def decode_varint(raw: bytes | memoryview, k: int, numel: int) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8)
    if k == 0:
        if buf.size:
            raise ProtocolError("index count mismatch: index block not empty for k=0")
        return np.empty(0, dtype=np.int64)
    if buf.size == 0 or buf[-1] & 0x80:
        raise ProtocolError("truncated varint in index block")
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != k:
        raise ProtocolError(f"index count mismatch: index block holds {ends.size} varints, declared k={k}")
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    longest = int(lens.max())
    if longest > varint_max_len(numel):
        raise ProtocolError(f"varint too long ({longest} bytes) for numel={numel}")
    if ((lens > 1) & (buf[ends] == 0)).any():
        raise ProtocolError("non-canonical varint (trailing zero byte) in index block")
    values = np.zeros(k, dtype=np.uint64)
    for j in range(longest):
        sel = lens > j
        values[sel] |= (buf[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    if (values >= np.uint64(numel)).any():
        raise ProtocolError(f"index out of range (delta >= numel={numel})")
    if (values[1:] == 0).any():
        raise ProtocolError("duplicate index (zero delta) in index block")
    indices = np.cumsum(values)  # k * numel < 2**64: no wrap, strictly increasing
    if int(indices[-1]) >= numel:
        raise ProtocolError(f"index out of range: {int(indices[-1])} >= numel={numel}")
    return indices.astype(np.int64)


def encode_bitmap(indices: np.ndarray, numel: int) -> bytes:
    mask = np.zeros(numel, dtype=bool)
    mask[indices] = True
    return np.packbits(mask, bitorder="little").tobytes()


def decode_bitmap(raw: bytes | memoryview, k: int, numel: int) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size != bitmap_size(numel):
        raise ProtocolError(f"bitmap length mismatch: {buf.size} bytes, expected {bitmap_size(numel)}")
    tail = numel % 8
    if tail and int(buf[-1]) >> tail:
        raise ProtocolError("bitmap padding bits set beyond numel (index out of range)")
    indices = np.flatnonzero(np.unpackbits(buf, count=numel, bitorder="little"))
    if indices.size != k:
        raise ProtocolError(f"index count mismatch: bitmap has {indices.size} bits set, declared k={k}")
    return indices.astype(np.int64)


def encode_indices(indices: np.ndarray, numel: int) -> tuple[int, bytes]:
    """Pick the smaller coding (varint on ties); returns (method, raw bytes)."""
    if varint_size(indices) <= bitmap_size(numel):
        return VARINT, encode_varint(indices)
    return BITMAP, encode_bitmap(indices, numel)


def max_raw_size(method: int, k: int, numel: int) -> int:
    """Upper bound on a raw index block, used to cap zlib inflation."""
    return bitmap_size(numel) if method == BITMAP else k * varint_max_len(numel)


def decode_indices(method: int, raw: bytes | memoryview, k: int, numel: int) -> np.ndarray:
    if method == BITMAP:
        return decode_bitmap(raw, k, numel)
    return decode_varint(raw, k, numel)


def _uniform_below(raw: np.ndarray, numel: int) -> np.ndarray:
    """floor(raw * numel / 2**64) computed exactly in uint64 (numel < 2**32): bias <= numel / 2**64."""
    n = np.uint64(numel)
    hi = raw >> np.uint64(32)
    lo = raw & np.uint64(0xFFFFFFFF)
    return (hi * n + ((lo * n) >> np.uint64(32))) >> np.uint64(32)


@functools.lru_cache(maxsize=4)
def seeded_indices(seed: int, numel: int, k: int) -> np.ndarray:
    """The rand-k index set for ``seed``: ``k`` distinct sorted indices, uniform without replacement.

    Built only from the raw PCG64 stream of ``np.random.default_rng(seed)`` (bit-generator streams are
    stable across numpy versions, ``Generator.choice`` is not promised to be), taking distinct draws in
    order until ``k`` are found. For ``k > numel / 2`` the complement is drawn instead, so cost stays
    O(numel). The result is cached (a coordinator decodes many updates of one round) and read-only.
    """
    if not 0 <= k <= numel <= MAX_NUMEL:
        raise ProtocolError(f"rand-k needs 0 <= k <= numel <= {MAX_NUMEL}")
    complement = k > numel // 2
    want = numel - k if complement else k
    bits = np.random.default_rng(seed).bit_generator
    chosen = np.zeros(numel, dtype=bool)
    count = 0
    while count < want:
        need = want - count
        draws = _uniform_below(bits.random_raw(need + need // 4 + 16), numel)
        uniq, first = np.unique(draws, return_index=True)
        fresh = ~chosen[uniq]
        uniq, first = uniq[fresh], first[fresh]
        if uniq.size > need:
            uniq = uniq[np.argsort(first, kind="stable")[:need]]
        chosen[uniq] = True
        count += uniq.size
    if complement:
        np.logical_not(chosen, out=chosen)
    indices = np.flatnonzero(chosen).astype(np.int64)
    indices.flags.writeable = False
    return indices
