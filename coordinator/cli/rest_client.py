"""The REST client the CLI and the demo share: every failure becomes a :class:`CliError` naming the coordinator.

Operator calls carry the operator token, found (first hit wins) in ``$FEDSIGHT_TOKEN``, the file named by
``--token-file`` or ``$FEDSIGHT_TOKEN_FILE``, or ``./fedsight-data/operator-token`` (where a coordinator started
from the same folder with the default ``--data-dir`` writes it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TOKEN_ENV = "FEDSIGHT_TOKEN"
TOKEN_FILE_ENV = "FEDSIGHT_TOKEN_FILE"
DEFAULT_TOKEN_FILE = Path("fedsight-data") / "operator-token"
_AUTH_HINT = (f"set ${TOKEN_ENV}, or pass --token-file (the coordinator writes <data-dir>/operator-token "
              "on first start)")


def operator_token(token_file: str | Path | None = None) -> str | None:
    """The operator token from the environment or a token file; None when there is none."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = Path(token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE).expanduser()
    if token_file and not path.is_file():
        raise CliError(f"token file {path} not found", _AUTH_HINT)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
TLS_HINT = ("pass --ca with the coordinator's CA file (it prints the path at start-up: DATA_DIR/tls/ca.pem) "
            "or set $FEDSIGHT_CA")


class CliError(Exception):
    """A mistake the user can fix: shown as one line and a hint, never as a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class Api:
    """Tiny REST client that turns every failure into a CliError naming the coordinator."""

    def __init__(self, base_url: str, timeout: float = 30.0, token: str | None = None,
                 verify: str | Path | None = None) -> None:
        """``verify``: CA file for an https coordinator (None: the system's trusted CAs)."""
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        if verify and not Path(verify).is_file():
            raise CliError(f"CA file not found: {verify}", TLS_HINT)
        self.verify: str | bool = str(verify) if verify else True

    def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        import requests

        try:
            headers = {**self._headers, **kwargs.pop("headers", {})}
            resp = requests.request(method, f"{self.base}/api/v1{path}", timeout=self.timeout, headers=headers,
                                    verify=self.verify, **kwargs)
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
            hint = {404: "`fedsight job list` shows the jobs this coordinator knows", 401: _AUTH_HINT,
                    403: _AUTH_HINT}.get(resp.status_code, "")
            raise CliError(f"{method} {path} failed: HTTP {resp.status_code}: {reason}", hint)
        return resp if raw else resp.json()
