"""Devices on other hosts: the coordinator binds one address and advertises another (loopback aliases).

Linux routes all of 127.0.0.0/8 to ``lo``, so a coordinator bound to 0.0.0.0 that advertises 127.0.0.3 (HTTPS)
and 127.0.0.4 (mqtts) stands in for a server whose devices reach it by a public name. Devices are configured
with the advertised URL and the CA file only; everything else they learn from the coordinator. TLS is on (the
default): the generated certificate must name the advertised hosts, or the devices' hostname checks fail.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edge_sdk.protocol import topics
from edge_sdk.transport import MqttTransport
from tests.support.processes import (ROOT, CoordinatorAddress, child_env, cli, free_port, start_device,
                                     stop_process)

pytestmark = pytest.mark.integration

PUBLIC_HTTP, PUBLIC_MQTT = "127.0.0.3", "127.0.0.4"
PATH_RE = re.compile(r"^/api/v1/jobs/(job-[0-9a-f]+)/models/([0-9a-f]{64})$")


def wait_healthy(url: str, ca: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"coordinator exited:\n{log.read_text()[-3000:]}"
        try:
            resp = requests.get(f"{url}/api/v1/health", timeout=1, verify=str(ca))
            if resp.ok:
                return resp.json()
        except (requests.RequestException, OSError):  # OSError: the CA file is not written yet
            pass
        assert time.monotonic() < deadline, f"coordinator not healthy at {url}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    workdir = tmp_path_factory.mktemp("remote")
    http_port, mqtt_port = free_port(), free_port()
    log = workdir / "coordinator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli("coordinator", "--host", "0.0.0.0", "--port", str(http_port), "--mqtt-host", "0.0.0.0",
                "--mqtt-port", str(mqtt_port), "--data-dir", str(workdir / "data"),
                "--public-url", f"https://{PUBLIC_HTTP}:{http_port}",
                "--public-broker", f"mqtts://{PUBLIC_MQTT}:{mqtt_port}"),
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
    try:
        wait_healthy(f"https://{PUBLIC_HTTP}:{http_port}", workdir / "data" / "tls" / "ca.pem", proc, log)
        yield f"https://{PUBLIC_HTTP}:{http_port}", mqtt_port, workdir
    finally:
        stop_process(proc)


def test_devices_use_only_the_advertised_addresses(remote: tuple[str, int, Path]) -> None:
    url, mqtt_port, workdir = remote
    data = workdir / "data"  # what the coordinator wrote on first start (0600; ca.pem 0644)
    ca = data / "tls" / "ca.pem"
    health = requests.get(f"{url}/api/v1/health", timeout=5, verify=str(ca)).json()
    assert health["broker_url"] == f"mqtts://{PUBLIC_MQTT}:{mqtt_port}" and health["public_url"] == url

    events: list[dict] = []
    got = threading.Event()

    def on_event(topic: str, payload: bytes) -> None:
        events.append(json.loads(payload))
        if events[-1].get("type") == "job_finished":
            got.set()

    token = (data / "operator-token").read_text().strip()
    operator = {"Authorization": f"Bearer {token}"}
    secret = (data / "enroll-secret").read_text().strip()
    # the watcher is a registered identity too: the broker refuses anonymous clients; devices may read job events
    me = requests.post(f"{url}/api/v1/clients", json={"name": "watcher", "enroll_secret": secret}, timeout=5,
                       verify=str(ca)).json()
    watcher = MqttTransport(health["broker_url"], topics.device_mqtt_id(me["client_id"]), on_event,
                            subscriptions=[topics.JOB_EVENTS_WILDCARD], persistent=False,
                            username=me["mqtt_username"], password=me["mqtt_password"], tls_ca=ca)
    watcher.start()
    devices = [start_device(workdir, CoordinatorAddress(url, data / "enroll-secret", ca), i, 2) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while sum(c["online"] for c in requests.get(f"{url}/api/v1/clients", timeout=5, headers=operator,
                                                              verify=str(ca)).json()["clients"]) < 2:
            assert time.monotonic() < deadline, f"devices not online: {[d.poll() for d in devices]}"
            time.sleep(0.3)
        out = subprocess.run(cli("job", "create", "--coordinator", url, "--ca", str(ca), "--rounds", "2",
                                 "--clients-per-round", "2",
                                 "--min-clients", "2", "--eval", "digits", "--start"),
                             capture_output=True, text=True, env={**child_env(), "FEDSIGHT_TOKEN": token}, cwd=ROOT,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip()
        assert got.wait(180), f"job did not finish; events: {events}"
    finally:
        watcher.stop()
        for d in devices:
            stop_process(d)

    rounds = requests.get(f"{url}/api/v1/jobs/{job_id}/rounds", timeout=5, headers=operator,
                          verify=str(ca)).json()["rounds"]
    assert [r["status"] for r in rounds] == ["closed", "closed"] and all(r["accepted"] == 2 for r in rounds)
    # Messages carry paths, never an origin: the devices resolved them against the URL they were given.
    with_model = [e for e in events if e["type"] in ("model_updated", "job_finished")]
    assert len(with_model) == 3 and all("model_url" not in e for e in with_model)
    assert all(PATH_RE.match(e["model_path"]).groups() == (job_id, e["version"]) for e in with_model)
    for i in range(2):
        log = (workdir / f"device-{i}.log").read_text()
        assert f"via mqtts://{PUBLIC_MQTT}:{mqtt_port}" in log, log[-2000:]
        creds = json.loads((workdir / f"device-{i}" / "credentials.json").read_text())
        assert creds["coordinator"] == url
        assert len(list((workdir / f"device-{i}" / "models").glob("*.fsm"))) >= 1  # downloaded via the path
