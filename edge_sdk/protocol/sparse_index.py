"""Coding of sorted, unique int64 index sets over ``range(numel)``, and seeded index sets for rand-k.

Two codings, the sender picks the smaller:

* **varint** — LEB128 of the deltas: the first index as is, then ``idx[i] - idx[i-1]`` (>= 1). Deltas are
  unsigned, so an unsorted set cannot be expressed at all; a zero delta is a duplicate and is rejected.
* **bitmap** — ``ceil(numel / 8)`` bytes, bit ``i`` of byte ``i // 8`` (LSB first) set when ``i`` is kept.
* **rice** (only where the codec spec asks for ``"index_coding": "rice"``) — Golomb-Rice code of the gaps, the
  entropy coder for geometric gaps that STC uses: one byte ``b`` (0..31), then a bit stream (LSB first within
  each byte) holding, for ``x`` = the first index, then ``idx[i] - idx[i-1] - 1``: ``x >> b`` one-bits, a
  zero-bit, and the low ``b`` bits of ``x`` (LSB first). Padding bits after the last code must be zero. At
  density ``d`` a position costs about ``log2(1/d) + 1.5`` bits, against 8-16 for varint.

Both encoder and decoder are vectorised (a loop over varint byte positions, at most 5 for numel < 2**32),
never over elements. Decoders raise ProtocolError only.
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import ProtocolError

VARINT = 0
BITMAP = 1
RICE = 2
MAX_RICE_PARAM = 31
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


def _rice_values(indices: np.ndarray) -> np.ndarray:
    values = _deltas(indices).astype(np.int64)
    values[1:] -= 1
    return values


def _rice_bits(values: np.ndarray, b: int) -> int:
    return int(((values >> b) + 1 + b).sum())


def rice_parameter(values: np.ndarray) -> int:
    """The Rice parameter giving the shortest stream for these gap values (searched near log2 of the mean)."""
    if values.size == 0:
        return 0
    guess = int(np.log2(max(1.0, float(values.mean()) * 0.69)))
    candidates = range(max(0, guess - 2), min(MAX_RICE_PARAM, guess + 2) + 1)
    return min(candidates, key=lambda b: _rice_bits(values, b))


def rice_size(indices: np.ndarray) -> int:
    values = _rice_values(indices)
    return 1 + (_rice_bits(values, rice_parameter(values)) + 7) // 8


def encode_rice(indices: np.ndarray) -> bytes:
    values = _rice_values(indices)
    b = rice_parameter(values)
    q = values >> b
    lens = q + 1 + b
    total = int(lens.sum())
    bits = np.zeros(total, dtype=np.uint8)
    starts = np.cumsum(lens) - lens
    n_ones = int(q.sum())
    if n_ones:
        first = np.repeat(starts, q)
        bits[first + (np.arange(n_ones) - np.repeat(np.cumsum(q) - q, q))] = 1
    low = starts + q + 1
    for j in range(b):
        bits[low + j] = (values >> j) & 1
    return bytes([b]) + np.packbits(bits, bitorder="little").tobytes()


def decode_rice(raw: bytes | memoryview, k: int, numel: int) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size == 0:
        raise ProtocolError("rice index block is empty (no parameter byte)")
    b = int(buf[0])
    if b > MAX_RICE_PARAM:
        raise ProtocolError(f"rice parameter {b} > {MAX_RICE_PARAM}")
    bits = np.unpackbits(buf[1:], bitorder="little")
    nbits = bits.size
    if k == 0:
        if nbits:
            raise ProtocolError("index count mismatch: index block not empty for k=0")
        return np.empty(0, dtype=np.int64)
    # next_zero[i]: the first zero-bit at or after i (nbits if none); window[i]: the b bits from i as an integer.
    # With both precomputed, each code costs O(1) whatever a hostile unary run length is.
    rev = np.where(bits[::-1] == 0, np.arange(nbits - 1, -1, -1), nbits)
    next_zero = np.full(nbits + 1, nbits, dtype=np.int64)
    next_zero[:nbits] = np.minimum.accumulate(rev)[::-1]
    window = np.zeros(nbits + 1, dtype=np.int64)
    for j in range(b):
        window[:nbits - j] |= bits[j:].astype(np.int64) << j
    nz, win = next_zero.tolist(), window.tolist()
    out = [0] * k
    pos, prev = 0, -1
    for i in range(k):
        z = nz[pos]
        if z + 1 + b > nbits:
            raise ProtocolError("truncated rice code in index block")
        idx = prev + 1 + (((z - pos) << b) | win[z + 1])
        if idx >= numel:
            raise ProtocolError(f"index out of range: {idx} >= numel={numel}")
        out[i] = idx
        prev, pos = idx, z + 1 + b
    if (pos + 7) // 8 != buf.size - 1 or bits[pos:].any():
        raise ProtocolError("rice index block has trailing data after the last code")
    return np.asarray(out, dtype=np.int64)


def encode_indices(indices: np.ndarray, numel: int, rice: bool = False) -> tuple[int, bytes]:
    """Pick the smallest coding (varint, then rice, on ties; rice only if allowed); returns (method, raw)."""
    sizes = {VARINT: varint_size(indices), BITMAP: bitmap_size(numel)}
    if rice:
        sizes[RICE] = rice_size(indices)
    method = min(sizes, key=lambda m: (sizes[m], m != VARINT))
    if method == VARINT:
        return VARINT, encode_varint(indices)
    if method == RICE:
        return RICE, encode_rice(indices)
    return BITMAP, encode_bitmap(indices, numel)


def max_raw_size(method: int, k: int, numel: int) -> int:
    """Upper bound on a raw index block, used to cap zlib inflation."""
    if method == RICE:  # parameter byte + at most numel unary ones + k * (1 + 31) bits
        return 1 + (numel + k * (1 + MAX_RICE_PARAM) + 7) // 8
    return bitmap_size(numel) if method == BITMAP else k * varint_max_len(numel)


def decode_indices(method: int, raw: bytes | memoryview, k: int, numel: int) -> np.ndarray:
    if method == BITMAP:
        return decode_bitmap(raw, k, numel)
    if method == RICE:
        return decode_rice(raw, k, numel)
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
