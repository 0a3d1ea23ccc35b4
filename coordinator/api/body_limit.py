"""WSGI middleware that refuses an over-limit request body before anything reads it.

Why: Flask's ``MAX_CONTENT_LENGTH`` is checked when the app reads the body, and a WSGI server may have
buffered the whole body by then (waitress accepts up to 1 GiB by default; the server also sets waitress's
``max_request_body_size``). Here a declared ``Content-Length`` over the limit gets a 413 at once, and a body
without a length (chunked) is read through a counter that stops at the limit.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import RequestEntityTooLarge

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _CappedInput:
    """``wsgi.input`` for a body of unknown length: raises 413 once more than ``limit`` bytes were read."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise RequestEntityTooLarge("request body too large")
        return data

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(want))

    def readline(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(want))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class BodyLimit:
    """Wraps a WSGI app; ``max_bytes`` is the largest request body any endpoint accepts."""

    def __init__(self, app: WsgiApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                declared = int(length)
            except ValueError:
                return self._refuse(start_response, 400, "invalid Content-Length header")
            if declared > self.max_bytes:
                return self._refuse(start_response, 413, f"request body of {declared} bytes is over the "
                                                         f"{self.max_bytes}-byte limit")
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            environ["wsgi.input"] = _CappedInput(environ["wsgi.input"], self.max_bytes)
            environ["wsgi.input_terminated"] = True
        return self.app(environ, start_response)

    @staticmethod
    def _refuse(start_response: StartResponse, status: int, message: str) -> list[bytes]:
        body = json.dumps({"error": message}).encode()
        reason = {400: "Bad Request", 413: "Request Entity Too Large"}[status]
        start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]
