"""zlib for codec blocks: compress only when it pays, and inflate with a hard cap (hostile input)."""
from __future__ import annotations

import zlib

from .errors import ProtocolError

ZLIB_LEVEL = 6


def deflate(block: bytes) -> bytes | None:
    """zlib'd block if that is smaller, else None; large blocks are first probed on four 4 KiB samples
    so incompressible float data costs ~1 ms instead of a full level-6 pass."""
    if len(block) < 64:
        return None
    if len(block) > 64 * 1024:
        step = len(block) // 4
        probe = b"".join(block[i * step:i * step + 4096] for i in range(4))
        if len(zlib.compress(probe, ZLIB_LEVEL)) > 0.9 * len(probe):
            return None
    packed = zlib.compress(block, ZLIB_LEVEL if len(block) < (1 << 20) else 1)  # level 1: 5x faster on MBs
    return packed if len(packed) < len(block) else None


def inflate(data: memoryview, cap: int, what: str) -> bytes:
    """Inflate at most ``cap`` bytes: a zlib bomb is cut off after cap + 1 bytes of output."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise ProtocolError(f"corrupt zlib stream in {what} block ({exc})") from None
    if len(out) > cap:
        raise ProtocolError(f"{what} block inflates beyond {cap} bytes (zlib bomb)")
    if not inflater.eof:
        raise ProtocolError(f"truncated zlib stream in {what} block")
    if inflater.unused_data:
        raise ProtocolError(f"trailing garbage after zlib stream in {what} block")
    return out
