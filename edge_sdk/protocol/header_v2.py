"""Wire v2's JSON update header, still accepted from devices that were not upgraded to wire v3.

Nothing writes it any more (``wire.encode_update`` writes v3); the coordinator parses it into the same
:class:`UpdateHeader`, turning the spec the device echoed into its digest so that one comparison serves both
versions.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .codec_digest import codec_digest
from .errors import ProtocolError
from .update_header import UpdateHeader, check_ranges

MAX_HEADER_BYTES = 64 * 1024


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


def parse_header(head: bytes) -> UpdateHeader:
    """JSON header bytes -> header; every failure a ``ProtocolError`` (a spec that is not a valid codec too)."""
    try:
        raw = json.loads(head)
    except RecursionError:  # e.g. 30k nested '[': the parser recurses once per level
        raise ProtocolError("header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise ProtocolError(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("header must be a JSON object")
    header = UpdateHeader(
        job_id=_require(raw, "job_id", str),
        round=_require(raw, "round", int),
        client_id=_require(raw, "client_id", str),
        base_version=_require(raw, "base_version", str),
        codec_digest=b"",  # below, once the ranges passed
        num_samples=_require(raw, "num_samples", int),
        numel=_require(raw, "numel", int),
        metrics=_metrics(raw.get("metrics", {})),
        attempt=_require(raw, "attempt", int),
    )
    if "token" in raw:
        raise ProtocolError("header carries a 'token': wire v2 never sends secrets (the update is MAC-signed)")
    spec = _require(raw, "codec", dict)
    check_ranges(header)
    try:
        header.codec_digest = codec_digest(spec)
    except ProtocolError as exc:
        raise ProtocolError(f"header field 'codec' is not a codec spec: {exc.reason}") from None
    return header
