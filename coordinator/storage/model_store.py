"""Global model versions on disk, addressed by the sha256 of their FSM1 bytes and never overwritten.

A version name *is* its content hash, so a file, once written, is immutable: devices cache by version, the
REST layer uses it as an ETag, and a reader can never observe a half-written file because new versions are
written to a temporary file and hard-linked into place (``link`` fails instead of replacing).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^[0-9a-f]{64}$")


class ModelStoreError(RuntimeError):
    """A stored file does not match its version (disk corruption or tampering)."""


def is_version(value: str) -> bool:
    """True for a well-formed version string (also keeps path traversal out of file names)."""
    return bool(_VERSION_RE.match(value))


class ModelStore:
    """Write-once, content-addressed blob store for FSM1 model files."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        if not is_version(version):
            raise ValueError(f"not a model version (64 lowercase hex chars): {version[:80]!r}")
        return self.root / version[:2] / f"{version}.fsm"

    def has(self, version: str) -> bool:
        return is_version(version) and self.path(version).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its version; storing the same bytes again is a no-op."""
        version = hashlib.sha256(data).hexdigest()
        final = self.path(version)
        if final.is_file():
            return version
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o444)
            try:
                os.link(tmp, final)  # atomic and, unlike rename, refuses to replace an existing file
            except FileExistsError:
                pass  # a concurrent writer stored the same content first
            except OSError:  # filesystems without hard links
                if not final.exists():
                    os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.debug("stored model version %s (%d bytes)", version[:12], len(data))
        return version

    def get(self, version: str, verify: bool = True) -> bytes:
        """The bytes of ``version``; KeyError if absent, ModelStoreError if they no longer hash to it."""
        path = self.path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(version) from None
        if verify and hashlib.sha256(data).hexdigest() != version:
            raise ModelStoreError(f"model file {path} does not match its version; refusing to serve it")
        return data

    def size(self, version: str) -> int:
        return self.path(version).stat().st_size

    def versions(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("??/*.fsm") if is_version(p.stem))
