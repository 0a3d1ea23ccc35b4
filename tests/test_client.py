"""EdgeClient against an in-process coordinator with the embedded broker (HTTPS + mqtts, the device pins the
coordinator's CA): identity, readiness, patches."""
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
from edge_sdk.tls import PinnedSession

JOB = {"name": "t", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
       "rounds": 2, "clients_per_round": 1, "min_clients": 1, "round_timeout_s": 30,
       "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
       "codec": {"name": "topk", "density": 0.02, "values": "float16"}, "eval": None, "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def http(server: CoordinatorHandle) -> Iterator[requests.Session]:
    with PinnedSession(server.ca_file) as session:
        yield session


def device(server: CoordinatorHandle, dataset: object, cache: Path) -> EdgeClient:
    return EdgeClient(server.url, dataset=dataset, cache_dir=cache, ca_file=server.ca_file)


def client_row(handle: CoordinatorHandle, cid: str) -> dict:
    rows = requests.get(f"{handle.url}/api/v1/clients", timeout=5, verify=str(handle.ca_file)).json()["clients"]
    return next(r for r in rows if r["id"] == cid)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_stop_before_start_is_harmless(server: CoordinatorHandle, tmp_path: Path) -> None:
    device(server, SampleBuffer(capacity=4), tmp_path).stop()


def test_identity_is_kept_across_restarts(server: CoordinatorHandle, tmp_path: Path) -> None:
    first = device(server, SampleBuffer(capacity=4), tmp_path)
    again = device(server, SampleBuffer(capacity=4), tmp_path)
    assert again.client_id == first.client_id and again.token == first.token
    assert again.broker_url == server.broker_url  # discovered from /health


def test_device_without_data_is_not_selectable_until_frames_arrive(server: CoordinatorHandle,
                                                                   tmp_path: Path) -> None:
    buffer = SampleBuffer(capacity=64, input_scale=16)
    client = device(server, buffer, tmp_path)
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


def test_job_rounds_use_downlink_patches(server: CoordinatorHandle, http: requests.Session,
                                         tmp_path: Path) -> None:
    train, _ = load_digits_split()
    client = device(server, train, tmp_path)
    client.start()
    try:
        wait_for(lambda: client_row(server, client.client_id)["ready"])
        job = http.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=10).json()
        http.post(f"{server.url}/api/v1/jobs/{job['id']}/start", timeout=10).raise_for_status()
        wait_for(lambda: http.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"]
                 == "finished", timeout=60)
    finally:
        client.stop()
    mine = [r for r in client.history if r.job_id == job["id"]]
    assert [r.round for r in mine] == [1, 2]
    full = len(http.get(f"{server.url}/api/v1/jobs/{job['id']}/models/{job['current_version']}",
                            headers={"Authorization": f"Bearer {client.token}"}, timeout=5).content)
    assert mine[0].download_bytes == full          # round 1: nothing cached, full model
    assert 0 < mine[1].download_bytes < full / 3   # round 2: a patch against the cached version 0
    assert mine[1].update_bytes < full / 10        # 2 % top-k in fp16
