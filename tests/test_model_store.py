"""Content-addressed, write-once model store."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest

from coordinator.storage.model_store import ModelStore, ModelStoreError, is_version


def test_put_get_addressed_by_sha256(tmp_path):
    ms = ModelStore(tmp_path)
    data = b"FSM1" + os.urandom(1000)
    v = ms.put(data)
    assert v == hashlib.sha256(data).hexdigest() and is_version(v)
    assert ms.get(v) == data and ms.has(v) and ms.size(v) == len(data)
    assert ms.versions() == [v]
    assert not any(p.name.startswith(".tmp") for p in ms.path(v).parent.iterdir())


def test_write_once_never_overwrites(tmp_path):
    ms = ModelStore(tmp_path)
    data = b"model-bytes"
    v = ms.put(data)
    inode = ms.path(v).stat().st_ino
    assert ms.put(data) == v
    assert ms.path(v).stat().st_ino == inode  # the second put did not replace the file
    assert oct(ms.path(v).stat().st_mode & 0o777) == oct(0o444)


def test_corruption_detected(tmp_path):
    ms = ModelStore(tmp_path)
    v = ms.put(b"original")
    p = ms.path(v)
    os.chmod(p, 0o644)
    p.write_bytes(b"tampered")
    with pytest.raises(ModelStoreError):
        ms.get(v)
    assert ms.get(v, verify=False) == b"tampered"


def test_bad_versions_rejected(tmp_path):
    ms = ModelStore(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, "a" * 63, ""):
        assert not ms.has(bad)
        with pytest.raises(ValueError):
            ms.path(bad)
    with pytest.raises(KeyError):
        ms.get("c" * 64)


def test_concurrent_puts_of_same_content(tmp_path):
    ms = ModelStore(tmp_path)
    data = os.urandom(1 << 16)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ms.put(data))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {hashlib.sha256(data).hexdigest()}
    assert ms.get(results[0]) == data
