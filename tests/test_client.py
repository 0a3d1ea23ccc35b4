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
       "codec": {"name": "topk", "density": 0.02, "values": "float16"}, "eval": None, "seed": 0,
       "input_scale": 16}  # digits pixels are 0..16


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


def test_device_prepares_frames_from_the_job_and_scores_held_out_data(server: CoordinatorHandle,
                                                                      tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from edge_sdk.preprocess import digits_preprocessing

    digits = load_digits()
    buffer = SampleBuffer(capacity=300)  # the app passes raw frames only; the job says how to prepare them
    for img, label in zip(digits.images[:300], digits.target[:300]):
        buffer.add(img.astype(np.uint8), int(label))
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path)
    client.start()
    try:
        wait_for(lambda: client_row(server, client.client_id)["ready"])
        body = {k: v for k, v in JOB.items() if k != "input_scale"}
        body["eval"] = {"dataset": "digits", "holdout_fraction": 0.25}  # digits defaults: scale 16, mean 0.5
        job = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=10).json()
        requests.post(f"{server.url}/api/v1/jobs/{job['id']}/start", timeout=10).raise_for_status()
        wait_for(lambda: requests.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"]
                 == "finished", timeout=60)
    finally:
        client.stop()
    assert buffer.spec == digits_preprocessing(8, 1)
    held, train = len(buffer.holdout(0.25)), len(buffer.snapshot(0.25))
    assert held + train == 300 and held > 30
    mine = [r for r in client.history if r.job_id == job["id"]]
    assert [r.num_samples for r in mine] == [train, train]  # held-out frames are never trained on
    assert all(r.metrics["eval_samples"] == held and 0 <= r.metrics["eval_accuracy"] <= 1 for r in mine)
    rounds = requests.get(f"{server.url}/api/v1/jobs/{job['id']}/rounds", timeout=5).json()["rounds"]
    first, last = rounds[0]["federated_eval"], rounds[-1]["federated_eval"]
    assert first["status"] == "ok" and first["num_samples"] == held and first["scored_in_round"] == 2
    assert first["accuracy"] == pytest.approx(mine[1].metrics["eval_accuracy"])
    assert last["status"] == "not_run" and "final version" in last["reason"]
    metrics = requests.get(f"{server.url}/api/v1/jobs/{job['id']}/metrics", timeout=5).json()["metrics"]
    fed0 = {m["name"]: m["value"] for m in metrics if m["source"] == "federated" and m["round"] == 0}
    assert fed0["accuracy"] == pytest.approx(mine[0].metrics["eval_accuracy"])  # version 0, scored in round 1


def test_buffer_that_does_not_fit_the_job_is_refused_before_anything_is_sent(server: CoordinatorHandle,
                                                                             tmp_path: Path) -> None:
    from edge_sdk.preprocess import PreprocessingMismatch

    buffer = SampleBuffer(capacity=8, image_size=16)  # pinned by the app: the job's model takes 8x8
    buffer.add(np.zeros((12, 12), np.uint8), 1)
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path)
    job = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=10).json()
    task = {"job_id": job["id"], "round": 1, "base_version": job["current_version"], "config": {}}
    with pytest.raises(PreprocessingMismatch, match="image_size 16x16 != 8x8"):
        client.handle_task(task)
    assert client.history == [] and buffer.spec is None and buffer[0][0].shape == (1, 16, 16)


def test_buffer_is_set_up_for_its_job_at_start_so_frames_are_not_kept_raw(server: CoordinatorHandle,
                                                                          tmp_path: Path) -> None:
    from edge_sdk.job_data import preprocessing_from_job
    from edge_sdk.preprocess import Preprocessing

    body = {"name": "cams", "model": {"arch": "small_cnn", "num_classes": 3, "image_size": 12}, "eval": None}
    job = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=10).json()
    expected = Preprocessing.create(12, 3, {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, 255)
    assert preprocessing_from_job(job["config"]) == expected
    buffer = SampleBuffer(capacity=4)
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path, jobs=[job["id"]])
    client.start()
    try:
        assert buffer.spec == expected
        buffer.add(np.zeros((480, 640, 3), np.uint8), 1)
        assert buffer._images[0].shape == (3, 12, 12)  # prepared on add, not stored at 640x480
    finally:
        client.stop()
