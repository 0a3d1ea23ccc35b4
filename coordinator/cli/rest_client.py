"""The REST client the CLI and the demo share: every failure becomes a :class:`CliError` naming the coordinator."""
from __future__ import annotations

from pathlib import Path
from typing import Any

TLS_HINT = ("pass --ca with the coordinator's CA file (it prints the path at start-up: DATA_DIR/tls/ca.pem) "
            "or set $FEDSIGHT_CA")


class CliError(Exception):
    """A mistake the user can fix: shown as one line and a hint, never as a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class Api:
    """Tiny REST client that turns every failure into a CliError naming the coordinator."""

    def __init__(self, base_url: str, timeout: float = 30.0, verify: str | Path | None = None) -> None:
        """``verify``: CA file for an https coordinator (None: the system's trusted CAs)."""
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        if verify and not Path(verify).is_file():
            raise CliError(f"CA file not found: {verify}", TLS_HINT)
        self.verify: str | bool = str(verify) if verify else True

    def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        import requests

        try:
            resp = requests.request(method, f"{self.base}/api/v1{path}", timeout=self.timeout, verify=self.verify,
                                    **kwargs)
        except requests.exceptions.SSLError:
            raise CliError(f"TLS verification of the coordinator at {self.base} failed", TLS_HINT) from None
        except requests.RequestException as exc:
            raise CliError(f"cannot reach the coordinator at {self.base} ({type(exc).__name__})",
                           "start one with `fedsight coordinator` or pass --coordinator URL") from None
        if resp.status_code >= 400:
            try:
                reason = resp.json().get("error", resp.text)
            except ValueError:
                reason = resp.text.strip()[:200] or resp.reason
            hint = "`fedsight job list` shows the jobs this coordinator knows" if resp.status_code == 404 else ""
            raise CliError(f"{method} {path} failed: HTTP {resp.status_code}: {reason}", hint)
        return resp if raw else resp.json()
