"""Run the coordinator: MQTT broker (embedded or external) + bridge + round engine + HTTP(S) server.

``serve(...)`` blocks until SIGINT/SIGTERM and then shuts down in dependency order (HTTP, jobs, bridge,
broker, database). ``start(...)`` does the same start-up but returns a :class:`CoordinatorHandle` at once,
for tests and for ``fedsight demo``; ``handle.stop()`` is the same clean shutdown. Jobs that were running
stay 'running' in the store across a stop and are resumed by the next start.

Bind addresses (where sockets listen) and advertised addresses (what devices are told) are separate: a server
binds ``0.0.0.0`` and advertises ``https://cams.example:8080`` / ``mqtts://cams.example:8883``. Devices get the
broker URL from ``GET /api/v1/health``; tasks carry paths, which each device resolves against the coordinator
URL it was configured with, so the HTTP origin is only advertised, never baked into messages.

Secure by default: unless ``insecure=True``, the REST API is HTTPS and the MQTT broker mqtts, with the
operator's certificate (``tls=``) or one provisioned in ``<data_dir>/tls`` by a private CA whose ``ca.pem``
devices pin (``handle.ca_file``). TLS comes on top of the operator token, device identities and broker ACLs.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_sdk.coordinator_origin import CoordinatorOrigin
from edge_sdk.transport import BrokerAddress

from coordinator.api.app import create_app
from coordinator.api.http_server import HttpServer
from coordinator.mqtt.accounts import BrokerAccounts, coordinator_credentials
from coordinator.mqtt.bridge import MqttBridge
from coordinator.mqtt.broker import EmbeddedBroker
from coordinator.mqtt.dynsec import DynsecAccounts
from coordinator.mqtt.packet_limit import MQTT_OVERHEAD_BYTES
from coordinator.rounds.jobspec import DEFAULT_MAX_UPDATE_BYTES
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
    accounts: BrokerAccounts | None = None
    ca_file: Path | None = None

    @property
    def engine(self) -> Any:
        return self.services.engine

    @property
    def store(self) -> Any:
        return self.services.store

    @property
    def public_url(self) -> str:
        """The HTTP origin advertised to devices (``url`` is where this machine reaches the server)."""
        return str(self.services.engine.config.public_url)

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
        if isinstance(self.accounts, DynsecAccounts):
            self.accounts.stop()
        if self.broker is not None:
            self.broker.stop()
        self.services.store.close()
        log.info("coordinator stopped")

    def __enter__(self) -> CoordinatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _packet_limit(engine_ref: list[Any]) -> int:
    """Broker max packet size: the largest update the engine accepts now, plus MQTT framing."""
    limit = engine_ref[0].update_size_limit() if engine_ref else DEFAULT_MAX_UPDATE_BYTES
    return int(limit) + MQTT_OVERHEAD_BYTES


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


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def advertised(http_host: str, http_port: int, broker: BrokerAddress, public_url: str | None,
               advertised_broker_url: str | None, scheme: str = "http") -> tuple[str, str]:
    """(HTTP origin, MQTT broker URL) devices are told. Unset ones follow the bind address, or, when bound
    to every interface, the public URL's host (else loopback)."""
    if public_url:
        public = CoordinatorOrigin(public_url).base_url  # ValueError (UnsafeUrlError) names the problem
    else:
        public = f"{scheme}://{'127.0.0.1' if http_host in _ANY_HOST else http_host}:{http_port}"
    if advertised_broker_url:
        broker_url = BrokerAddress.parse(advertised_broker_url).url()
    elif broker.host in _ANY_HOST:
        name = urlsplit(public).hostname if public_url else None
        broker_url = BrokerAddress(name or "127.0.0.1", broker.port, broker.tls).url()
    else:
        broker_url = broker.url()
    return public, broker_url


def start(host: str = "127.0.0.1", port: int = 8080, data_dir: Path | str = "fedsight-data",
          broker: str = "embedded", *, broker_host: str = "127.0.0.1", broker_port: int = 1883,
          public_url: str | None = None, advertised_broker_url: str | None = None, threads: int = 8,
          evaluate: bool = True, engine_config: EngineConfig | None = None, resume: bool = True,
          weights_dir: Path | str | None = None, broker_admin: tuple[str, str] | None = None,
          tls: ServerTls | None = None, insecure: bool = False, tls_names: tuple[str, ...] = (),
          broker_ca: Path | str | None = None) -> CoordinatorHandle:
    """Start everything in background threads and return once the REST API and MQTT bridge are up.

    ``broker``: ``"embedded"`` (amqtt on ``broker_host:broker_port``; port 0 picks a free one) or
    ``"mqtts://HOST:PORT"`` of an external Mosquitto with the dynamic-security plugin, administered with
    ``broker_admin`` = (username, password) and verified with ``broker_ca`` (default: the CA devices get;
    plain ``mqtt://`` only with ``insecure``). Either way devices get their own broker identities and ACLs.
    ``port=0`` picks a free HTTP port. ``public_url`` / ``advertised_broker_url``: the addresses devices
    should use, when they differ from the bind addresses (see :func:`advertised`).
    ``weights_dir``: the only directory job specs may name server-side ``model.weights`` files in (None: none).
    The operator token and enrollment secret are created on first start in ``data_dir`` (mode 0600).
    ``tls``: certificate for HTTPS and the embedded broker (default: provisioned in ``<data_dir>/tls`` for
    loopback, the bind hosts, the advertised hosts and ``tls_names``); ``insecure``: no TLS at all.
    """
    if public_url:
        CoordinatorOrigin(public_url)  # fail before anything starts
    if advertised_broker_url:
        BrokerAddress.parse(advertised_broker_url)
    external = BrokerAddress.parse(broker) if broker != "embedded" else None
    if external is not None and not external.tls and not insecure:
        raise ValueError(f"broker {broker} is plain MQTT: use mqtts://HOST:PORT (a TLS listener, "
                         "docs/security.md) or pass --insecure")
    if external is not None and broker_admin is None:
        raise ValueError(f"the coordinator manages device identities on {external.url()} through Mosquitto's "
                         "dynamic-security plugin and needs its admin identity: pass --broker-admin USER and "
                         "set FEDSIGHT_BROKER_ADMIN_PASSWORD (see docs/security.md)")
    cert = server_tls(data_dir, tls, insecure, [host, broker_host, *tls_names, urlsplit(public_url or "").hostname,
                                                 urlsplit(advertised_broker_url or "").hostname])
    ca_file = cert.ca if cert is not None else None
    embedded: EmbeddedBroker | None = None
    engine_ref: list[Any] = []  # the broker starts before the engine exists; its packet limit follows the engine
    accounts: BrokerAccounts | None = None
    creds = coordinator_credentials(data_dir)
    if external is None:
        from coordinator.mqtt.embedded_acl import EmbeddedAccounts  # imports amqtt

        accounts = EmbeddedAccounts(Path(data_dir) / "mqtt-accounts.json", creds)
        embedded = EmbeddedBroker(broker_host, broker_port, max_packet_bytes=lambda: _packet_limit(engine_ref),
                                  accounts=accounts,
                                  tls=(str(cert.cert), str(cert.key)) if cert is not None else None).start()
        address = BrokerAddress(broker_host, embedded.port, tls=cert is not None)
        local = "127.0.0.1" if broker_host in _ANY_HOST else broker_host  # a name the certificate carries
        bridge_address, broker_ca = BrokerAddress(local, embedded.port, tls=cert is not None), ca_file
    else:
        address = bridge_address = external
        broker_ca = (broker_ca or ca_file) if address.tls else None
    services: Services | None = None
    bridge: MqttBridge | None = None
    http: HttpServer | None = None
    try:
        if accounts is None and broker_admin is not None:
            accounts = dynsec = DynsecAccounts(address, *broker_admin, tls_ca=broker_ca)
            dynsec.start()
            dynsec.provision(creds)
        services = build_services(data_dir, engine_config=engine_config, evaluate=evaluate, weights_dir=weights_dir)
        services.broker_accounts = accounts
        engine_ref.append(services.engine)
        bridge = MqttBridge(services.engine, bridge_address, username=creds.username, password=creds.password,
                            tls_ca=broker_ca)
        if resume:
            services.engine.hold_updates()  # queued updates wait for their re-opened rounds (issue 10)
        bridge.start()
        app = create_app({"services": services})  # refuses bodies over MAX_JSON_BYTES unread (BodyLimit; a job with its weights file may be larger)
        http = HttpServer(app, host, port, threads=threads, tls=cert).bind()
        bound = http.port
        url_host = "127.0.0.1" if host in _ANY_HOST else host
        services.engine.config.public_url, services.broker_url = advertised(
            host, bound, address, public_url, advertised_broker_url, scheme=http.scheme)
        if host in _ANY_HOST and public_url is None:
            log.warning("bound to all interfaces but devices are told %s; pass public_url for remote devices",
                        services.engine.config.public_url)
        if public_url and _is_loopback(services.broker_url) and not _is_loopback(public_url):
            log.warning("devices reach this coordinator at %s but are told the broker is %s (loopback); pass "
                        "advertised_broker_url (--public-broker)", public_url, services.broker_url)
        http.start()
        if resume:
            try:
                resumed = services.engine.resume()
            finally:
                services.engine.release_updates()
            if resumed:
                log.info("resumed running job(s): %s", ", ".join(resumed))
    except BaseException:
        if http is not None:
            http.stop()
        if services is not None:
            services.engine.release_updates()
        if bridge is not None:
            bridge.stop()
        if services is not None:
            services.close()
        if isinstance(accounts, DynsecAccounts):
            accounts.stop()
        if embedded is not None:
            embedded.stop()
        raise
    url = f"{http.scheme}://{url_host}:{bound}"
    secrets = services.credentials
    log.info("operator token in %s, enrollment secret in %s (mode 600; see docs/security.md)",
             secrets.path("operator-token"), secrets.path("enroll-secret"))
    log.info("coordinator REST on %s (data in %s), MQTT on %s; devices are told %s and %s", url,
             Path(data_dir).resolve(), address.url(), services.engine.config.public_url, services.broker_url)
    if ca_file is not None:
        log.info("devices verify TLS with the CA file %s: copy it to each device (fedsight client --ca FILE)",
                 Path(ca_file).resolve())
    return CoordinatorHandle(services, url, services.broker_url or "", bridge, embedded, http,
                             accounts=accounts, ca_file=ca_file)


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
