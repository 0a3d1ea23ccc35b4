"""Secrets on disk: created once with mode 0600, replaced atomically, never world-readable.

The coordinator's data dir holds a few small secret files (master key, operator token, enrollment
secret). They are created with ``O_EXCL`` and mode 0600 from the first byte (no chmod race), and a file
that others can read is reported, because anyone who can read it can act as the operator or a device.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def write_secret(path: Path, value: bytes) -> None:
    """Replace ``path`` atomically with ``value``; the new file is 0600 from creation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes:
    """The file's bytes; warns when group or others may read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is accessible to group/others (mode %o); run: chmod 600 %s",
                    path, stat.S_IMODE(mode), path)
    return path.read_bytes()


def load_or_create(path: Path, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """``(value, created)``: the existing secret, or a new one from ``make()`` written 0600."""
    if path.exists():
        return read_secret(path), False
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return read_secret(path), False
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created secret file %s (mode 600)", path)
    return value, True
