"""The REST API's HTTP server: cheroot (thread pool), serving HTTPS directly from a certificate and key.

waitress cannot terminate TLS, cheroot can (Python's ``ssl`` through its builtin adapter), so the coordinator
needs no reverse proxy to be secure; one can still sit in front of it (docs/security.md, "TLS").
A plain-HTTP request to the HTTPS port is answered with 400 and never reaches the app.
"""
from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from coordinator.security.certs import ServerTls

log = logging.getLogger(__name__)


class HttpServer:
    """``HttpServer(app, host, port, tls=...).start()`` -> serving on ``self.port``; ``stop()`` is idempotent."""

    def __init__(self, app: Any, host: str, port: int, threads: int = 8, tls: ServerTls | None = None) -> None:
        self.tls = tls
        self._server = wsgi.Server((host, port), app, numthreads=threads, server_name="fedsight",
                                   timeout=30, shutdown_timeout=5)
        self._server.error_log = _error_log  # cheroot writes to stderr; failed handshakes belong in the log
        if tls is not None:
            adapter = BuiltinSSLAdapter(str(tls.cert), str(tls.key))
            adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._server.ssl_adapter = adapter
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self._server.bind_addr[1])

    def start(self) -> HttpServer:
        """Bind and listen now (errors such as 'port in use' raise here), then serve on a daemon thread."""
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, name="http-server", daemon=True)
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._server.stop()
        self._thread.join(timeout)
        self._thread = None


def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
    log.log(level, "%s", msg, exc_info=traceback)
