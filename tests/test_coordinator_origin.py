"""A device's credentials never leave its configured coordinator origin; versions are checked before use."""
from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from coordinator.cli.main import build_parser
from coordinator.server import CoordinatorHandle, advertised, start
from edge_sdk.client import EdgeClient
from edge_sdk.coordinator_origin import CoordinatorOrigin, UnsafeUrlError, check_version
from edge_sdk.model_cache import ModelCache, ModelDownloadError
from edge_sdk.transport import BrokerAddress

JOB = {"name": "o", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
       "rounds": 1, "clients_per_round": 1, "min_clients": 1, "train": {"epochs": 1, "batch_size": 16},
       "codec": {"name": "dense", "dtype": "float32"}, "eval": None, "seed": 0}
V = "ab" * 32


class Recorder(http.server.BaseHTTPRequestHandler):
    """Stands in for another host: records every request and, if told to, redirects elsewhere."""

    seen: list[tuple[str, str | None]] = []
    redirect_to: str | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to + self.path)
        else:
            self.send_response(200)
            self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def serve(host: str, handler: type) -> tuple[http.server.HTTPServer, str]:
    server = http.server.HTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


@pytest.fixture()
def foreign() -> Iterator[tuple[type, str]]:
    handler = type("Foreign", (Recorder,), {"seen": [], "redirect_to": None})
    server, url = serve("127.0.0.5", handler)
    yield handler, url
    server.shutdown()
    server.server_close()


def test_origin_builds_urls_and_refuses_everything_else() -> None:
    o = CoordinatorOrigin("http://Cams.Example:8080/fedsight/")
    assert o.url("/api/v1/jobs/j/models/x") == "http://Cams.Example:8080/fedsight/api/v1/jobs/j/models/x"
    assert o.owns("http://cams.example:8080/fedsight/api/v1/health")
    assert not o.owns("http://cams.example:8081/fedsight/api/v1/health")   # other port
    assert not o.owns("https://cams.example:8080/fedsight/api/v1/health")  # other scheme
    assert not o.owns("http://cams.example:8080/other/api/v1/health")      # outside the prefix
    assert not o.owns("http://x@cams.example:8080/fedsight/api/v1/health")  # userinfo: refused
    assert CoordinatorOrigin("https://h").owns("https://h:443/api/v1/x")
    for bad in ("http://evil.example/api/v1/x", "//evil.example/x", "api/v1/x", "/api/../../etc", "/a\\b",
                "/a b", None, 3):
        with pytest.raises(UnsafeUrlError):
            o.url(bad)
    for bad_base in ("ftp://h", "h:8080", "http://user:pw@h", "http://h/?q=1"):
        with pytest.raises(UnsafeUrlError):
            CoordinatorOrigin(bad_base)
    assert check_version(V) == V
    for bad in ("../" * 20 + "x" * 4, "AB" * 32, "ab" * 31, None, "ab" * 32 + "\n"):
        with pytest.raises(UnsafeUrlError):
            check_version(bad)


def test_advertised_addresses_follow_the_public_url() -> None:
    anywhere = BrokerAddress("0.0.0.0", 1883)
    assert advertised("0.0.0.0", 8080, anywhere, None, None) == ("http://127.0.0.1:8080", "mqtt://127.0.0.1:1883")
    assert advertised("0.0.0.0", 8080, anywhere, "http://cams.example:80/", None) == (
        "http://cams.example:80", "mqtt://cams.example:1883")
    assert advertised("0.0.0.0", 8080, anywhere, "http://cams.example", "mqtt://mq.example:8883") == (
        "http://cams.example", "mqtt://mq.example:8883")
    assert advertised("127.0.0.2", 9, BrokerAddress("127.0.0.2", 7), None, None) == (
        "http://127.0.0.2:9", "mqtt://127.0.0.2:7")


def test_cli_rejects_bad_public_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["coordinator", "--host", "0.0.0.0", "--mqtt-host", "0.0.0.0", "--public-url",
                              "http://cams.example:8080/", "--public-broker", "mqtt://cams.example:1883"])
    assert (args.host, args.mqtt_host, args.public_url, args.public_broker) == (
        "0.0.0.0", "0.0.0.0", "http://cams.example:8080", "mqtt://cams.example:1883")
    for flag, value in (("--public-url", "ftp://x"), ("--public-broker", "embedded"),
                        ("--public-broker", "cams.example")):
        with pytest.raises(SystemExit):
            parser.parse_args(["coordinator", flag, value])
        assert f"argument {flag}" in capsys.readouterr().err


def test_model_cache_never_follows_a_redirect_to_another_origin(tmp_path: Path, foreign: tuple[type, str]) -> None:
    handler, foreign_url = foreign
    home = type("Home", (Recorder,), {"seen": [], "redirect_to": foreign_url})
    server, home_url = serve("127.0.0.6", home)
    try:
        session = requests.Session()
        session.headers["Authorization"] = "Bearer secret"
        cache = ModelCache(tmp_path, session, origin=CoordinatorOrigin(home_url))
        with pytest.raises(ModelDownloadError, match="HTTP 302"):
            cache.get(f"{home_url}/api/v1/jobs/j/models/{V}", V)
        with pytest.raises(UnsafeUrlError, match="refusing to send device credentials"):
            cache.get(f"{foreign_url}/api/v1/jobs/j/models/{V}", V)
        with pytest.raises(UnsafeUrlError):
            cache.get(f"{home_url}/x", "../../etc/passwd")
    finally:
        server.shutdown()
        server.server_close()
    assert home.seen and all(auth == "Bearer secret" for _, auth in home.seen)
    assert handler.seen == []  # the other host never heard from us
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


def test_client_refuses_tasks_pointing_elsewhere(server: CoordinatorHandle, tmp_path: Path,
                                                 foreign: tuple[type, str], one_torch_thread: None,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    handler, foreign_url = foreign
    creds = server.services.credentials
    operator = {"Authorization": f"Bearer {creds.path('operator-token').read_text().strip()}"}
    job = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=120, headers=operator,
                        verify=str(server.ca_file)).json()
    version = job["current_version"]
    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    client = EdgeClient(server.url, dataset=data, cache_dir=tmp_path, ca_file=server.ca_file,
                        enroll_secret=creds.path("enroll-secret").read_text().strip())
    # selected in a round: the device token may fetch this job's models (and only from the coordinator)
    server.services.store.open_round(job["id"], 1, 1, version, JOB["codec"], [client.client_id])
    base = {"type": "train", "job_id": job["id"], "round": 1, "attempt": 1, "base_version": version,
            "config": {"epochs": 1, "batch_size": 16, "codec": JOB["codec"]}}
    bad_tasks = [
        {**base, "model_path": f"{foreign_url}/api/v1/jobs/{job['id']}/models/{version}"},
        {**base, "model_url": f"{foreign_url}/steal"},
        {**base, "model_path": f"{server.url}/api/v1/jobs/{job['id']}/models/{version}"},  # absolute: refused too
        {**base, "model_path": f"//127.0.0.5/api/v1/jobs/{job['id']}/models/{version}"},
        {**base, "base_version": "../../../../tmp/x"},
        {**base, "job_id": "../x"},
    ]
    with caplog.at_level(logging.ERROR, logger="edge_sdk.client"):
        for task in bad_tasks:
            assert client.handle_task(task) is None
    assert len([r for r in caplog.records if "refusing task" in r.getMessage()]) == len(bad_tasks)
    assert handler.seen == [] and client.history == []
    assert list((tmp_path / "models").iterdir()) == []
    # The same task with a path is served from the configured coordinator.
    report = client.handle_task({**base, "model_path": f"/api/v1/jobs/{job['id']}/models/{version}"})
    assert report is not None and report.download_bytes > 0
    assert (tmp_path / "models" / f"{version}.fsm").is_file()
