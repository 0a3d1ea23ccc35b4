"""Client-side TLS for devices: one pinned CA file verifies the coordinator's HTTPS API and its mqtts broker."""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import requests


def tls_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Certificate chain and hostname verified, TLS 1.2 or newer; ``ca_file`` None: the system's CAs."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PinnedSession(requests.Session):
    """A ``requests.Session`` that verifies against ``ca_file`` whatever the environment says.

    Plain ``Session.verify`` loses to ``$REQUESTS_CA_BUNDLE`` / ``$CURL_CA_BUNDLE`` (requests merges the
    environment in first), which would silently swap the pinned CA for the system bundle."""

    def __init__(self, ca_file: str | Path) -> None:
        super().__init__()
        path = Path(ca_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CA file not found: {ca_file} (copy the coordinator's tls/ca.pem here)")
        self.verify = str(path)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
                                   ) -> dict[str, Any]:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None or verify is True:
            settings["verify"] = self.verify
        return settings
