"""The REST API's HTTP server: cheroot (thread pool), serving HTTPS directly from a certificate and key.

waitress cannot terminate TLS, cheroot can (Python's ``ssl`` through its builtin adapter), so the coordinator
needs no reverse proxy to be secure; one can still sit in front of it (docs/security.md, "TLS").
The TLS handshake runs on the worker thread that serves the connection: cheroot's own adapter does it on
its single accept thread, where one client that connects and stays silent stalls every other client for the
socket timeout. A plain-HTTP request to the HTTPS port fails its handshake and never reaches the app.
"""
from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.server import HTTPConnection
from cheroot.ssl.builtin import BuiltinSSLAdapter

from coordinator.security.certs import ServerTls

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0


class HttpServer:
    """``HttpServer(app, host, port, tls=...).start()`` -> serving on ``self.port``; ``stop()`` is idempotent."""

    def __init__(self, app: Any, host: str, port: int, threads: int = 8, tls: ServerTls | None = None) -> None:
        self.tls = tls
        self._server = wsgi.Server((host, port), app, numthreads=threads, server_name="fedsight",
                                   timeout=30, shutdown_timeout=5)
        self._server.error_log = _error_log  # cheroot writes to stderr; failed handshakes belong in the log
        if tls is not None:
            adapter = _DeferredHandshakeAdapter(str(tls.cert), str(tls.key))
            adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._server.ssl_adapter = adapter
            self._server.ConnectionClass = _TlsConnection
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self._server.bind_addr[1])

    def bind(self) -> HttpServer:
        """Bind and listen (errors such as 'port in use' raise here); connections wait until ``start()``."""
        if not self._server.ready:
            self._server.prepare()
        return self

    def start(self) -> HttpServer:
        """Serve on a daemon thread (binding first if ``bind()`` was not called)."""
        self.bind()
        self._thread = threading.Thread(target=self._server.serve, name="http-server", daemon=True)
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._server.ready:  # bound (serving or not): close the socket and the worker threads
            self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
    log.log(level, "%s", msg, exc_info=traceback)


class _DeferredHandshakeAdapter(BuiltinSSLAdapter):
    """Wraps accepted sockets without the handshake; ``_TlsConnection`` does it on a worker thread."""

    def wrap(self, sock: Any) -> tuple[ssl.SSLSocket, dict[str, str]]:
        tls_sock = self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True)
        return tls_sock, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _TlsConnection(HTTPConnection):  # type: ignore[misc]
    """Completes the TLS handshake (under the server's socket timeout) before reading the first request."""

    _handshake_done = False

    def communicate(self) -> bool:
        if not self._handshake_done:
            try:
                self.socket.settimeout(HANDSHAKE_TIMEOUT_S)  # a silent client holds a worker this long at most
                self.socket.do_handshake()
                self.socket.settimeout(self.server.timeout)
            except (ssl.SSLError, OSError) as exc:  # wrong CA on the client, plain HTTP, silence, reset
                log.info("TLS handshake with %s failed: %s", self.remote_addr, exc)
                return False
            self._handshake_done = True
        return bool(super().communicate())
