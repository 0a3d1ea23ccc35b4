"""Frames built byte by byte from docs/wire-format.md, independently of ``edge_sdk.protocol.wire``'s encoder:
wire v2 as devices that were not upgraded still send it, and raw wire v3 frames around a hand-made header."""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
import zlib
from typing import Any


def sign(body: bytes, key: bytes | None = None) -> bytes:
    """Append the MAC (zeros without a key: for frames whose header must fail first) and the CRC-32."""
    body += hmac.new(key, body, hashlib.sha256).digest() if key else b"\x00" * 32
    return body + struct.pack("<I", zlib.crc32(body))


def v2_frame(fields: dict[str, Any] | bytes, payload: bytes = b"", key: bytes | None = None) -> bytes:
    """``FSU | 2 | header_len u32 | JSON header | payload | MAC | CRC``; ``fields`` as a dict or raw header bytes."""
    head = fields if isinstance(fields, bytes) else json.dumps(fields, separators=(",", ":")).encode()
    return sign(b"FSU\x02" + struct.pack("<I", len(head)) + head + payload, key)


def v3_frame(head: bytes, payload: bytes = b"", key: bytes | None = None, head_len: int | None = None) -> bytes:
    """``FSU | 3 | header_len u16 | binary header | payload | MAC | CRC``."""
    size = len(head) if head_len is None else head_len
    return sign(b"FSU\x03" + struct.pack("<H", size) + head + payload, key)


def v3_header(*, round_: int = 3, attempt: int = 2, num_samples: int = 17, numel: int = 4,
              base_version: bytes = b"\xab" * 32, digest: bytes = b"\x01" * 8, job_id: bytes = b"job1",
              client_id: bytes = b"dev-1", metrics: bytes = b"\x01\x01" + struct.pack("<f", 0.5)) -> bytes:
    """A v3 header from its parts (``metrics``: count u8 then the entries, default ``{"loss": 0.5}``)."""
    return (struct.pack("<IIII", round_, attempt, num_samples, numel) + base_version + digest
            + bytes([len(job_id)]) + job_id + bytes([len(client_id)]) + client_id + metrics)
