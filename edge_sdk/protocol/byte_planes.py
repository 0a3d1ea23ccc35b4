"""Byte planes for float value blocks: regroup the bytes of each float by significance before zlib.

A dense update's float32 values compress badly as they are (zlib level 1 saves ~25 % of a MobileNetV3 delta and
spends ~0.15 s doing it): the byte stream interleaves sign/exponent bytes, which repeat, with mantissa bytes, which
do not. Writing all first bytes, then all second bytes, ... (what HDF5/Blosc call "shuffle") puts the repetitive
bytes next to each other. The planes are then deflated with zlib's run-length strategy (``Z_RLE``: runs and
Huffman codes, no match search), which on a MobileNetV3 delta is ~3x faster than level 1 on the raw bytes and
20 % smaller (0.61 vs 0.76 of fp32; small_cnn 0.76 vs 0.89). Lossless: decode returns the same bits, and the
stream is plain zlib, so inflating needs nothing new.

Codec flag bit 6 (``codecs.F_VALUES_PLANES``) marks a value block stored this way; it always comes with the zlib
bit. Every dense decoder reads it; a device writes it only under a spec with ``"planes": true`` (the default for
dense jobs created since), which a coordinator that predates the option never sends and refuses at job creation.
``planes`` is an encoder-only key (``codec_digest``): a device that encodes without it is still on the round's
codec.
"""
from __future__ import annotations

import zlib

import numpy as np

from .errors import ProtocolError
from .zblock import inflate

WIDTHS = {"float32": 4, "float16": 2}
MIN_BLOCK = 4096  # below this the plain zlib path is as good and the block is too small to matter


def split(block: bytes | memoryview, width: int) -> bytes:
    """Little-endian values of ``width`` bytes -> their byte planes, least significant plane first."""
    return np.frombuffer(block, dtype=np.uint8).reshape(-1, width).T.tobytes()


def join(planes: bytes | memoryview, width: int) -> bytes:
    """Inverse of :func:`split`."""
    return np.frombuffer(planes, dtype=np.uint8).reshape(width, -1).T.tobytes()


def pack(block: bytes | memoryview, width: int) -> bytes:
    """zlib (RLE strategy) of the block's byte planes, whatever its size."""
    deflater = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    return deflater.compress(split(block, width)) + deflater.flush()


def deflate(block: bytes, width: int) -> bytes | None:
    """:func:`pack` of the block if that is smaller than the block, else None."""
    if len(block) < MIN_BLOCK or len(block) % width:
        return None
    packed = pack(block, width)
    return packed if len(packed) < len(block) else None


def inflate_planes(data: memoryview | bytes, size: int, width: int, what: str = "values") -> bytes:
    """Inflate a planes block that must hold exactly ``size`` bytes (capped, as every zlib block) and rejoin it."""
    raw = inflate(memoryview(data), size, what)
    if len(raw) != size:
        raise ProtocolError(f"byte-plane {what} block inflates to {len(raw)} bytes, expected {size}")
    return join(raw, width)


def with_new_job_default(spec: dict) -> dict:
    """A normalised spec for a job being created: dense without ``planes`` gets ``"planes": true``
    (``"planes": false`` keeps plain zlib, e.g. for devices that predate the option)."""
    if spec["name"] != "dense" or "planes" in spec:
        return spec
    return {**spec, "planes": True}
