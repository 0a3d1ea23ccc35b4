"""Run the coordinator: MQTT broker (embedded or external) + bridge + round engine + HTTP(S) server.

``serve(...)`` blocks until SIGINT/SIGTERM and then shuts down in dependency order (HTTP, jobs, bridge,
broker, database). ``start(...)`` does the same start-up but returns a :class:`CoordinatorHandle` at once,
for tests and for ``fedsight demo``; ``handle.stop()`` is the same clean shutdown. Jobs that were running
stay 'running' in the store across a stop and are resumed by the next start.

Secure by default: unless ``insecure=True``, the REST API is HTTPS and the MQTT broker mqtts, with the
operator's certificate (``tls=``) or one provisioned in ``<data_dir>/tls`` by a private CA whose ``ca.pem``
devices pin (``handle.ca_file``).
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edge_sdk.transport import BrokerAddress

from coordinator.api.app import create_app
from coordinator.api.http_server import HttpServer
from coordinator.mqtt.bridge import MqttBridge
from coordinator.mqtt.broker import EmbeddedBroker
from coordinator.rounds.engine import EngineConfig
from coordinator.security.certs import ServerTls, ensure_server_cert
from coordinator.services import Services, build_services

log = logging.getLogger(__name__)

_ANY_HOST = ("", "0.0.0.0", "::")


@dataclass
class CoordinatorHandle:
    """A running coordinator. ``url``: REST base (``https://host:port``); ``broker_url``: for devices;
    ``ca_file``: the CA devices verify both with (None: insecure, or a publicly trusted certificate)."""

    services: Services
    url: str
    broker_url: str
    bridge: MqttBridge
    broker: EmbeddedBroker | None
    _http: HttpServer
    _stopped: threading.Event = field(default_factory=threading.Event)
    ca_file: Path | None = None

    @property
    def engine(self) -> Any:
        return self.services.engine

    @property
    def store(self) -> Any:
        return self.services.store

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """Idempotent clean shutdown."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("coordinator shutting down")
        self._http.stop()
        self.services.engine.shutdown()
        self.bridge.stop()
        if self.broker is not None:
            self.broker.stop()
        self.services.store.close()
        log.info("coordinator stopped")

    def __enter__(self) -> CoordinatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_tls(data_dir: Path | str, tls: ServerTls | None, insecure: bool,
               names: list[str | None]) -> ServerTls | None:
    """The certificate to serve: the operator's, or one from the private CA in ``<data_dir>/tls`` valid for
    ``names`` (bind and advertised hosts) and loopback, issued on first start; None only when ``insecure``."""
    if insecure:
        log.warning("--insecure: REST API over plain HTTP and MQTT without TLS; anyone on the path can read "
                    "and alter models and updates")
        return None
    if tls is not None:
        return tls
    return ensure_server_cert(Path(data_dir) / "tls", [n for n in names if n and n not in _ANY_HOST])


def start(host: str = "127.0.0.1", port: int = 8080, data_dir: Path | str = "fedsight-data",
          broker: str = "embedded", *, broker_host: str = "127.0.0.1", broker_port: int = 1883,
          public_url: str | None = None, advertised_broker_url: str | None = None, threads: int = 8,
          evaluate: bool = True, engine_config: EngineConfig | None = None, resume: bool = True,
          tls: ServerTls | None = None, insecure: bool = False, tls_names: tuple[str, ...] = (),
          broker_ca: Path | str | None = None) -> CoordinatorHandle:
    """Start everything in background threads and return once the REST API and MQTT bridge are up.

    ``broker``: ``"embedded"`` (amqtt on ``broker_host:broker_port``; port 0 picks a free one) or
    ``"mqtts://HOST:PORT"`` of an external broker (verified with ``broker_ca``, default the CA devices get;
    plain ``mqtt://`` only with ``insecure``). ``port=0`` picks a free HTTP port. ``public_url`` /
    ``advertised_broker_url``: the addresses devices should use, when they differ from the bind addresses.
    ``tls``: certificate for HTTPS and the embedded broker (default: provisioned in ``<data_dir>/tls`` for
    loopback, the bind hosts, the advertised hosts and ``tls_names``); ``insecure``: no TLS at all.
    """
    external = BrokerAddress.parse(broker) if broker != "embedded" else None
    if external is not None and not external.tls and not insecure:
        raise ValueError(f"broker {broker} is plain MQTT: use mqtts://HOST:PORT (a TLS listener, "
                         "docs/security.md) or pass --insecure")
    cert = server_tls(data_dir, tls, insecure, [host, broker_host, *tls_names, urlparse(public_url or "").hostname,
                                                 urlparse(advertised_broker_url or "").hostname])
    ca_file = cert.ca if cert is not None else None
    embedded: EmbeddedBroker | None = None
    if external is None:
        embedded = EmbeddedBroker(broker_host, broker_port,
                                  tls=(str(cert.cert), str(cert.key)) if cert is not None else None).start()
        local = "127.0.0.1" if broker_host in _ANY_HOST else broker_host  # a name the certificate carries
        address, broker_ca = BrokerAddress(local, embedded.port, tls=cert is not None), ca_file
    else:
        address = external
        broker_ca = (broker_ca or ca_file) if address.tls else None
    services: Services | None = None
    bridge: MqttBridge | None = None
    http: HttpServer | None = None
    try:
        services = build_services(data_dir, engine_config=engine_config, evaluate=evaluate)
        bridge = MqttBridge(services.engine, address, tls_ca=broker_ca)
        bridge.start()
        app = create_app({"services": services})
        http = HttpServer(app, host, port, threads=threads, tls=cert).bind()
        bound = http.port
        url_host = "127.0.0.1" if host in _ANY_HOST else host
        services.engine.config.public_url = (public_url or f"{http.scheme}://{url_host}:{bound}").rstrip("/")
        if advertised_broker_url:
            services.broker_url = advertised_broker_url
        else:
            b_host = "127.0.0.1" if address.host in _ANY_HOST else address.host
            services.broker_url = BrokerAddress(b_host, address.port, address.tls).url()
        if host in _ANY_HOST and public_url is None:
            log.warning("bound to all interfaces but devices are told %s; pass public_url for remote devices",
                        services.engine.config.public_url)
        http.start()
        if resume:
            resumed = services.engine.resume()
            if resumed:
                log.info("resumed running job(s): %s", ", ".join(resumed))
    except BaseException:
        if http is not None:
            http.stop()
        if bridge is not None:
            bridge.stop()
        if services is not None:
            services.close()
        if embedded is not None:
            embedded.stop()
        raise
    url = f"{http.scheme}://{url_host}:{bound}"
    log.info("coordinator REST on %s (data in %s), MQTT %s", url, Path(data_dir).resolve(), services.broker_url)
    if ca_file is not None:
        log.info("devices verify TLS with the CA file %s: copy it to each device (fedsight client --ca FILE)",
                 Path(ca_file).resolve())
    return CoordinatorHandle(services, url, services.broker_url or "", bridge, embedded, http, ca_file=ca_file)


def serve(host: str = "127.0.0.1", port: int = 8080, data_dir: Path | str = "fedsight-data",
          broker: str = "embedded", **kwargs: Any) -> None:
    """Blocking entry point (``fedsight coordinator``): runs until SIGINT or SIGTERM, then stops cleanly.

    Keyword arguments are those of :func:`start`.
    """
    handle = start(host, port, data_dir, broker, **kwargs)
    done = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()

    previous = {s: signal.signal(s, _signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(1.0):
            if not handle._http.is_alive():
                log.error("HTTP server thread exited unexpectedly")
                break
    finally:
        handle.stop()
        for sig, prev in previous.items():
            signal.signal(sig, prev)
