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
       "codec": {"name": "topk", "density": 0.02, "values": "float16"}, "eval": None, "seed": 0,
       "input_scale": 16}  # digits pixels are 0..16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


def operator(handle: CoordinatorHandle) -> dict[str, str]:
    token = handle.services.credentials.path("operator-token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def secret(handle: CoordinatorHandle) -> str:
    return handle.services.credentials.path("enroll-secret").read_text().strip()


@pytest.fixture(scope="module")
def http(server: CoordinatorHandle) -> Iterator[requests.Session]:
    """The operator's session: pinned to the coordinator's CA, with the operator token."""
    with PinnedSession(server.ca_file) as session:
        session.headers.update(operator(server))
        yield session


def client_row(handle: CoordinatorHandle, cid: str) -> dict:
    rows = requests.get(f"{handle.url}/api/v1/clients", headers=operator(handle), timeout=5,
                        verify=str(handle.ca_file)).json()["clients"]
    return next(r for r in rows if r["id"] == cid)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_stop_before_start_is_harmless(server: CoordinatorHandle, tmp_path: Path) -> None:
    EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path, enroll_secret=secret(server),
               ca_file=server.ca_file).stop()


def test_identity_is_kept_across_restarts(server: CoordinatorHandle, tmp_path: Path) -> None:
    first = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path, enroll_secret=secret(server),
                       ca_file=server.ca_file)
    again = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path,
                       ca_file=server.ca_file)  # no secret needed now
    assert again.client_id == first.client_id and again.token == first.token
    assert again.broker_url == server.broker_url  # discovered from /health
    saved = tmp_path / "credentials.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert again._device_key == server.services.credentials.device_key(first.client_id)


def test_device_without_data_is_not_selectable_until_frames_arrive(server: CoordinatorHandle,
                                                                   tmp_path: Path) -> None:
    buffer = SampleBuffer(capacity=64, input_scale=16)
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path, enroll_secret=secret(server),
                        ca_file=server.ca_file)
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
    client = EdgeClient(server.url, dataset=train, cache_dir=tmp_path, enroll_secret=secret(server),
                        ca_file=server.ca_file)
    client.start()
    op = operator(server)
    try:
        wait_for(lambda: client_row(server, client.client_id)["ready"])
        job = requests.post(f"{server.url}/api/v1/jobs", json=JOB, headers=op, timeout=10,
                            verify=str(server.ca_file)).json()
        requests.post(f"{server.url}/api/v1/jobs/{job['id']}/start", headers=op, timeout=10,
                      verify=str(server.ca_file)).raise_for_status()
        wait_for(lambda: requests.get(f"{server.url}/api/v1/jobs/{job['id']}", headers=op, timeout=5,
                                      verify=str(server.ca_file)).json()
                 ["status"] == "finished", timeout=60)
    finally:
        client.stop()
    mine = [r for r in client.history if r.job_id == job["id"]]
    assert [r.round for r in mine] == [1, 2]
    full = len(http.get(f"{server.url}/api/v1/jobs/{job['id']}/models/{job['current_version']}",
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
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path, enroll_secret=secret(server),
                        ca_file=server.ca_file)
    op = operator(server)
    client.start()
    try:
        wait_for(lambda: client_row(server, client.client_id)["ready"])
        body = {k: v for k, v in JOB.items() if k != "input_scale"}
        body["eval"] = {"dataset": "digits", "holdout_fraction": 0.25}  # digits defaults: scale 16, mean 0.5
        job = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=10,
                            verify=str(server.ca_file), headers=op).json()
        requests.post(f"{server.url}/api/v1/jobs/{job['id']}/start", timeout=10,
                      verify=str(server.ca_file), headers=op).raise_for_status()
        wait_for(lambda: requests.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=5,
                                      verify=str(server.ca_file), headers=op).json()["status"]
                 == "finished", timeout=60)
    finally:
        client.stop()
    assert buffer.spec == digits_preprocessing(8, 1)
    held, train = len(buffer.holdout(0.25)), len(buffer.snapshot(0.25))
    assert held + train == 300 and held > 30
    mine = [r for r in client.history if r.job_id == job["id"]]
    assert [r.num_samples for r in mine] == [train, train]  # held-out frames are never trained on
    assert all(r.metrics["eval_samples"] == held and 0 <= r.metrics["eval_accuracy"] <= 1 for r in mine)
    rounds = requests.get(f"{server.url}/api/v1/jobs/{job['id']}/rounds", timeout=5,
                          verify=str(server.ca_file), headers=op).json()["rounds"]
    first, last = rounds[0]["federated_eval"], rounds[-1]["federated_eval"]
    assert first["status"] == "ok" and first["num_samples"] == held and first["scored_in_round"] == 2
    assert first["accuracy"] == pytest.approx(mine[1].metrics["eval_accuracy"])
    assert last["status"] == "not_run" and "final version" in last["reason"]
    metrics = requests.get(f"{server.url}/api/v1/jobs/{job['id']}/metrics", timeout=5,
                           verify=str(server.ca_file), headers=op).json()["metrics"]
    fed0 = {m["name"]: m["value"] for m in metrics if m["source"] == "federated" and m["round"] == 0}
    assert fed0["accuracy"] == pytest.approx(mine[0].metrics["eval_accuracy"])  # version 0, scored in round 1


def test_buffer_that_does_not_fit_the_job_is_refused_before_anything_is_sent(server: CoordinatorHandle,
                                                                             tmp_path: Path) -> None:
    from edge_sdk.preprocess import PreprocessingMismatch

    buffer = SampleBuffer(capacity=8, image_size=16)  # pinned by the app: the job's model takes 8x8
    buffer.add(np.zeros((12, 12), np.uint8), 1)
    client = EdgeClient(server.url, dataset=buffer, cache_dir=tmp_path, enroll_secret=secret(server),
                        ca_file=server.ca_file)
    job = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=10,
                        verify=str(server.ca_file), headers=operator(server)).json()
    # selected in a round: the device token may fetch the job's model (the download happens, training does not)
    server.services.store.open_round(job["id"], 1, 1, job["current_version"], JOB["codec"], [client.client_id])
    task = {"job_id": job["id"], "round": 1, "base_version": job["current_version"], "config": {}}
    with pytest.raises(PreprocessingMismatch, match="image_size 16x16 != 8x8"):
        client.handle_task(task)
    assert client.history == [] and buffer.spec is None and buffer[0][0].shape == (1, 16, 16)


class Listener:
    """A TCP listener on another loopback address that counts who connects (the 'attacker's host')."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_forged_tasks_are_ignored_and_never_leak_the_token(server: CoordinatorHandle, tmp_path: Path) -> None:
    """A task naming another origin, or a base_version that is not a sha256, is dropped before any request."""
    import json

    from edge_sdk.coordinator_origin import UnsafeUrlError
    from edge_sdk.protocol import topics

    client = EdgeClient(server.url, dataset=SampleBuffer(capacity=4), cache_dir=tmp_path, enroll_secret=secret(server),
                        ca_file=server.ca_file)
    evil = Listener()
    try:
        port = server.port
        good = {"type": "train", "job_id": "job-1", "round": 1, "attempt": 1, "base_version": "ab" * 32,
                "model_path": f"/api/v1/jobs/job-1/models/{'ab' * 32}", "config": {}}
        forged = {
            "other host": {**good, "model_path": f"http://127.0.0.2:{evil.port}/m"},
            "other port": {**good, "model_path": f"http://127.0.0.1:{evil.port}/m"},
            "other scheme": {**good, "model_path": f"https://127.0.0.1:{port}/m"},
            "scheme-relative": {**good, "model_path": f"//127.0.0.2:{evil.port}/m"},
            "userinfo": {**good, "model_path": f"http://x@127.0.0.1:{port}/m"},
            "legacy model_url elsewhere": {**good, "model_path": None, "model_url": f"http://127.0.0.2:{evil.port}/m"},
            "dot segments": {**good, "model_path": "/api/v1/../../m"},
            "path as version": {**good, "base_version": "../../credentials"},
            "short version": {**good, "base_version": "ab" * 8},
            "upper-case version": {**good, "base_version": "AB" * 32},
            "bad job id": {**good, "job_id": "../job"},
            "bad round": {**good, "round": "1"},
        }
        topic = topics.task_topic(client.client_id)
        for name, task in forged.items():
            client._on_message(topic, json.dumps(task).encode())
            assert client._tasks.empty(), name
            assert client.handle_task(task) is None, name  # refused (and logged) before any request
        client._on_message(topic, json.dumps(good).encode())  # the same task, well formed, is taken
        assert client._tasks.get_nowait()["base_version"] == good["base_version"]
        with pytest.raises(UnsafeUrlError):  # and the cache refuses other origins on its own
            client.models.get(f"http://127.0.0.2:{evil.port}/m", "cd" * 32)
        with pytest.raises(UnsafeUrlError):  # userinfo on the right host:port is refused too
            client.models.get(f"http://x@127.0.0.1:{port}/m", "cd" * 32)
        time.sleep(0.3)
        assert evil.connections == 0
    finally:
        evil.close()


def test_devices_get_broker_identities_and_only_their_own(server: CoordinatorHandle, tmp_path: Path) -> None:
    import json
    import stat

    api = f"{server.url}/api/v1"
    enroll = {"enroll_secret": secret(server)}
    reg = requests.post(f"{api}/clients", json={"name": "given", **enroll}, timeout=5,
                        verify=str(server.ca_file)).json()
    other = requests.post(f"{api}/clients", json={"name": "other", **enroll}, timeout=5,
                          verify=str(server.ca_file)).json()
    # Given only id + token + device key (no broker secret), the client asks for a new secret and connects with it.
    given = EdgeClient(server.url, ca_file=server.ca_file, dataset=SampleBuffer(capacity=4),
                       client_id=reg["client_id"], token=reg["token"],
                       device_key=reg["device_key"], cache_dir=tmp_path / "given")
    given.start()
    try:
        wait_for(lambda: client_row(server, reg["client_id"])["online"])
    finally:
        given.stop()
    # The secret from registration was replaced, so it no longer opens the broker.
    from tests.support.mqtt_probe import Probe
    stale = Probe(server.broker_url, f"fedsight-{reg['client_id']}", reg["mqtt_username"], reg["mqtt_password"],
                  tls_ca=server.ca_file)
    assert not stale.accepted
    stale.close()
    # Credentials saved before broker ACLs existed are completed and kept owner-only.
    cache = tmp_path / "old"
    cache.mkdir()
    (cache / "credentials.json").write_text(json.dumps({"coordinator": server.url, "client_id": other["client_id"],
                                                        "token": other["token"], "name": "other",
                                                        "device_key": other["device_key"]}))
    old = EdgeClient(server.url, ca_file=server.ca_file, dataset=SampleBuffer(capacity=4), cache_dir=cache)
    saved = json.loads((cache / "credentials.json").read_text())
    assert saved["mqtt_username"] == other["client_id"] and saved["mqtt_password"]
    assert stat.S_IMODE((cache / "credentials.json").stat().st_mode) == 0o600
    old.start()
    try:
        wait_for(lambda: client_row(server, other["client_id"])["online"])
    finally:
        old.stop()
    # Its "offline" status must land before the account goes: a removed identity may not publish it any more.
    wait_for(lambda: not client_row(server, other["client_id"])["online"])
    # A device whose broker account is gone (coordinator data lost, broker reset) renews it with its token.
    server.services.broker_accounts.remove_device(other["client_id"])
    again = EdgeClient(server.url, ca_file=server.ca_file, dataset=SampleBuffer(capacity=4), cache_dir=cache)
    again.start()
    try:
        wait_for(lambda: client_row(server, other["client_id"])["online"])
    finally:
        again.stop()
    assert json.loads((cache / "credentials.json").read_text())["mqtt_password"] != saved["mqtt_password"]
    # A device may renew only its own broker secret; reserved ids cannot register.
    url = f"{api}/clients/{other['client_id']}/broker-credentials"
    assert requests.post(url, timeout=5, verify=str(server.ca_file)).status_code == 401
    assert requests.post(url, headers={"Authorization": f"Bearer {reg['token']}"}, timeout=5,
                         verify=str(server.ca_file)).status_code == 403
    for reserved in ("coordinator", "fedsight-coordinator"):
        resp = requests.post(f"{api}/clients", json={"client_id": reserved, **enroll}, timeout=5,
                             verify=str(server.ca_file))
        assert resp.status_code == 400 and "reserved" in resp.json()["error"]
    # A revoked device loses its broker account with its token (and cannot renew it).
    assert requests.delete(f"{api}/clients/{other['client_id']}", headers=operator(server), timeout=5,
                           verify=str(server.ca_file)).ok
    gone = Probe(server.broker_url, f"fedsight-{other['client_id']}", other["client_id"],
                 json.loads((cache / "credentials.json").read_text())["mqtt_password"], tls_ca=server.ca_file)
    assert not gone.accepted
    gone.close()
    assert requests.post(url, headers={"Authorization": f"Bearer {other['token']}"}, timeout=5,
                         verify=str(server.ca_file)).status_code == 401


def test_buffer_is_set_up_for_its_job_at_start_so_frames_are_not_kept_raw(server: CoordinatorHandle,
                                                                          tmp_path: Path) -> None:
    from edge_sdk.job_data import preprocessing_from_job
    from edge_sdk.preprocess import Preprocessing

    body = {"name": "cams", "model": {"arch": "small_cnn", "num_classes": 3, "image_size": 12}, "eval": None}
    job = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=120,
                        verify=str(server.ca_file), headers=operator(server)).json()
    expected = Preprocessing.create(12, 3, {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, 255)
    assert preprocessing_from_job(job["config"]) == expected
    buffer = SampleBuffer(capacity=4)
    client = EdgeClient(server.url, ca_file=server.ca_file, dataset=buffer, cache_dir=tmp_path, jobs=[job["id"]],
                          enroll_secret=secret(server))
    client.start()
    try:
        assert buffer.spec == expected
        buffer.add(np.zeros((480, 640, 3), np.uint8), 1)
        assert buffer._images[0].shape == (3, 12, 12)  # prepared on add, not stored at 640x480
    finally:
        client.stop()
