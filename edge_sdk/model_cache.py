"""Downloads global model versions over HTTP, verified by sha256 and cached per version.

A version *is* the sha256 of its bytes, so a cached file is checked once on arrival and never refetched.
Interrupted downloads resume with an HTTP Range request, which matters on a flaky cellular link.
The session carries the device's bearer token, so every URL is checked against the configured coordinator
origin first and redirects are not followed (a redirect elsewhere is an error, not a detour).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import requests

from .coordinator_origin import CoordinatorOrigin, check_version
from .protocol.errors import ProtocolError
from .protocol.modelfile import sha256_hex
from .protocol.patch import apply_patch, patch_target

log = logging.getLogger(__name__)


class ModelDownloadError(RuntimeError):
    """The coordinator could not deliver a verified model version."""


@dataclass
class Fetched:
    data: bytes
    version: str
    transferred: int  # bytes that crossed the network for this call (0 on a cache hit)


class ModelCache:
    """A per-device cache of global model files keyed by version (sha256)."""

    def __init__(self, directory: Path, session: requests.Session, keep: int = 4, timeout: float = 60.0,
                 origin: CoordinatorOrigin | None = None) -> None:
        self.directory = Path(directory)
        self.origin = origin  # when set, no request leaves for any other origin
        self.directory.mkdir(parents=True, exist_ok=True)
        self._http = session
        self._keep = keep
        self._timeout = timeout

    def path(self, version: str) -> Path:
        return self.directory / f"{check_version(version)}.fsm"

    def _checked(self, url: str) -> str:
        return url if self.origin is None else self.origin.check(url)

    def get(self, url: str, version: str, patch_url: str | None = None) -> Fetched:
        """The bytes of ``version``: from the cache, else as a patch against the newest cached version
        (``patch_url?from=<cached>``), else in full from ``url`` (resuming a partial download)."""
        final = self.path(version)
        self._checked(url)
        if patch_url is not None:
            self._checked(patch_url)
        if final.exists():
            data = final.read_bytes()
            if sha256_hex(data) == version:
                return Fetched(data, version, 0)
            log.warning("cached model %s is corrupt; downloading again", version[:12])
            final.unlink()
        if patch_url is not None:
            patched = self._via_patch(patch_url, version)
            if patched is not None:
                return patched
        return self._download(url, version)

    def _via_patch(self, patch_url: str, version: str) -> Fetched | None:
        base = self.latest_cached()
        if base is None:
            return None
        try:
            resp = self._http.get(self._checked(patch_url), params={"from": base}, timeout=self._timeout,
                                  allow_redirects=False)
            if resp.status_code != 200:
                log.debug("no patch %s -> %s (HTTP %d); full download", base[:12], version[:12], resp.status_code)
                return None
            if patch_target(resp.content)[1] != version:  # cheap header check before any work
                return None
            data = apply_patch(self.path(base).read_bytes(), resp.content)  # verifies data hashes to version
        except (requests.RequestException, ProtocolError, OSError) as exc:
            log.warning("patch download failed (%s); falling back to the full model", exc)
            return None
        self.put(data, version)
        return Fetched(data, version, len(resp.content))

    def _download(self, url: str, version: str) -> Fetched:
        final = self.path(version)
        part = final.with_suffix(".part")
        transferred = 0
        for attempt in range(3):
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self._http.get(self._checked(url), headers=headers, stream=True, timeout=self._timeout,
                                    allow_redirects=False) as resp:
                    if resp.status_code == 416:  # our partial file is already complete (or bogus)
                        pass
                    elif resp.status_code not in (200, 206):
                        raise ModelDownloadError(f"GET {url} -> HTTP {resp.status_code}: {resp.text[:200]}")
                    else:
                        mode = "ab" if resp.status_code == 206 else "wb"
                        with open(part, mode) as fh:
                            for chunk in resp.iter_content(1 << 20):
                                fh.write(chunk)
                                transferred += len(chunk)
            except requests.RequestException as exc:
                log.warning("model download interrupted (%s); attempt %d/3", exc, attempt + 1)
                continue
            data = part.read_bytes()
            if sha256_hex(data) == version:
                os.replace(part, final)
                self._prune()
                return Fetched(data, version, transferred)
            log.warning("downloaded model does not match version %s; retrying from scratch", version[:12])
            part.unlink()
        raise ModelDownloadError(f"could not download a verified copy of model {version[:12]} from {url}")

    def put(self, data: bytes, version: str | None = None) -> str:
        """Store bytes obtained another way (e.g. rebuilt from a downlink patch); returns the version.
        ``version``: the sha256 the caller has already verified ``data`` against (saves a second pass)."""
        version = sha256_hex(data) if version is None else check_version(version)
        tmp = self.path(version).with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path(version))
        self._prune()
        return version

    def latest_cached(self) -> str | None:
        files = sorted(self.directory.glob("*.fsm"), key=lambda p: p.stat().st_mtime, reverse=True)
        return next((f.stem for f in files if len(f.stem) == 64), None)

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.fsm"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[self._keep:]:
            old.unlink(missing_ok=True)
