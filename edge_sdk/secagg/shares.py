"""t-of-m Shamir shares of 16-byte seeds (pycryptodome) and their per-peer AES-GCM envelopes.

A device's shares go to its neighbours in the order of the roster the coordinator sent; a share's x
coordinate is the holder's 1-based position in the sharer's holder list, so both sides and the coordinator
agree on it without sending it. Each envelope carries two shares (the masking-key seed and the self-mask
seed) and is authenticated with the round context and both device ids as associated data.
"""
from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SHARE_BYTES = 16
PLAIN_BYTES = 2 * SHARE_BYTES
CIPHER_BYTES = PLAIN_BYTES + 16  # AES-GCM tag
_NONCE = bytes(12)  # every key encrypts exactly one envelope (derived per round, sender and recipient)


def threshold(holders: int) -> int:
    """Shares needed to rebuild a secret held by ``holders`` devices: a strict majority, so the coordinator
    and a minority of colluding neighbours learn nothing, while up to just under half may drop."""
    return holders // 2 + 1


def split(secret: bytes, t: int, m: int) -> list[bytes]:
    """``m`` shares (for x = 1..m) of which any ``t`` rebuild ``secret``."""
    if len(secret) != SHARE_BYTES:
        raise ValueError(f"secret must be {SHARE_BYTES} bytes")
    if m == 1:
        return [secret] if t == 1 else []
    return [share for _, share in sorted(Shamir.split(t, m, secret, ssss=False))]


def combine(points: list[tuple[int, bytes]]) -> bytes:
    """The secret from ``(x, share)`` points (any ``t`` of them, x 1-based)."""
    if len(points) == 1 and points[0][0] == 1:
        return points[0][1]
    return Shamir.combine(points, ssss=False)


def _aad(context: bytes, sender: str, recipient: str) -> bytes:
    return context + b"|" + f"{sender}>{recipient}".encode()


def seal(key: bytes, context: bytes, sender: str, recipient: str, mask_share: bytes, self_share: bytes) -> bytes:
    if len(mask_share) != SHARE_BYTES or len(self_share) != SHARE_BYTES:
        raise ValueError("shares must be 16 bytes")
    return AESGCM(key).encrypt(_NONCE, mask_share + self_share, _aad(context, sender, recipient))


def open_envelope(key: bytes, context: bytes, sender: str, recipient: str, blob: bytes) -> tuple[bytes, bytes]:
    """``(mask-key share, self-mask share)``; ValueError if the envelope was not sealed for this round and
    pair (wrong round, wrong recipient, tampered)."""
    if len(blob) != CIPHER_BYTES:
        raise ValueError(f"share envelope is {len(blob)} bytes, expected {CIPHER_BYTES}")
    try:
        plain = AESGCM(key).decrypt(_NONCE, blob, _aad(context, sender, recipient))
    except InvalidTag:
        raise ValueError(f"share envelope from {sender} does not authenticate for this round") from None
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]
