"""The one exception auth code raises: an HTTP status, a message the caller can read, optional headers."""
from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
