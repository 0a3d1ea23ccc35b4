"""Checks every incoming update must pass before it may touch a round's aggregate.

An update arrives as raw MQTT bytes from an untrusted device. The checks run cheapest-first and in the
order of DESIGN.md's "Coordinator update path": size (before any parsing), wire frame, MAC under the
sender's device key, topic identity, replay, job, round and attempt, selection, base version, duplicate,
codec, numel, payload decode, finiteness. Each failure raises
:class:`Rejected` carrying a stable machine-readable ``code`` (what tests, dashboards and devices branch on)
plus a human-readable ``detail``; ``reason`` is what is acked to the device and stored.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any, Protocol

import numpy as np

from edge_sdk.protocol import codecs
from edge_sdk.protocol.codec_digest import codec_digest, comparable_codec
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.protocol.wire import UpdateHeader, decode_update, verify_update

# Stable rejection codes (documented in docs/mqtt.md).
OVERSIZE = "oversize"
MALFORMED = "malformed"
TRUNCATED = "truncated"
UNKNOWN_CLIENT = "unknown_client"
BAD_MAC = "bad_mac"
REPLAYED = "replayed"
CLIENT_MISMATCH = "client_mismatch"
WRONG_JOB = "wrong_job"
STALE_ROUND = "stale_round"
NOT_SELECTED = "not_selected"
OLD_BASE_VERSION = "old_base_version"
DUPLICATE = "duplicate"
WRONG_CODEC = "wrong_codec"
WRONG_NUMEL = "wrong_numel"
BAD_PAYLOAD = "bad_payload"
NON_FINITE = "non_finite"
INTERNAL_ERROR = "internal_error"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"  # the coordinator could not store the update durably (e.g. disk full): send it later

REASON_CODES = (OVERSIZE, MALFORMED, TRUNCATED, UNKNOWN_CLIENT, BAD_MAC, CLIENT_MISMATCH, REPLAYED, WRONG_JOB,
                STALE_ROUND, NOT_SELECTED, OLD_BASE_VERSION, DUPLICATE, WRONG_CODEC, WRONG_NUMEL, BAD_PAYLOAD,
                NON_FINITE, INTERNAL_ERROR, RATE_LIMITED, UNAVAILABLE)

# Rejections that do not prove who sent the message: counted per round as junk (messages, bytes) but not
# stored as ``updates`` rows, so a flood of garbage costs the coordinator no database growth. A replay
# carries a valid MAC, but anyone who saw the bytes can resend them, so it is junk too.
UNAUTHENTICATED = frozenset({OVERSIZE, MALFORMED, TRUNCATED, UNKNOWN_CLIENT, BAD_MAC, CLIENT_MISMATCH, REPLAYED,
                             RATE_LIMITED})

class Rejected(Exception):
    """An update that must not be aggregated; ``reason`` is ``code`` or ``code: detail``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return str(self)


class RoundView(Protocol):
    """What a round exposes to validation (implemented by ``coordinator.rounds.open_round.OpenRound``)."""

    job_id: str
    round: int
    attempt: int
    base_version: str
    codec: dict[str, Any]
    numel: int
    layout_sizes: list[int]
    statistics: np.ndarray | None
    secagg: Any  # the round's secure-aggregation server, or None
    selected: Collection[str]
    accepted_clients: Collection[str]
    max_update_bytes: int
    closed: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_size(nbytes: int, limit: int) -> None:
    """Runs before any byte is parsed, so an oversize message costs nothing but its receipt."""
    if nbytes > limit:
        raise Rejected(OVERSIZE, f"{nbytes} bytes > limit {limit}")


def parse_message(raw: bytes, limit: int) -> tuple[UpdateHeader, bytes]:
    """Wire frame (v3, or v2 from a device not yet upgraded) -> (header, payload). A CRC failure cannot tell
    truncation from corruption; the decoder reports both as 'corrupted or truncated', filed under ``truncated``."""
    check_size(len(raw), limit)
    try:
        return decode_update(raw, max_bytes=limit)
    except ProtocolError as exc:
        code = TRUNCATED if "truncat" in exc.reason else MALFORMED
        raise Rejected(code, exc.reason) from None


def check_client(header: UpdateHeader, raw: bytes, topic_client_id: str,
                 key_of: Callable[[str], bytes | None]) -> None:
    """Registered (unrevoked) client, message authenticated under its key, published on its own topic.

    The MAC covers the whole header, so a copy re-labelled for another device fails here and an exact
    copy sent on another device's topic fails the topic check."""
    key = key_of(header.client_id)
    if key is None:
        raise Rejected(UNKNOWN_CLIENT, f"client {header.client_id[:64]!r} is not registered")
    if not verify_update(raw, key):
        raise Rejected(BAD_MAC, "message authentication failed: not signed with this client's device key")
    if header.client_id != topic_client_id:
        raise Rejected(CLIENT_MISMATCH, f"header says {header.client_id!r}, published on {topic_client_id!r}'s topic")


def check_round(header: UpdateHeader, nbytes: int, rnd: RoundView | None) -> None:
    """Everything about the update's place in the round, checked before its payload is decoded."""
    if rnd is None or rnd.closed:
        raise Rejected(STALE_ROUND, f"no round of job {header.job_id!r} is open (sent for round {header.round})")
    if header.round != rnd.round:
        raise Rejected(STALE_ROUND, f"sent for round {header.round}, open round is {rnd.round}")
    if header.attempt != rnd.attempt:
        raise Rejected(STALE_ROUND, f"sent for attempt {header.attempt} of round {rnd.round}, "
                                    f"open attempt is {rnd.attempt}")
    if header.client_id not in rnd.selected:
        raise Rejected(NOT_SELECTED, f"client was not selected for round {rnd.round}")
    if rnd.secagg is not None:  # never fold one update in the clear into a secure round's sum
        raise Rejected(WRONG_CODEC, f"round {rnd.round} uses secure aggregation: only masked input through the "
                                    "protocol is accepted, not a plain update")
    if header.base_version != rnd.base_version:
        raise Rejected(OLD_BASE_VERSION,
                       f"trained on {header.base_version[:12]!r}, round base is {rnd.base_version[:12]}")
    if header.client_id in rnd.accepted_clients:
        raise Rejected(DUPLICATE, f"an update from this client was already accepted for round {rnd.round}")
    expected = codec_digest(rnd.codec)  # the header names its codec by digest (edge_sdk/protocol/codec_digest.py)
    if header.codec_digest != expected:
        raise Rejected(WRONG_CODEC, f"update was encoded with codec {header.codec_digest.hex()}, round expects "
                                    f"{comparable_codec(rnd.codec)} (codec {expected.hex()})")
    if header.numel != rnd.numel:
        raise Rejected(WRONG_NUMEL, f"update has numel {header.numel}, model has {rnd.numel}")
    check_size(nbytes, rnd.max_update_bytes)


def decode_payload(header: UpdateHeader, payload: bytes, rnd: RoundView) -> codecs.Decoded:
    """Codec-decode (bounded by numel, hostile-input safe). ``codecs.decode`` refuses NaN/Inf itself, so no
    second pass over the values is spent here on the per-update hot path."""
    try:
        decoded = codecs.decode(rnd.codec, payload, rnd.numel, rnd.layout_sizes, rnd.statistics)
    except ProtocolError as exc:
        # the value decoder already refuses NaN/Inf (quant.dequantize); keep that distinct from garbage
        raise Rejected(NON_FINITE if "non-finite" in exc.reason else BAD_PAYLOAD, exc.reason) from None
    except (ValueError, IndexError, OverflowError, RecursionError) as exc:  # a decoder that missed a case
        raise Rejected(BAD_PAYLOAD, f"payload could not be decoded ({type(exc).__name__})") from None
    values = np.asarray(decoded.values)
    expected = rnd.numel if decoded.indices is None else np.asarray(decoded.indices).size
    if values.ndim != 1 or values.size != expected:
        raise Rejected(BAD_PAYLOAD, f"decoded {values.size} values, expected {expected}")
    return decoded
