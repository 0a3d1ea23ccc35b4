"""The coordinator's secrets for one data dir: operator token, enrollment secret and device keys.

* **Operator token** guards every operator endpoint. Only its sha256 is kept in the database (``meta``);
  the plain token is written once, 0600, to ``<data_dir>/operator-token`` so the local CLI finds it. The
  operator may move it elsewhere and delete the file: the coordinator never needs it again.
* **Enrollment secret** (fleet-wide) is what a new device shows to register; same storage as the token.
* **Device keys** are derived, ``HMAC-SHA256(master_key, client_id)``, from the 0600 ``master.key``: the
  database holds no device secret, and a device learns its key once, in the registration response.

Every check re-reads the hash from the database, so a rotation (``fedsight auth rotate``, which may run in
another process on the same data dir) takes effect at once.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from coordinator.auth.secret_files import load_or_create, write_secret
from coordinator.storage.store import Store

MASTER_FILE = "master.key"
OPERATOR_FILE = "operator-token"
ENROLL_FILE = "enroll-secret"
OPERATOR_HASH_KEY = "operator_token_sha256"
ENROLL_HASH_KEY = "enroll_secret_sha256"
_DEVICE_KEY_LABEL = b"fedsight/device-key/v1\x00"
_KINDS = {"operator-token": (OPERATOR_FILE, OPERATOR_HASH_KEY, "fso_"),
          "enroll-secret": (ENROLL_FILE, ENROLL_HASH_KEY, "fse_")}


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _matches(value: str | None, expected_hash: str | None) -> bool:
    if not value or not expected_hash:
        return False
    return hmac.compare_digest(sha256_text(value), expected_hash)


class Credentials:
    """Loads (or creates on first start) the secrets of ``data_dir``; all checks are constant-time."""

    def __init__(self, data_dir: Path | str, store: Store) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        self._master, _ = load_or_create(self.data_dir / MASTER_FILE, lambda: secrets.token_bytes(32))
        if len(self._master) < 32:
            raise ValueError(f"{self.data_dir / MASTER_FILE} is shorter than 32 bytes; restore it from backup")
        for kind in _KINDS:
            self._ensure(kind)

    def _ensure(self, kind: str) -> None:
        """First start: generate the secret, write its file (0600) and store its hash."""
        filename, meta_key, _ = _KINDS[kind]
        if self.store.get_meta(meta_key) is not None:
            return
        path = self.data_dir / filename
        if path.exists():  # a database rebuilt next to an existing secret keeps the secret
            self.store.set_meta(meta_key, sha256_text(path.read_text().strip()))
        else:
            self.rotate(kind)

    def rotate(self, kind: str) -> str:
        """New ``operator-token`` or ``enroll-secret``: the old one stops working now. Returns the new value."""
        filename, meta_key, prefix = _KINDS[kind]
        value = prefix + secrets.token_urlsafe(32)
        write_secret(self.data_dir / filename, (value + "\n").encode())
        self.store.set_meta(meta_key, sha256_text(value))
        return value

    def path(self, kind: str) -> Path:
        return self.data_dir / _KINDS[kind][0]

    def is_operator(self, token: str | None) -> bool:
        return _matches(token, self.store.get_meta(OPERATOR_HASH_KEY))

    def enroll_ok(self, secret: str | None) -> bool:
        return _matches(secret, self.store.get_meta(ENROLL_HASH_KEY))

    def device_key(self, client_id: str) -> bytes:
        """The key a device signs its updates with; derived, so nothing per device is stored."""
        return hmac.new(self._master, _DEVICE_KEY_LABEL + client_id.encode("utf-8"), hashlib.sha256).digest()
