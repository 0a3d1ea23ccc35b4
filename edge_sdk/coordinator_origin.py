"""The one coordinator a device trusts: every URL it requests is built here from the configured base URL.

Tasks and job events carry *paths* (``/api/v1/jobs/<id>/models/<version>``), never absolute URLs, so a
coordinator behind NAT or a proxy works and a forged or mistaken message cannot make a device send its bearer
token to another host. Anything that is not a plain path under the configured origin is refused with
:class:`UnsafeUrlError`. Model versions become file names, so they are checked to be 64 hex digits first.
Standard library only (imported by the torch-free live model).
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

_VERSION = re.compile(r"[0-9a-f]{64}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeUrlError(ValueError):
    """A URL or path a device must not request (another origin, not a path, or a malformed version)."""


def check_version(version: object) -> str:
    """``version`` if it is a lowercase hex sha256 (a model version, used as a file name), else UnsafeUrlError."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise UnsafeUrlError(f"model version must be 64 lowercase hex digits (a sha256), got {str(version)[:80]!r}")
    return version


def _origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise UnsafeUrlError(f"coordinator URL must be http(s)://HOST[:PORT][/PREFIX], got {url[:200]!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise UnsafeUrlError(f"bad port in coordinator URL {url[:200]!r}") from None
    return scheme, parts.hostname.lower(), port


class CoordinatorOrigin:
    """``CoordinatorOrigin("http://cams.example:8080").url("/api/v1/health")`` -> the absolute URL.

    The base may carry a prefix (``https://proxy.example/fedsight``); paths are appended to it.
    """

    def __init__(self, base_url: str) -> None:
        base = base_url.strip().rstrip("/")
        self.scheme, self.host, self.port = _origin_of(base)
        parts = urlsplit(base)
        if parts.query or parts.fragment or parts.username or parts.password:
            raise UnsafeUrlError(f"coordinator URL must not carry credentials, a query or a fragment: {base[:200]!r}")
        self.base_url = base
        self.prefix = parts.path.rstrip("/")

    @property
    def api(self) -> str:
        return f"{self.base_url}/api/v1"

    def url(self, path: object) -> str:
        """Absolute URL of ``path`` (which must start with one ``/``) on this coordinator; else UnsafeUrlError."""
        if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
            raise UnsafeUrlError(f"expected a path on the coordinator like '/api/v1/...', got {str(path)[:200]!r} "
                                 f"(absolute URLs are refused: credentials only go to {self.base_url})")
        if "\\" in path or any(seg in ("..", ".") for seg in path.split("?", 1)[0].split("/")) \
                or any(ord(c) < 33 for c in path):
            raise UnsafeUrlError(f"refusing path {path[:200]!r}: dot segments, backslashes or control characters")
        return self.base_url + path

    def owns(self, url: str) -> bool:
        """True if ``url`` is on this origin (scheme, host and port) under its prefix."""
        try:
            same = _origin_of(url) == (self.scheme, self.host, self.port)
        except UnsafeUrlError:
            return False
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:  # "http://coord@evil/" tricks
            return False
        path = parts.path
        return same and (not self.prefix or path == self.prefix or path.startswith(self.prefix + "/"))

    def check(self, url: str) -> str:
        """``url`` if this origin owns it, else UnsafeUrlError (called before any request carrying the token)."""
        if not self.owns(url):
            raise UnsafeUrlError(f"refusing to send device credentials to {url[:200]!r}: not the configured "
                                 f"coordinator {self.base_url}")
        return url

    def __repr__(self) -> str:
        return f"CoordinatorOrigin({self.base_url!r})"
