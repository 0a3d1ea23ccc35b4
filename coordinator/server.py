"""Run the coordinator: MQTT broker (embedded or external) + bridge + round engine + waitress.

``serve(...)`` blocks until SIGINT/SIGTERM and then shuts down in dependency order (HTTP, jobs, bridge,
broker, database). ``start(...)`` does the same start-up but returns a :class:`CoordinatorHandle` at once,
for tests and for ``fedsight demo``; ``handle.stop()`` is the same clean shutdown. Jobs that were running
stay 'running' in the store across a stop and are resumed by the next start.

Bind addresses (where sockets listen) and advertised addresses (what devices are told) are separate: a server
binds ``0.0.0.0`` and advertises ``http://cams.example:8080`` / ``mqtt://cams.example:1883``. Devices get the
broker URL from ``GET /api/v1/health``; tasks carry paths, which each device resolves against the coordinator
URL it was configured with, so the HTTP origin is only advertised, never baked into messages.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from waitress.server import create_server

from edge_sdk.coordinator_origin import CoordinatorOrigin
from edge_sdk.transport import BrokerAddress

from coordinator.api.app import MAX_JSON_BYTES, create_app
from coordinator.mqtt.accounts import BrokerAccounts, coordinator_credentials
from coordinator.api.uploads import MAX_WEIGHTS_BYTES
from coordinator.mqtt.bridge import MqttBridge
from coordinator.mqtt.broker import EmbeddedBroker
from coordinator.mqtt.dynsec import DynsecAccounts
from coordinator.mqtt.packet_limit import MQTT_OVERHEAD_BYTES
from coordinator.rounds.jobspec import DEFAULT_MAX_UPDATE_BYTES
from coordinator.rounds.engine import EngineConfig
from coordinator.services import Services, build_services

log = logging.getLogger(__name__)

_ANY_HOST = ("", "0.0.0.0", "::")


@dataclass
class CoordinatorHandle:
    """A running coordinator. ``url``: REST base (``http://host:port``); ``broker_url``: for devices."""

    services: Services
    url: str
    broker_url: str
    bridge: MqttBridge
    broker: EmbeddedBroker | None
    _http: Any
    _http_thread: threading.Thread
    _stopped: threading.Event = field(default_factory=threading.Event)
    accounts: BrokerAccounts | None = None

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
        _stop_waitress(self._http, self._http_thread)
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


def _stop_waitress(server: Any, thread: threading.Thread) -> None:
    from waitress import wasyncore

    # Close every channel from inside waitress's own loop thread; the loop then exits as its map is empty.
    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
    thread.join(10.0)
    server.task_dispatcher.shutdown(timeout=5)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def advertised(http_host: str, http_port: int, broker: BrokerAddress, public_url: str | None,
               advertised_broker_url: str | None) -> tuple[str, str]:
    """(HTTP origin, MQTT broker URL) devices are told. Unset ones follow the bind address, or, when bound
    to every interface, the public URL's host (else loopback)."""
    if public_url:
        public = CoordinatorOrigin(public_url).base_url  # ValueError (UnsafeUrlError) names the problem
    else:
        public = f"http://{'127.0.0.1' if http_host in _ANY_HOST else http_host}:{http_port}"
    if advertised_broker_url:
        broker_url = BrokerAddress.parse(advertised_broker_url).url()
    elif broker.host in _ANY_HOST:
        name = urlsplit(public).hostname if public_url else None
        broker_url = f"mqtt://{name or '127.0.0.1'}:{broker.port}"
    else:
        broker_url = broker.url()
    return public, broker_url


def start(host: str = "127.0.0.1", port: int = 8080, data_dir: Path | str = "fedsight-data",
          broker: str = "embedded", *, broker_host: str = "127.0.0.1", broker_port: int = 1883,
          public_url: str | None = None, advertised_broker_url: str | None = None, threads: int = 8,
          evaluate: bool = True, engine_config: EngineConfig | None = None, resume: bool = True,
          weights_dir: Path | str | None = None,
          broker_admin: tuple[str, str] | None = None) -> CoordinatorHandle:
    """Start everything in background threads and return once the REST API and MQTT bridge are up.

    ``broker``: ``"embedded"`` (amqtt on ``broker_host:broker_port``; port 0 picks a free one) or
    ``"mqtt://HOST:PORT"`` of an external Mosquitto with the dynamic-security plugin, administered with
    ``broker_admin`` = (username, password). Either way devices get their own broker identities and ACLs.
    ``port=0`` picks a free HTTP port. ``public_url`` / ``advertised_broker_url``: the addresses devices
    should use, when they differ from the bind addresses (see :func:`advertised`).
    ``weights_dir``: the only directory job specs may name server-side ``model.weights`` files in (None: none).
    The operator token and enrollment secret are created on first start in ``data_dir`` (mode 0600).
    """
    if public_url:
        CoordinatorOrigin(public_url)  # fail before anything starts
    if advertised_broker_url:
        BrokerAddress.parse(advertised_broker_url)
    embedded: EmbeddedBroker | None = None
    engine_ref: list[Any] = []  # the broker starts before the engine exists; its packet limit follows the engine
    accounts: BrokerAccounts | None = None
    creds = coordinator_credentials(data_dir)
    if broker == "embedded":
        from coordinator.mqtt.embedded_acl import EmbeddedAccounts  # imports amqtt

        accounts = EmbeddedAccounts(Path(data_dir) / "mqtt-accounts.json", creds)
        embedded = EmbeddedBroker(broker_host, broker_port, max_packet_bytes=lambda: _packet_limit(engine_ref),
                                  accounts=accounts).start()
        address = BrokerAddress(broker_host, embedded.port)  # the bridge itself connects over loopback
        bridge_address = BrokerAddress("127.0.0.1" if broker_host in _ANY_HOST else broker_host, embedded.port)
    else:
        address = bridge_address = BrokerAddress.parse(broker)
        if broker_admin is None:
            raise ValueError(f"the coordinator manages device identities on {address.url()} through Mosquitto's "
                             "dynamic-security plugin and needs its admin identity: pass --broker-admin USER and "
                             "set FEDSIGHT_BROKER_ADMIN_PASSWORD (see docs/security.md)")
    services: Services | None = None
    bridge: MqttBridge | None = None
    try:
        if accounts is None and broker_admin is not None:
            accounts = dynsec = DynsecAccounts(address, *broker_admin)
            dynsec.start()
            dynsec.provision(creds)
        services = build_services(data_dir, engine_config=engine_config, evaluate=evaluate, weights_dir=weights_dir)
        services.broker_accounts = accounts
        engine_ref.append(services.engine)
        bridge = MqttBridge(services.engine, bridge_address, username=creds.username, password=creds.password)
        if resume:
            services.engine.hold_updates()  # queued updates wait for their re-opened rounds (issue 10)
        bridge.start()
        app = create_app({"services": services})
        http = create_server(app, host=host, port=port, threads=threads, ident="fedsight",
                             max_request_body_size=MAX_WEIGHTS_BYTES)  # waitress refuses bigger bodies unread;
        # the app's BodyLimit refuses anything but a job with its weights file over MAX_JSON_BYTES
        bound = int(http.effective_port)
        url_host = "127.0.0.1" if host in _ANY_HOST else host
        services.engine.config.public_url, services.broker_url = advertised(host, bound, address, public_url,
                                                                            advertised_broker_url)
        if host in _ANY_HOST and public_url is None:
            log.warning("bound to all interfaces but devices are told %s; pass public_url for remote devices",
                        services.engine.config.public_url)
        if public_url and _is_loopback(services.broker_url) and not _is_loopback(public_url):
            log.warning("devices reach this coordinator at %s but are told the broker is %s (loopback); pass "
                        "advertised_broker_url (--public-broker)", public_url, services.broker_url)
        thread = threading.Thread(target=http.run, name="waitress", daemon=True)
        thread.start()
        if resume:
            try:
                resumed = services.engine.resume()
            finally:
                services.engine.release_updates()
            if resumed:
                log.info("resumed running job(s): %s", ", ".join(resumed))
    except BaseException:
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
    url = f"http://{url_host}:{bound}"
    secrets = services.credentials
    log.info("operator token in %s, enrollment secret in %s (mode 600; see docs/security.md)",
             secrets.path("operator-token"), secrets.path("enroll-secret"))
    log.info("coordinator REST on %s (data in %s), MQTT on %s; devices are told %s and %s", url,
             Path(data_dir).resolve(), address.url(), services.engine.config.public_url, services.broker_url)
    return CoordinatorHandle(services, url, services.broker_url or "", bridge, embedded, http, thread,
                             accounts=accounts)


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
            if not handle._http_thread.is_alive():
                log.error("HTTP server thread exited unexpectedly")
                break
    finally:
        handle.stop()
        for sig, prev in previous.items():
            signal.signal(sig, prev)
