"""A device's identity: enroll once with the fleet secret, then keep the credentials 0600 in the cache directory.

Why its own module: the credentials file holds every secret a device has (REST token, device key, broker
password), so how it is read, written and refreshed lives in one place that the client only calls.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import requests

ENROLL_SECRET_ENV = "FEDSIGHT_ENROLL_SECRET"


class Enrollment:
    """Credentials of one device for one coordinator (``base_url``), kept in ``cache_dir/credentials.json``."""

    def __init__(self, http: requests.Session, base_url: str, api: str, cache_dir: Path, timeout: float) -> None:
        self._http = http
        self.base_url = base_url
        self.api = api
        self.saved = cache_dir / "credentials.json"
        self._timeout = timeout

    def credentials(self, client_id: str | None, token: str | None, device_key: str | None,
                    enroll_secret: str | None, name: str | None) -> dict[str, Any]:
        """Use given credentials, else the saved ones, else enroll with the coordinator (needs the secret,
        ``enroll_secret`` or $FEDSIGHT_ENROLL_SECRET)."""
        if client_id and token:
            if not device_key:
                raise ValueError("client_id and token need the device_key from the same registration "
                                 "(updates are signed with it)")
            return {"client_id": client_id, "token": token, "device_key": device_key}
        if self.saved.exists():
            creds = json.loads(self.saved.read_text())
            if (creds.get("coordinator") == self.base_url and creds.get("device_key")
                    and (client_id is None or creds["client_id"] == client_id)):
                return dict(creds)
        secret = enroll_secret or os.environ.get(ENROLL_SECRET_ENV)
        if not secret:
            raise RuntimeError(f"registration with {self.base_url} needs the fleet's enrollment secret: pass "
                               f"enroll_secret= or set ${ENROLL_SECRET_ENV} (the coordinator wrote it to "
                               "<data-dir>/enroll-secret)")
        resp = self._http.post(f"{self.api}/clients", json={"name": name or client_id or "device",
                                                            "enroll_secret": secret}, timeout=self._timeout)
        if resp.status_code != 201:
            raise RuntimeError(f"registration with {self.base_url} failed: HTTP {resp.status_code} {resp.text[:200]}")
        body = resp.json()
        self.save(body)
        return dict(body)

    def save(self, body: dict[str, Any]) -> None:
        """Written 0600 from the start (REST token, device key, broker secret), replaced atomically."""
        tmp = self.saved.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"coordinator": self.base_url, **body}, f)
        tmp.chmod(0o600)  # an older file of that name kept its mode
        os.replace(tmp, self.saved)

    def broker_login(self, client_id: str) -> dict[str, str | None]:
        """Ask the coordinator for a broker secret (credentials from before broker ACLs, or given id + token)."""
        resp = self._http.post(f"{self.api}/clients/{client_id}/broker-credentials", timeout=self._timeout)
        if resp.status_code == 404:  # a coordinator without managed broker identities
            return {"username": None, "password": None}
        if resp.status_code != 200:
            raise RuntimeError(f"broker credentials from {self.base_url} refused: HTTP {resp.status_code} "
                               f"{resp.text[:200]}")
        body = resp.json()
        if self.saved.exists():
            creds = json.loads(self.saved.read_text())
            if creds.get("client_id") == client_id and creds.get("coordinator") == self.base_url:
                self.save({**creds, "mqtt_username": body.get("mqtt_username"),
                           "mqtt_password": body.get("mqtt_password")})
        return {"username": body.get("mqtt_username"), "password": body.get("mqtt_password")}
