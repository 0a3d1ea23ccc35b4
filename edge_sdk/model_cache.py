"""Downloads global model versions over HTTP, verified by sha256 and cached per version.

A version *is* the sha256 of its bytes, so a cached file is checked once on arrival and never refetched.
Interrupted downloads resume with an HTTP Range request, which matters on a flaky cellular link.
Every URL must have the configured coordinator's origin: the session carries the device's bearer token,
and a task naming another host must not make the device hand it over (or fetch from there).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from .protocol.errors import ProtocolError
from .protocol.modelfile import sha256_hex
from .protocol.patch import apply_patch

log = logging.getLogger(__name__)


class ModelDownloadError(RuntimeError):
    """The coordinator could not deliver a verified model version."""


class UntrustedUrl(ModelDownloadError):
    """A model URL that points anywhere but the configured coordinator."""


_DEFAULT_PORTS = {"http": 80, "https": 443}
_VERSION_RE = re.compile(r"^[0-9a-f]{64}$")


def is_version(value: object) -> bool:
    """A model version is a lowercase sha256 hex digest (it also names cache files, so nothing else)."""
    return isinstance(value, str) and bool(_VERSION_RE.match(value))


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an absolute http(s) URL; ValueError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url[:200]!r}")
    return scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme]


def resolve_url(url: str, base_url: str) -> str:
    """A path (``/api/v1/...``) joined to ``base_url``, or an absolute URL with exactly ``base_url``'s origin.

    Anything else (another host, port or scheme, ``//host/...``, userinfo tricks) raises UntrustedUrl."""
    if url.startswith("/") and not url.startswith("//"):
        full = urljoin(base_url.rstrip("/") + "/", url)
    else:
        full = url
    try:
        same = origin(full) == origin(base_url) and urlsplit(full).username is None
    except ValueError:
        same = False
    if not same:
        raise UntrustedUrl(f"refusing model URL {url[:200]!r}: not on the configured coordinator {base_url}")
    return full


@dataclass
class Fetched:
    data: bytes
    version: str
    transferred: int  # bytes that crossed the network for this call (0 on a cache hit)


class ModelCache:
    """A per-device cache of global model files keyed by version (sha256)."""

    def __init__(self, directory: Path, session: requests.Session, keep: int = 4, timeout: float = 60.0,
                 base_url: str | None = None) -> None:
        """``base_url``: the coordinator; when given, every URL is checked against its origin."""
        self.directory = Path(directory)
        self.base_url = base_url
        self.directory.mkdir(parents=True, exist_ok=True)
        self._http = session
        self._keep = keep
        self._timeout = timeout

    def path(self, version: str) -> Path:
        if not is_version(version):
            raise ModelDownloadError(f"model version {str(version)[:80]!r} is not a sha256 hex digest")
        return self.directory / f"{version}.fsm"

    def get(self, url: str, version: str, patch_url: str | None = None) -> Fetched:
        """The bytes of ``version``: from the cache, else as a patch against the newest cached version
        (``patch_url?from=<cached>``), else in full from ``url`` (resuming a partial download)."""
        if self.base_url is not None:
            url = resolve_url(url, self.base_url)
            patch_url = None if patch_url is None else resolve_url(patch_url, self.base_url)
        final = self.path(version)
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
            resp = self._http.get(patch_url, params={"from": base}, timeout=self._timeout)
            if resp.status_code != 200:
                log.debug("no patch %s -> %s (HTTP %d); full download", base[:12], version[:12], resp.status_code)
                return None
            data = apply_patch(self.path(base).read_bytes(), resp.content)
        except (requests.RequestException, ProtocolError, OSError) as exc:
            log.warning("patch download failed (%s); falling back to the full model", exc)
            return None
        if sha256_hex(data) != version:
            return None
        self.put(data)
        return Fetched(data, version, len(resp.content))

    def _download(self, url: str, version: str) -> Fetched:
        final = self.path(version)
        part = final.with_suffix(".part")
        transferred = 0
        for attempt in range(3):
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self._http.get(url, headers=headers, stream=True, timeout=self._timeout) as resp:
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

    def put(self, data: bytes) -> str:
        """Store bytes obtained another way (e.g. rebuilt from a downlink patch); returns the version."""
        version = sha256_hex(data)
        tmp = self.path(version).with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path(version))
        self._prune()
        return version

    def latest_cached(self) -> str | None:
        files = sorted(self.directory.glob("*.fsm"), key=lambda p: p.stat().st_mtime, reverse=True)
        return files[0].stem if files else None

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.fsm"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[self._keep:]:
            old.unlink(missing_ok=True)
