"""The fields of one model update's header, whichever wire version framed them (``wire.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ProtocolError


@dataclass
class UpdateHeader:
    """What a device says about its update; authentic only once ``wire.verify_update`` accepted the frame.

    ``codec_digest`` names the codec the payload was encoded with (``codec_digest.codec_digest(spec)``): the
    coordinator decodes with the round's own spec and only compares the digest."""

    job_id: str
    round: int
    client_id: str
    base_version: str  # sha256 hex of the global model the device trained from
    codec_digest: bytes
    num_samples: int
    numel: int
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 1  # the task's attempt: an update for an earlier attempt of the round is stale


def check_ranges(header: UpdateHeader) -> None:
    """The value ranges every wire version enforces (encoders and decoders alike)."""
    if header.num_samples <= 0:
        raise ProtocolError(f"num_samples must be positive, got {header.num_samples}")
    if header.numel <= 0 or header.round < 0 or header.attempt < 1:
        raise ProtocolError("numel must be positive, round non-negative and attempt at least 1")
