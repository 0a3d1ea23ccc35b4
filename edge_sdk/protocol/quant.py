"""Value coding for codec payloads: float32, float16, int8 and sign (1 bit) with per-block scales.

Quantisation happens on the sender; the function that turns stored bytes back into float32 is shared by the
encoder (to report exactly what the receiver will see, for error feedback) and the decoder, so both sides
agree bit for bit. Everything here is numpy only.

int8 block layout: ``ceil(k / 256)`` little-endian float32 scales (``max|x| / 127`` of each block of 256
values), then ``k`` int8 codes in ``[-127, 127]``; value = code * scale.

sign block layout (ternary updates when paired with top-k positions, as in STC; Sattler et al. 2019):
``ceil(k / 256)`` float32 scales (the mean ``|x|`` of each block of 256 values, which minimises the squared
error of ``scale * sign(x)``), then ``ceil(k / 8)`` bytes of sign bits, LSB first, bit set = negative;
padding bits must be zero. value = +-scale. About 1.1 bits per value.
"""
from __future__ import annotations

import numpy as np

from .errors import ProtocolError

VALUE_CODES: dict[str, int] = {"float32": 0, "float16": 1, "int8": 2, "sign": 3}
VALUE_NAMES: dict[int, str] = {code: name for name, code in VALUE_CODES.items()}
BLOCK = 256
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: clip here so fp16 never produces inf

_MAX_SCALE = np.nextafter(np.float32(np.finfo(np.float32).max / 127.0), np.float32(0))
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")


def num_blocks(k: int) -> int:
    """Number of int8 scale blocks for ``k`` values."""
    return (k + BLOCK - 1) // BLOCK


def block_size(kind: str, k: int) -> int:
    """Exact raw byte size of a value block holding ``k`` values of coding ``kind``."""
    if kind == "float32":
        return 4 * k
    if kind == "float16":
        return 2 * k
    if kind == "int8":
        return 4 * num_blocks(k) + k
    if kind == "sign":
        return 4 * num_blocks(k) + (k + 7) // 8
    raise ProtocolError(f"unknown value coding {kind!r}")


def _int8_values(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """code * scale in float32; the single definition both encoder and decoder use."""
    k = codes.size
    per_value = np.repeat(scales.astype(np.float32, copy=False), BLOCK)[:k]
    return codes.astype(np.float32) * per_value


def _sign_values(negative: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """+-scale in float32; shared by encoder and decoder."""
    per_value = np.repeat(scales.astype(np.float32, copy=False), BLOCK)[:negative.size]
    return np.where(negative, -per_value, per_value).astype(np.float32)


def _quantize_sign(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    k = x.size
    nb = num_blocks(k)
    padded = np.zeros(nb * BLOCK, dtype=np.float64)
    padded[:k] = np.abs(x)
    counts = np.full(nb, BLOCK, dtype=np.float64)
    if nb:
        counts[-1] = k - (nb - 1) * BLOCK
    scales = (padded.reshape(nb, BLOCK).sum(axis=1) / counts).astype(np.float32)
    negative = np.signbit(x)
    raw = scales.astype(_F32, copy=False).tobytes() + np.packbits(negative, bitorder="little").tobytes()
    return raw, _sign_values(negative, scales)


def quantize(
    kind: str, x: np.ndarray, *, stochastic: bool = False, rng: np.random.Generator | None = None
) -> tuple[bytes, np.ndarray]:
    """Encode float32 ``x`` as a raw value block; returns (bytes, the float32 values the receiver decodes).

    ``stochastic`` (int8 only) rounds up with probability equal to the fractional part, which makes the
    quantiser unbiased; it needs ``rng``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "float32":
        return x.astype(_F32, copy=False).tobytes(), x.copy()
    if kind == "float16":
        h = np.clip(x, -FP16_MAX, FP16_MAX).astype(_F16)
        return h.tobytes(), h.astype(np.float32)
    if kind == "sign":
        return _quantize_sign(x)
    if kind != "int8":
        raise ProtocolError(f"unknown value coding {kind!r}")
    k = x.size
    nb = num_blocks(k)
    padded = np.zeros(nb * BLOCK, dtype=np.float32)
    padded[:k] = x
    blocks = padded.reshape(nb, BLOCK)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127.0)).astype(np.float32)
    np.minimum(scales, _MAX_SCALE, out=scales)  # 127 * scale must stay finite near float32 max
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scaled = blocks / scales[:, None]
        if stochastic:
            if rng is None:
                raise ValueError("stochastic rounding needs an rng")
            noise = rng.random(scaled.shape, dtype=np.float32)
            q = np.floor(scaled + noise)
        else:
            q = np.rint(scaled)
    q[~np.isfinite(q)] = 0.0  # blocks whose scale underflowed to 0 send zeros; error feedback keeps them
    codes = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:k]
    raw = scales.astype(_F32, copy=False).tobytes() + codes.tobytes()
    return raw, _int8_values(codes, scales)


def dequantize(kind: str, raw: bytes | memoryview, k: int) -> np.ndarray:
    """Decode a raw value block of exactly ``block_size(kind, k)`` bytes; ProtocolError on anything odd."""
    expected = block_size(kind, k)
    if len(raw) != expected:
        raise ProtocolError(f"values length mismatch: {len(raw)} bytes, expected {expected} for {k} {kind}")
    if kind == "float32":
        out = np.frombuffer(raw, dtype=_F32).astype(np.float32)
    elif kind == "float16":
        out = np.frombuffer(raw, dtype=_F16).astype(np.float32)
    elif kind == "sign":
        out = _dequantize_sign(raw, k)
    else:
        nb = num_blocks(k)
        scales = np.frombuffer(raw, dtype=_F32, count=nb)
        if not np.isfinite(scales).all():
            raise ProtocolError("non-finite int8 scale")
        if (scales < 0).any():
            raise ProtocolError("negative int8 scale")
        codes = np.frombuffer(raw, dtype=np.int8, offset=4 * nb, count=k)
        if (codes == -128).any():
            raise ProtocolError("int8 code -128 is outside the symmetric range [-127, 127]")
        with np.errstate(over="ignore", invalid="ignore"):
            out = _int8_values(codes, scales)
    if not np.isfinite(out).all():
        raise ProtocolError("non-finite values in payload")
    return out


def _dequantize_sign(raw: bytes | memoryview, k: int) -> np.ndarray:
    nb = num_blocks(k)
    scales = np.frombuffer(raw, dtype=_F32, count=nb)
    if not np.isfinite(scales).all():
        raise ProtocolError("non-finite sign scale")
    if (scales < 0).any():
        raise ProtocolError("negative sign scale")
    bits = np.frombuffer(raw, dtype=np.uint8, offset=4 * nb)
    if k % 8 and int(bits[-1]) >> (k % 8):
        raise ProtocolError("sign padding bits set beyond k")
    return _sign_values(np.unpackbits(bits, count=k, bitorder="little").astype(bool), scales)
