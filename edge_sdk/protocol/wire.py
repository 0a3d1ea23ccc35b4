"""Wire format v3 for model updates: one self-describing, authenticated binary message per update.

Layout (little-endian)::

    b"FSU" | version u8 (=3) | header_len u16 | header (binary, header_v3.py) | payload (codec bytes)
    | mac 32B | crc32 u32

The header carries job / round / attempt / client / base version, an 8-byte digest of the codec spec, sample
count and metrics: a demo device's frame costs 157 bytes besides the payload, where wire v2's JSON header made it
495, a third of a compressed update. The payload is whatever the codec produced. No secret travels: ``mac`` is HMAC-SHA256 under the device's own key over
every byte before it (so over the whole header and the payload), which makes a sniffed update useless for
anything but an identical replay, and the coordinator refuses those. The trailing CRC-32 covers everything
before it, so a truncated or corrupted message is told apart from a forged one before any field is trusted.

:func:`decode_update` also reads wire v2 (``header_len u32`` and a JSON header, ``header_v2.py``) from devices
not yet upgraded; both decode to the same :class:`UpdateHeader`.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

from . import header_v2, header_v3
from .errors import ProtocolError
from .update_header import UpdateHeader

__all__ = ["MAGIC", "VERSION", "V2", "MAC_BYTES", "DEFAULT_MAX_BYTES", "UpdateHeader", "encode_update",
           "decode_update", "verify_update", "update_mac"]

MAGIC = b"FSU"
VERSION = 3  # what encode_update writes
V2 = 2  # still read
MAC_BYTES = 32
_START = struct.Struct("<3sB")
_LENGTH = {V2: struct.Struct("<I"), VERSION: struct.Struct("<H")}  # header_len, by version
_MAX_HEADER = {V2: header_v2.MAX_HEADER_BYTES, VERSION: header_v3.MAX_HEADER_BYTES}
_CRC = struct.Struct("<I")
DEFAULT_MAX_BYTES = 256 << 20


def _mac(key: bytes, signed: bytes | memoryview) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def encode_update(header: UpdateHeader, payload: bytes, key: bytes) -> bytes:
    """Frame ``payload`` with ``header`` (wire v3) and authenticate both under the device ``key``."""
    if len(key) < 16:
        raise ProtocolError("device key must be at least 16 bytes")
    head = header_v3.pack_header(header)
    body = b"".join((_START.pack(MAGIC, VERSION), _LENGTH[VERSION].pack(len(head)), head, payload))
    body += _mac(key, body)
    return body + _CRC.pack(zlib.crc32(body))


def update_mac(data: bytes) -> bytes:
    """The MAC a framed message carries (call after :func:`decode_update` accepted the frame)."""
    end = len(data) - _CRC.size
    return bytes(data[end - MAC_BYTES : end])


def verify_update(data: bytes, key: bytes) -> bool:
    """True if ``data`` (a frame :func:`decode_update` accepted) was authenticated under ``key``."""
    end = len(data) - _CRC.size - MAC_BYTES
    if end < _START.size:
        return False
    return hmac.compare_digest(_mac(key, memoryview(data)[:end]), update_mac(data))


def decode_update(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[UpdateHeader, bytes]:
    """Parse and check one message's frame (wire v3 or v2); every failure is a ``ProtocolError`` with a
    readable reason.

    The header is not yet authentic: look up the key of ``header.client_id`` and call :func:`verify_update`
    before trusting any field."""
    size = len(data)
    if size > max_bytes:
        raise ProtocolError(f"message too large ({size} bytes > limit {max_bytes})")
    if size < _START.size:
        raise ProtocolError(f"message truncated ({size} bytes)")
    magic, version = _START.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a FedSight update (bad magic bytes)")
    if version not in _LENGTH:
        raise ProtocolError(f"unsupported wire version {version} (this coordinator reads {V2} and {VERSION})")
    length = _LENGTH[version]
    start = _START.size + length.size
    if size < start + MAC_BYTES + _CRC.size:
        raise ProtocolError(f"message truncated ({size} bytes)")
    (crc,) = _CRC.unpack_from(data, size - _CRC.size)
    if zlib.crc32(memoryview(data)[: size - _CRC.size]) != crc:
        raise ProtocolError("checksum mismatch: message corrupted or truncated")
    (head_len,) = length.unpack_from(data, _START.size)
    end = size - _CRC.size - MAC_BYTES  # payload end
    if head_len > _MAX_HEADER[version] or start + head_len > end:
        raise ProtocolError(f"header length {head_len} does not fit the message")
    head = bytes(data[start : start + head_len])
    try:
        header = header_v3.unpack_header(head) if version == VERSION else header_v2.parse_header(head)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # any field a decoder chokes on
        raise ProtocolError(f"invalid header: {type(exc).__name__}") from None
    return header, bytes(data[start + head_len : end])
