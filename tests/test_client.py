"""EdgeClient against an in-process coordinator with the embedded broker: identity, readiness, patches."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from coordinator.server import CoordinatorHandle, start
from edge_sdk.client import EdgeClient
from edge_sdk.data import SampleBuffer, load_digits_split

JOB = {"name": "t", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
       "rounds": 2, "clients_per_round": 1, "min_clients": 1, "round_timeout_s": 30,
       "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
       "codec": {"name": "topk", "density": 0.02, "values": "float16"}, "eval": None, "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


def client_row(handle: CoordinatorHandle, cid: str) -> dict:
    rows = requests.get(f"{handle.url}/api/v1/clients", timeout=5).json()["clients"]
    return next(r for r in rows if r["id"] == cid)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_stop_before_start_is_harmless(server: CoordinatorHandle, tmp_path: Path) -> None:
    EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path).stop()


def test_identity_is_kept_across_restarts(server: CoordinatorHandle, tmp_path: Path) -> None:
    first = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path)
    again = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path)
    assert again.client_id == first.client_id and again.token == first.token
    assert again.broker_url == server.broker_url  # discovered from /health


def test_device_without_data_is_not_selectable_until_frames_arrive(server: CoordinatorHandle,
                                                                   tmp_path: Path) -> None:
    buffer = SampleBuffer(capacity=64, input_scale=16)
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path)
    client.start()
    try:
        wait_for(lambda: client_row(server, client.client_id)["online"])
        assert client_row(server, client.client_id)["ready"] is False
        digits = (np.random.default_rng(0).integers(0, 17, (8, 8))).astype(np.uint8)
        buffer.add(digits, 3)
        wait_for(lambda: client_row(server, client.client_id)["ready"])
    finally:
        client.stop()
    wait_for(lambda: not client_row(server, client.client_id)["online"])


def test_job_rounds_use_downlink_patches(server: CoordinatorHandle, tmp_path: Path) -> None:
    train, _ = load_digits_split()
    client = EdgeClient(server.url, dataset=train, cache_dir=tmp_path)
    client.start()
    try:
        wait_for(lambda: client_row(server, client.client_id)["ready"])
        job = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=10).json()
        requests.post(f"{server.url}/api/v1/jobs/{job['id']}/start", timeout=10).raise_for_status()
        wait_for(lambda: requests.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"]
                 == "finished", timeout=60)
    finally:
        client.stop()
    mine = [r for r in client.history if r.job_id == job["id"]]
    assert [r.round for r in mine] == [1, 2]
    full = len(requests.get(f"{server.url}/api/v1/jobs/{job['id']}/models/{job['current_version']}",
                            headers={"Authorization": f"Bearer {client.token}"}, timeout=5).content)
    assert mine[0].download_bytes == full          # round 1: nothing cached, full model
    assert 0 < mine[1].download_bytes < full / 3   # round 2: a patch against the cached version 0
    assert mine[1].update_bytes < full / 10        # 2 % top-k in fp16


def test_devices_get_broker_identities_and_only_their_own(server: CoordinatorHandle, tmp_path: Path) -> None:
    import json
    import stat

    api = f"{server.url}/api/v1"
    reg = requests.post(f"{api}/clients", json={"name": "given"}, timeout=5).json()
    other = requests.post(f"{api}/clients", json={"name": "other"}, timeout=5).json()
    # Given only id + token (no broker secret), the client asks for a new secret and connects with it.
    given = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), client_id=reg["client_id"], token=reg["token"],
                       cache_dir=tmp_path / "given")
    given.start()
    try:
        wait_for(lambda: client_row(server, reg["client_id"])["online"])
    finally:
        given.stop()
    # The secret from registration was replaced, so it no longer opens the broker.
    from tests.support.mqtt_probe import Probe
    stale = Probe(server.broker_url, f"fedsight-{reg['client_id']}", reg["mqtt_username"], reg["mqtt_password"])
    assert not stale.accepted
    stale.close()
    # Credentials saved before broker ACLs existed are completed and kept owner-only.
    cache = tmp_path / "old"
    cache.mkdir()
    (cache / "credentials.json").write_text(json.dumps({"coordinator": server.url, "client_id": other["client_id"],
                                                        "token": other["token"], "name": "other"}))
    old = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=cache)
    saved = json.loads((cache / "credentials.json").read_text())
    assert saved["mqtt_username"] == other["client_id"] and saved["mqtt_password"]
    assert stat.S_IMODE((cache / "credentials.json").stat().st_mode) == 0o600
    old.start()
    try:
        wait_for(lambda: client_row(server, other["client_id"])["online"])
    finally:
        old.stop()
    # A device whose broker account is gone (coordinator data lost, broker reset) renews it with its token.
    server.services.broker_accounts.remove_device(other["client_id"])
    wait_for(lambda: not client_row(server, other["client_id"])["online"])
    again = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=cache)
    again.start()
    try:
        wait_for(lambda: client_row(server, other["client_id"])["online"])
    finally:
        again.stop()
    assert json.loads((cache / "credentials.json").read_text())["mqtt_password"] != saved["mqtt_password"]
    # A device may renew only its own broker secret; reserved ids cannot register.
    url = f"{api}/clients/{other['client_id']}/broker-credentials"
    assert requests.post(url, timeout=5).status_code == 401
    assert requests.post(url, headers={"Authorization": f"Bearer {reg['token']}"}, timeout=5).status_code == 403
    for reserved in ("coordinator", "fedsight-coordinator"):
        resp = requests.post(f"{api}/clients", json={"client_id": reserved}, timeout=5)
        assert resp.status_code == 400 and "reserved" in resp.json()["error"]
