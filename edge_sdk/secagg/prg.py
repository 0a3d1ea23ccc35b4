"""Key derivation and mask expansion: X25519 + HKDF-SHA256 and the ChaCha20 keystream (``cryptography``).

Every derived key is bound to the round's context (job, round, attempt) and to the ordered pair of devices,
so nothing derived in one round is reused in another and a share encrypted for one round cannot be
decrypted under another's key.
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SEED_BYTES = 16  # one Shamir chunk: pycryptodome's Shamir works on 16-byte secrets
PUBLIC_BYTES = 32
_ZERO_NONCE16 = bytes(16)


def hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"fedsight/secagg/v1|" + info).derive(
        material)


def mask_private_key(seed: bytes, context: bytes) -> X25519PrivateKey:
    """The masking key pair comes from a 16-byte seed, so the secret that is Shamir-shared is one chunk."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask key seed must be {SEED_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(hkdf(seed, b"mask-sk|" + context))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != PUBLIC_BYTES:
        raise ValueError(f"X25519 public key must be {PUBLIC_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def usable_public(raw: bytes) -> bool:
    """False for a key every agreement with would fail (low-order point: all-zero shared secret), so one
    device cannot make its neighbours' key agreement throw."""
    try:
        X25519PrivateKey.generate().exchange(load_public(raw))
    except ValueError:
        return False
    return True


def _pair(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"{lo}|{hi}".encode()


def pair_mask_key(own: X25519PrivateKey, peer_public: bytes, context: bytes, me: str, peer: str) -> bytes:
    """The 32-byte ChaCha20 key two devices share for their pairwise mask (same on both sides)."""
    shared = own.exchange(load_public(peer_public))
    return hkdf(shared, b"pair-mask|" + context + b"|" + _pair(me, peer))


def share_encryption_key(own: X25519PrivateKey, peer_public: bytes, context: bytes, sender: str,
                         recipient: str) -> bytes:
    """AES-GCM key for the shares ``sender`` encrypts for ``recipient`` (directional: each key encrypts once)."""
    shared = own.exchange(load_public(peer_public))
    return hkdf(shared, b"share-enc|" + context + b"|" + f"{sender}>{recipient}".encode())


def self_mask_key(seed: bytes, context: bytes) -> bytes:
    return hkdf(seed, b"self-mask|" + context)


def expand(key: bytes, k: int) -> np.ndarray:
    """``k`` uniform uint32 ring elements: the ChaCha20 keystream under ``key`` (used for one mask only)."""
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * k)), dtype="<u4").astype(np.uint32)
