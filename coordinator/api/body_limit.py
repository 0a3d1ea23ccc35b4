"""WSGI middleware that refuses an over-limit request body before anything reads it.

Why: Flask's ``MAX_CONTENT_LENGTH`` is checked when the app reads the body, and a WSGI server may have
buffered the whole body by then (waitress did, up to 1 GiB; cheroot, the server now, streams it). This layer is
the one limit whatever server runs the app: a declared ``Content-Length`` over the limit gets a 413 at once,
and a body without a length (chunked) is read up to the limit and no further (413 if there is more). A multipart POST to
an upload path (a job with its weights file) gets that path's larger limit; every other body keeps the small one.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _read_at_most(stream: Any, limit: int) -> bytes:
    """Read until EOF or ``limit`` bytes, whichever comes first."""
    parts, left = [], limit
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class BodyLimit:
    """Wraps a WSGI app; ``max_bytes`` is the largest request body any endpoint accepts, except a
    ``multipart/form-data`` POST to a path in ``uploads`` (path -> its limit)."""

    def __init__(self, app: WsgiApp, max_bytes: int, uploads: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = dict(uploads or {})

    def limit(self, environ: dict[str, Any]) -> int:
        """The body limit of this request."""
        if (environ.get("REQUEST_METHOD") == "POST"
                and str(environ.get("CONTENT_TYPE", "")).lower().startswith("multipart/form-data")):
            return self.uploads.get(str(environ.get("PATH_INFO", "")), self.max_bytes)
        return self.max_bytes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        max_bytes = self.limit(environ)
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                declared = int(length)
            except ValueError:
                return self._refuse(start_response, 400, "invalid Content-Length header")
            if declared > max_bytes:
                return self._refuse(start_response, 413, f"request body of {declared} bytes is over the "
                                                         f"{max_bytes}-byte limit")
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            body = _read_at_most(environ["wsgi.input"], max_bytes + 1)
            if len(body) > max_bytes:
                return self._refuse(start_response, 413, f"request body is over the {max_bytes}-byte limit")
            environ["wsgi.input"] = io.BytesIO(body)  # now of known length, so the app reads it as usual
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)

    @staticmethod
    def _refuse(start_response: StartResponse, status: int, message: str) -> list[bytes]:
        body = json.dumps({"error": message}).encode()
        reason = {400: "Bad Request", 413: "Request Entity Too Large"}[status]
        start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]
