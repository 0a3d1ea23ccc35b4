"""Wire format v2 for model updates: one self-describing, authenticated binary message per update.

Layout (little-endian)::

    b"FSU" | version u8 (=2) | header_len u32 | header (UTF-8 JSON) | payload (codec bytes) | mac 32B | crc32 u32

The JSON header carries job / round / attempt / client / base version, the codec spec, sample count and
metrics; the payload is whatever the codec produced. No secret travels: ``mac`` is HMAC-SHA256 under the
device's own key over every byte before it (so over the whole header and the payload), which makes a
sniffed update useless for anything but an identical replay, and the coordinator refuses those. The
trailing CRC-32 covers everything before it, so a truncated or corrupted message is told apart from a
forged one before any field is trusted.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProtocolError

MAGIC = b"FSU"
VERSION = 2
MAC_BYTES = 32
_PREFIX = struct.Struct("<3sBI")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 256 << 20


@dataclass
class UpdateHeader:
    job_id: str
    round: int
    client_id: str
    base_version: str
    codec: dict[str, Any]
    num_samples: int
    numel: int
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 1  # the task's attempt: an update for an earlier attempt of the round is stale


def _mac(key: bytes, signed: bytes | memoryview) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def encode_update(header: UpdateHeader, payload: bytes, key: bytes) -> bytes:
    """Frame ``payload`` with ``header`` and authenticate both under the device ``key``."""
    if len(key) < 16:
        raise ProtocolError("device key must be at least 16 bytes")
    head = json.dumps(asdict(header), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header too large ({len(head)} bytes > {MAX_HEADER_BYTES})")
    body = b"".join((_PREFIX.pack(MAGIC, VERSION, len(head)), head, payload))
    body += _mac(key, body)
    return body + _CRC.pack(zlib.crc32(body))


def update_mac(data: bytes) -> bytes:
    """The MAC a framed message carries (call after :func:`decode_update` accepted the frame)."""
    end = len(data) - _CRC.size
    return bytes(data[end - MAC_BYTES : end])


def verify_update(data: bytes, key: bytes) -> bool:
    """True if ``data`` (a frame :func:`decode_update` accepted) was authenticated under ``key``."""
    end = len(data) - _CRC.size - MAC_BYTES
    if end < _PREFIX.size:
        return False
    return hmac.compare_digest(_mac(key, memoryview(data)[:end]), update_mac(data))


def _require(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"header field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ProtocolError("header field 'metrics' must be an object of numbers")
    out: dict[str, float] = {}
    for key, value in raw.items():
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value)):
            raise ProtocolError(f"metric {key!r} is not a finite number")
        out[str(key)] = float(value)
    return out


def decode_update(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[UpdateHeader, bytes]:
    """Parse and check one message's frame; every failure is a ``ProtocolError`` with a readable reason.

    The header is not yet authentic: look up the key of ``header.client_id`` and call :func:`verify_update`
    before trusting any field."""
    size = len(data)
    if size > max_bytes:
        raise ProtocolError(f"message too large ({size} bytes > limit {max_bytes})")
    if size < _PREFIX.size:
        raise ProtocolError(f"message truncated ({size} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a FedSight update (bad magic bytes)")
    if version != VERSION:
        raise ProtocolError(f"unsupported wire version {version} (this coordinator speaks {VERSION})")
    if size < _PREFIX.size + MAC_BYTES + _CRC.size:
        raise ProtocolError(f"message truncated ({size} bytes)")
    (crc,) = _CRC.unpack_from(data, size - _CRC.size)
    if zlib.crc32(memoryview(data)[: size - _CRC.size]) != crc:
        raise ProtocolError("checksum mismatch: message corrupted or truncated")
    start = _PREFIX.size
    end = size - _CRC.size - MAC_BYTES  # payload end
    if head_len > MAX_HEADER_BYTES or start + head_len > end:
        raise ProtocolError(f"header length {head_len} does not fit the message")
    try:
        raw = json.loads(bytes(data[start : start + head_len]))
    except RecursionError:  # e.g. 30k nested '[': the parser recurses once per level
        raise ProtocolError("header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise ProtocolError(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("header must be a JSON object")
    try:
        return _header(raw, data, start + head_len, end)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # any field a decoder chokes on
        raise ProtocolError(f"invalid header: {type(exc).__name__}") from None


def _header(raw: dict[str, Any], data: bytes, payload_start: int, payload_end: int) -> tuple[UpdateHeader, bytes]:
    header = UpdateHeader(
        job_id=_require(raw, "job_id", str),
        round=_require(raw, "round", int),
        client_id=_require(raw, "client_id", str),
        base_version=_require(raw, "base_version", str),
        codec=_require(raw, "codec", dict),
        num_samples=_require(raw, "num_samples", int),
        numel=_require(raw, "numel", int),
        metrics=_metrics(raw.get("metrics", {})),
        attempt=_require(raw, "attempt", int),
    )
    if "token" in raw:
        raise ProtocolError("header carries a 'token': wire v2 never sends secrets (the update is MAC-signed)")
    if header.num_samples <= 0:
        raise ProtocolError(f"num_samples must be positive, got {header.num_samples}")
    if header.numel <= 0 or header.round < 0 or header.attempt < 1:
        raise ProtocolError("numel must be positive, round non-negative and attempt at least 1")
    return header, bytes(data[payload_start:payload_end])
