"""Wire v3's binary update header: fixed-width numbers, raw hashes, length-prefixed strings.

Layout (little-endian; ``docs/wire-format.md`` has the byte table)::

    round u32 | attempt u32 | num_samples u32 | numel u32 | base_version 32B (raw sha256) | codec digest 8B
    | job_id_len u8 | job_id | client_id_len u8 | client_id | metric_count u8
    | metric_count x (tag u8 [| name_len u8 | name] | value f32)

A metric's tag is its index + 1 in :data:`METRIC_NAMES` (the names every device reports), or 0 with its name
spelled out. Values are float32: metrics are display numbers a device rounds to 4 significant digits
(``edge_sdk.update.wire_metrics``) and float32 carries 7, so what the coordinator stores is exactly what the
device computed, in half the bytes of float64. A demo device's header takes 115 bytes here, 451 as wire v2 JSON.
"""
from __future__ import annotations

import math
import re
import struct
from numbers import Real

import numpy as np

from .codec_digest import DIGEST_BYTES
from .errors import ProtocolError
from .update_header import UpdateHeader, check_ranges

_FIXED = struct.Struct(f"<IIII32s{DIGEST_BYTES}s")
_U8 = struct.Struct("<B")
_F32 = struct.Struct("<f")
U32_MAX = 2**32 - 1
MAX_TEXT_BYTES = 255  # ids and metric names: u8 length, at least 1 byte
MAX_METRICS = 255
MAX_HEADER_BYTES = 2**16 - 1  # header_len is a u16
# Append only: a tag's meaning never changes once devices send it.
METRIC_NAMES = ("loss", "accuracy", "train_time_s", "eval_loss", "eval_accuracy", "eval_samples")
_TAG = {name: i + 1 for i, name in enumerate(METRIC_NAMES)}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _uint(header: UpdateHeader, name: str) -> int:
    value = getattr(header, name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
        raise ProtocolError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return value


def _text(value: object, what: str) -> bytes:
    raw = value.encode("utf-8", "strict") if isinstance(value, str) else None
    if raw is None or not 1 <= len(raw) <= MAX_TEXT_BYTES:
        raise ProtocolError(f"{what} must be a string of 1-{MAX_TEXT_BYTES} UTF-8 bytes, got {str(value)[:80]!r}")
    return _U8.pack(len(raw)) + raw


def _metric(name: object, value: object) -> bytes:
    try:
        number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
        packed = _F32.pack(number) if math.isfinite(number) else b""
    except OverflowError:  # an int past float64, or a float past float32
        raise ProtocolError(f"metric {str(name)[:80]!r} is beyond float32's range") from None
    if not packed:
        raise ProtocolError(f"metric {str(name)[:80]!r} is not a finite number")
    tag = _TAG.get(name) if isinstance(name, str) else None
    return _U8.pack(tag) + packed if tag else b"\x00" + _text(name, "a metric name") + packed


def pack_header(header: UpdateHeader) -> bytes:
    """The header's bytes; ``ProtocolError`` for any field the decoder would refuse."""
    try:
        base = bytes.fromhex(header.base_version) if _SHA256_HEX.fullmatch(header.base_version) else None
    except TypeError:  # not a str
        base = None
    if base is None:
        raise ProtocolError(f"base_version must be a sha256 as 64 lowercase hex characters, "
                            f"got {str(header.base_version)[:80]!r}")
    digest = header.codec_digest
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise ProtocolError(f"codec_digest must be {DIGEST_BYTES} bytes (codec_digest(spec)), got {digest!r:.80}")
    nums = [_uint(header, name) for name in ("round", "attempt", "num_samples", "numel")]
    check_ranges(header)
    if not isinstance(header.metrics, dict) or len(header.metrics) > MAX_METRICS:
        raise ProtocolError(f"metrics must be a dict of at most {MAX_METRICS} entries")
    try:
        ids = _text(header.job_id, "job_id") + _text(header.client_id, "client_id")
        metrics = b"".join(_metric(k, v) for k, v in header.metrics.items())
    except UnicodeEncodeError:  # e.g. a lone surrogate
        raise ProtocolError("job_id, client_id and metric names must be encodable as UTF-8") from None
    head = b"".join((_FIXED.pack(*nums, base, digest), ids, _U8.pack(len(header.metrics)), metrics))
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header too large ({len(head)} bytes > {MAX_HEADER_BYTES})")
    return head


class _Reader:
    """Bounded reads over the header bytes: running past its end is a readable ``ProtocolError``."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError(f"header field {what} runs past the header's end ({len(self.buf)} bytes)")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def text(self, what: str) -> str:
        size = self.u8(f"{what} length")
        if size == 0:
            raise ProtocolError(f"header field {what} is empty")
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"header field {what} is not valid UTF-8") from None


def _read_metrics(reader: _Reader) -> dict[str, float]:
    out: dict[str, float] = {}
    for _ in range(reader.u8("'metric count'")):
        tag = reader.u8("'metric tag'")
        if tag > len(METRIC_NAMES):
            raise ProtocolError(f"unknown metric tag {tag} (this coordinator knows 0-{len(METRIC_NAMES)})")
        name = METRIC_NAMES[tag - 1] if tag else reader.text("'metric name'")
        (value,) = _F32.unpack(reader.take(_F32.size, f"metric {name[:80]!r}"))
        if not math.isfinite(value):
            raise ProtocolError(f"metric {name[:80]!r} is not a finite number")
        if name in out:
            raise ProtocolError(f"metric {name[:80]!r} appears twice")
        out[name] = float(str(np.float32(value)))  # the shortest decimal of the float32: 0.9583, not 0.95829999
    return out


def unpack_header(head: bytes) -> UpdateHeader:
    """Header bytes (exactly ``header_len`` of them) -> header; every failure a ``ProtocolError``."""
    reader = _Reader(head)
    rnd, attempt, num_samples, numel, base, digest = _FIXED.unpack(reader.take(_FIXED.size, "'fixed fields'"))
    job_id = reader.text("'job_id'")
    client_id = reader.text("'client_id'")
    header = UpdateHeader(job_id=job_id, round=rnd, client_id=client_id, base_version=base.hex(),
                          codec_digest=digest, num_samples=num_samples, numel=numel,
                          metrics=_read_metrics(reader), attempt=attempt)
    if reader.pos != len(head):
        raise ProtocolError(f"header length {len(head)} does not match its fields ({reader.pos} bytes)")
    check_ranges(header)
    return header
