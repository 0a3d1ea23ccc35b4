"""The short codec identifier a wire v3 update carries instead of its codec spec.

A device and the coordinator must agree on how the payload was encoded, but the coordinator decodes with the
round's own spec, so the header only needs to *name* that spec. Both sides call :func:`codec_digest`: the
first ``DIGEST_BYTES`` bytes of sha256 over the canonical JSON of :func:`comparable_codec`, i.e. the spec
normalised by ``codecs.validate_spec`` with the encoder-only keys left out. Two specs that decode alike have
one digest whatever defaults a device spelled out; eight bytes make an accidental match between two specs
a 2**-64 event. The digest is no security boundary: the MAC authenticates the update.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from . import codecs

DIGEST_BYTES = 8

# Keys of a codec spec that only change how a device *encodes* (its residual, its rounding noise, byte planes
# for a dense block, which every decoder of a dense spec reads); a
# device may choose them freely, everything else must match the round's codec exactly.
ENCODER_ONLY_KEYS = frozenset({"error_feedback", "stochastic", "planes"})


def comparable_codec(spec: dict[str, Any]) -> dict[str, Any]:
    """The decode-relevant part of a normalised codec spec (seed matters only for rand-k's mask).

    ``ProtocolError`` if ``spec`` is not a valid codec spec."""
    norm = codecs.validate_spec(spec)
    out = {k: v for k, v in norm.items() if k not in ENCODER_ONLY_KEYS}
    if out["name"] != "randk":
        out.pop("seed", None)
    return out


def codec_digest(spec: dict[str, Any]) -> bytes:
    """``DIGEST_BYTES`` bytes identifying ``spec`` as the coordinator decodes it (``ProtocolError`` if invalid)."""
    canonical = json.dumps(comparable_codec(spec), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()[:DIGEST_BYTES]
