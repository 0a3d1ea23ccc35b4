"""Wire format of the secure-aggregation messages (both directions), and their checks.

Layout (little-endian)::

    b"FSA" | version u8 (=1) | kind u8 | flags u8 | header_len u32 | header (UTF-8 JSON) | body | [mac 32B]

The header names job / round / attempt / client (the sender for uplink, the recipient for downlink) plus the
kind's fields; the body is the kind's fixed-size binary records. Uplink messages are signed (flags bit 0):
HMAC-SHA256 under the device's own key over every byte before the MAC, as for model updates (wire v2).
Downlink messages travel on a topic only the coordinator may publish to (broker ACL), like tasks.

Peers are named by their position in the recipient's roster (ints), not by id, to keep messages small.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from . import topics
from .errors import ProtocolError

MAGIC = b"FSA"
VERSION = 1
MAC_BYTES = 32
F_SIGNED = 0x01
_PREFIX = struct.Struct("<3sBBBI")
MAX_HEADER_BYTES = 256 * 1024
MAX_PEERS = 4096

KEYS, ROSTER, SHARES, INBOX, MASKED, UNMASK, REVEAL, ABORT = range(1, 9)
KIND_NAMES = {KEYS: "keys", ROSTER: "roster", SHARES: "shares", INBOX: "inbox", MASKED: "masked",
              UNMASK: "unmask", REVEAL: "reveal", ABORT: "abort"}
UPLINK = frozenset({KEYS, SHARES, MASKED, REVEAL})

KEYS_BYTES = 96  # encryption public key | masking public key | commitment to the self-mask seed
PEER_KEY_BYTES = 64  # encryption public key | masking public key, per roster entry
ENVELOPE_BYTES = 48  # two 16-byte shares + AES-GCM tag (edge_sdk.secagg.shares.CIPHER_BYTES)
SHARE_BYTES = 16


@dataclass
class SecAggMessage:
    kind: int
    job_id: str
    round: int
    attempt: int
    client_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")


def context_bytes(job_id: str, round_: int, attempt: int) -> bytes:
    """What binds every key, envelope and mask to one round attempt."""
    return f"{job_id}/{round_}/{attempt}".encode()


def encode(msg: SecAggMessage, key: bytes | None = None) -> bytes:
    """Frame ``msg``; uplink messages must be signed with the device ``key``."""
    if (msg.kind in UPLINK) != (key is not None):
        raise ProtocolError(f"{msg.name} messages are {'signed' if msg.kind in UPLINK else 'not signed'}")
    head = json.dumps({"job_id": msg.job_id, "round": msg.round, "attempt": msg.attempt,
                       "client_id": msg.client_id, **msg.fields}, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header too large ({len(head)} bytes)")
    out = _PREFIX.pack(MAGIC, VERSION, msg.kind, F_SIGNED if key else 0, len(head)) + head + bytes(msg.body)
    return out + hmac.new(key, out, hashlib.sha256).digest() if key else out


def verify(data: bytes, key: bytes) -> bool:
    """True if a signed frame ``decode`` accepted carries a valid MAC under ``key``."""
    if len(data) < _PREFIX.size + MAC_BYTES:
        return False
    tag = hmac.new(key, memoryview(data)[:-MAC_BYTES], hashlib.sha256).digest()
    return hmac.compare_digest(tag, bytes(data[-MAC_BYTES:]))


def _int(raw: dict[str, Any], name: str, low: int = 0) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProtocolError(f"field {name!r} must be an integer >= {low}")
    return value


def _positions(raw: dict[str, Any], name: str) -> list[int]:
    value = raw.get(name)
    if (not isinstance(value, list) or len(value) > MAX_PEERS
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_PEERS for v in value)
            or len(set(value)) != len(value)):
        raise ProtocolError(f"field {name!r} must be a list of distinct roster positions")
    return value


def _number(raw: dict[str, Any], name: str) -> float:
    value = raw.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
        raise ProtocolError(f"field {name!r} must be a finite non-negative number")
    return float(value)


def decode(data: bytes, max_bytes: int = 64 << 20) -> SecAggMessage:
    """Parse one frame and check every field whose shape does not depend on the round's state.

    A signed frame is not yet authentic: verify it under ``client_id``'s key before trusting it."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message too large ({len(data)} bytes > {max_bytes})")
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"message truncated ({len(data)} bytes)")
    magic, version, kind, flags, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a FedSight secure-aggregation message (bad magic bytes)")
    if version != VERSION:
        raise ProtocolError(f"unsupported secure-aggregation version {version} (this side speaks {VERSION})")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    signed = bool(flags & F_SIGNED)
    if flags & ~F_SIGNED or signed != (kind in UPLINK):
        raise ProtocolError(f"bad flags 0x{flags:02x} for a {KIND_NAMES[kind]} message")
    end = len(data) - (MAC_BYTES if signed else 0)
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > end:
        raise ProtocolError(f"header length {head_len} does not fit the message")
    try:
        raw = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + head_len]))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("header must be a JSON object")
    for name in ("job_id", "client_id"):
        if not isinstance(raw.get(name), str) or not topics.valid_id(raw[name]):
            raise ProtocolError(f"field {name!r} missing or not a valid id")
    msg = SecAggMessage(kind, raw.pop("job_id"), _int(raw, "round"), _int(raw, "attempt", 1), raw.pop("client_id"),
                        body=bytes(data[_PREFIX.size + head_len:end]))
    raw.pop("round")
    raw.pop("attempt")
    msg.fields = _check_fields(kind, raw, len(msg.body))
    return msg


def _expect_body(kind: int, size: int, want: int, what: str) -> None:
    if size != want:
        raise ProtocolError(f"wrong size: {KIND_NAMES[kind]} body is {size} bytes, {what} make {want}")


def _check_fields(kind: int, raw: dict[str, Any], size: int) -> dict[str, Any]:
    allowed = {KEYS: set(), SHARES: set(), MASKED: {"k"}, ROSTER: {"peers", "k", "scale", "clip", "noise_var", "t", "devices"},
               INBOX: {"from"}, UNMASK: {"survivors", "dropped"}, REVEAL: {"self_masks", "pair_keys"},
               ABORT: {"reason"}}[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in a {KIND_NAMES[kind]} message")
    if kind == KEYS:
        _expect_body(kind, size, KEYS_BYTES, "two public keys and a commitment")
    elif kind == MASKED:
        _expect_body(kind, size, 4 * _int(raw, "k"), f"k={raw.get('k')} ring elements")
    elif kind == ROSTER:
        peers = raw.get("peers")
        if (not isinstance(peers, list) or not 1 <= len(peers) <= MAX_PEERS or len(set(peers)) != len(peers)
                or not all(isinstance(p, str) and topics.valid_id(p) for p in peers)):
            raise ProtocolError("field 'peers' must be a list of distinct device ids")
        _int(raw, "k")
        for name in ("scale", "clip", "noise_var"):
            _number(raw, name)
        for name in ("t", "devices"):  # optional here; a device refuses a roster without them (secagg/terms.py)
            if name in raw:
                _int(raw, name, 1)
        _expect_body(kind, size, PEER_KEY_BYTES * len(peers), f"{len(peers)} peers' keys")
    elif kind == INBOX:
        _expect_body(kind, size, ENVELOPE_BYTES * len(_positions(raw, "from")), "the listed senders' envelopes")
    elif kind == UNMASK:
        if set(_positions(raw, "survivors")) & set(_positions(raw, "dropped")):
            raise ProtocolError("a device is listed both as survivor and as dropped")
    elif kind == REVEAL:
        n = len(_positions(raw, "self_masks")) + len(_positions(raw, "pair_keys"))
        _expect_body(kind, size, SHARE_BYTES * n, "the listed shares")
    elif kind == ABORT and not isinstance(raw.get("reason"), str):
        raise ProtocolError("field 'reason' must be a string")
    return raw
