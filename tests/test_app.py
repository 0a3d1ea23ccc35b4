"""REST API through Flask's test client: jobs, clients, model downloads (auth, ETag, Range, 304), errors.

``http`` is authenticated as the operator; ``anon`` carries no credentials (the denials live in test_auth.py)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from coordinator.api.app import create_app
from coordinator.rounds.validation import hash_token
from edge_sdk.protocol.modelfile import flatten, load_model

JOB_BODY = {"name": "digits", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": 2, "clients_per_round": 2, "min_clients": 1, "round_timeout_s": 5,
            "codec": {"name": "topk", "density": 0.1}, "seed": 7}


@pytest.fixture
def app(tmp_path):
    app = create_app({"data_dir": tmp_path, "evaluate": False, "broker_url": "mqtt://127.0.0.1:1999"})
    yield app
    app.extensions["fedsight"].close()


def operator_token(app) -> str:
    return app.extensions["fedsight"].credentials.path("operator-token").read_text().strip()


@pytest.fixture
def http(app):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {operator_token(app)}"
    return client


@pytest.fixture
def anon(app):
    return app.test_client()


def enlist(app, job_id: str, client_id: str, version: str) -> None:
    """Record that the job selected the client (a bookkeeping round 0): what entitles it to the job's models."""
    app.extensions["fedsight"].store.open_round(job_id, 0, 1, version, {"name": "dense"}, [client_id])


@pytest.fixture
def job(http):
    resp = http.post("/api/v1/jobs", json=JOB_BODY)
    assert resp.status_code == 201, resp.json
    return resp.json


@pytest.fixture
def client_token(http):
    resp = http.post("/api/v1/clients", json={"name": "phone-1"})
    assert resp.status_code == 201
    return resp.json["client_id"], resp.json["token"]


def test_health(http):
    body = http.get("/api/v1/health").json
    assert body["status"] == "ok" and body["broker_url"] == "mqtt://127.0.0.1:1999" and "version" in body


def test_create_list_get_job_with_defaults_and_initial_model(http, app, job):
    assert job["status"] == "created" and job["current_round"] == 0 and job["rounds"] == 2
    cfg = job["config"]
    assert cfg["train"] == {"epochs": 1, "batch_size": 32, "lr": 0.05, "mu": 0.0, "freeze_backbone": False,
                            "backbone_lr_mult": 1.0, "bn_recalibrate": True, "logit_adjust": 1.0, "max_steps": 0}
    assert cfg["codec"]["name"] == "topk" and cfg["codec"]["density"] == 0.1 and cfg["strategy"] == {"name": "fedavg"}
    assert http.get("/api/v1/jobs").json["jobs"][0]["id"] == job["id"]
    assert http.get(f"/api/v1/jobs/{job['id']}").json["config"] == cfg
    models = http.get(f"/api/v1/jobs/{job['id']}/models").json["models"]
    assert [m["version"] for m in models] == [job["current_version"]] and models[0]["round"] == 0
    data = app.extensions["fedsight"].models.get(job["current_version"])
    arrays, meta = load_model(data)
    assert meta["job_id"] == job["id"] and meta["round"] == 0 and meta["arch"] == "small_cnn"
    assert meta["num_classes"] == 10 and meta["in_channels"] == 1 and meta["image_size"] == 8
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["normalization"]["mean"] == [0.5]
    # same seed, same initial weights (the meta differs: it names the job); another seed, other weights
    svc = app.extensions["fedsight"]
    again = http.post("/api/v1/jobs", json=JOB_BODY).json
    other = http.post("/api/v1/jobs", json={**JOB_BODY, "seed": 8}).json
    assert again["id"] != job["id"]
    np.testing.assert_array_equal(flatten(load_model(svc.models.get(again["current_version"]))[0]), flatten(arrays))
    assert not np.array_equal(flatten(load_model(svc.models.get(other["current_version"]))[0]), flatten(arrays))


@pytest.mark.parametrize("body, fragment", [
    ({**JOB_BODY, "model": {**JOB_BODY["model"], "arch": "resnet9000"}}, "unknown arch"),
    ({**JOB_BODY, "client_per_round": 3}, "client_per_round"),
    ({**JOB_BODY, "rounds": "ten"}, "'rounds' must be an integer"),
    ({**JOB_BODY, "rounds": 0}, "'rounds' must be >= 1"),
    ({**JOB_BODY, "min_clients": 5}, "'min_clients' must be <= 2"),
    ({**JOB_BODY, "codec": {"name": "zip"}}, "unknown codec name"),
    ({**JOB_BODY, "train": {"lr": True}}, "'train.lr' must be a number"),
    ({**JOB_BODY, "class_names": ["a"]}, "class_names"),
    ({**JOB_BODY, "eval": {"dataset": "imagenet"}}, "eval.dataset"),
    ({**JOB_BODY, "strategy": {"name": "fedmagic"}}, "unknown strategy"),
    ({"name": "x"}, "'model' must be a JSON object"),
    ([1, 2], "JSON object"),
])
def test_bad_job_bodies_are_400_with_reason(http, body, fragment):
    resp = http.post("/api/v1/jobs", json=body)
    assert resp.status_code == 400 and fragment in resp.json["error"], resp.json


def test_bad_json_and_unknown_routes(http):
    resp = http.post("/api/v1/jobs", data=b"{not json", content_type="application/json")
    assert resp.status_code == 400 and "not valid JSON" in resp.json["error"]
    resp = http.post("/api/v1/jobs", data=b"", content_type="application/json")
    assert resp.status_code == 400 and "JSON object" in resp.json["error"]
    resp = http.get("/api/v1/nope")
    assert resp.status_code == 404 and "error" in resp.json
    resp = http.delete("/api/v1/jobs")
    assert resp.status_code == 405 and "error" in resp.json
    resp = http.post("/api/v1/jobs", data=b"x" * (2 << 20), content_type="application/json")
    assert resp.status_code == 413 and "error" in resp.json


def test_unknown_job_is_404_everywhere(http):
    for method, path in [("get", ""), ("post", "/start"), ("post", "/stop"), ("get", "/rounds"), ("get", "/updates"),
                         ("get", "/model"), ("get", "/models"), ("get", "/models/" + "a" * 64), ("get", "/onnx"),
                         ("post", "/export"), ("get", "/metrics")]:
        resp = getattr(http, method)(f"/api/v1/jobs/job-missing{path}")
        assert resp.status_code == 404 and "unknown job" in resp.json["error"], path


def test_start_stop_and_state_conflicts(http, app, job):
    jid = job["id"]
    resp = http.post(f"/api/v1/jobs/{jid}/stop")
    assert resp.status_code == 409 and "not running" in resp.json["error"]
    resp = http.post(f"/api/v1/jobs/{jid}/start")
    assert resp.status_code == 200 and resp.json["status"] == "running"
    resp = http.post(f"/api/v1/jobs/{jid}/start")
    assert resp.status_code == 409 and "already running" in resp.json["error"]
    resp = http.post(f"/api/v1/jobs/{jid}/stop")
    assert resp.status_code == 200 and resp.json["status"] == "stopped"
    resp = http.post(f"/api/v1/jobs/{jid}/start", json={"force": True})
    assert resp.status_code == 400 and "force" in resp.json["error"]
    app.extensions["fedsight"].store.update_job(jid, status="finished")
    resp = http.post(f"/api/v1/jobs/{jid}/start")
    assert resp.status_code == 409 and "finished" in resp.json["error"]
    rounds = http.get(f"/api/v1/jobs/{jid}/rounds").json
    assert rounds["rounds"] == [] and rounds["compression_ratio_basis"].startswith("vs raw fp32")
    assert http.get(f"/api/v1/jobs/{jid}/updates").json == {"updates": []}
    resp = http.get(f"/api/v1/jobs/{jid}/updates?round=abc")
    assert resp.status_code == 400 and "round" in resp.json["error"]


def test_register_clients_token_only_hashed(http, app):
    secret = app.extensions["fedsight"].credentials.path("enroll-secret").read_text().strip()
    resp = app.test_client().post("/api/v1/clients", json={"name": "cam", "enroll_secret": secret})
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    cid, token = resp.json["client_id"], resp.json["token"]
    assert len(token) >= 32 and cid.startswith("c-") and len(bytes.fromhex(resp.json["device_key"])) == 32
    assert "mqtt_username" not in resp.json  # no broker accounts configured
    store = app.extensions["fedsight"].store
    assert store.get_client(cid, with_secret=True)["token_sha256"] == hash_token(token)
    listed = http.get("/api/v1/clients").json["clients"]
    assert listed == [{"id": cid, "name": "cam", "created_at": listed[0]["created_at"], "last_seen": None,
                       "online": False, "ready": False}]
    text = http.get("/api/v1/clients").get_data(as_text=True)
    assert token not in text and resp.json["device_key"] not in text
    assert http.post("/api/v1/clients", json={"name": "x", "role": "admin"}).status_code == 400
    assert http.post("/api/v1/clients").status_code == 201  # the operator enrolls without the secret
    app.extensions["fedsight"].engine.presence.update(cid, True)
    assert http.get(f"/api/v1/clients/{cid}").json["online"] is True


def test_model_download_auth_etag_range_304_and_downlink(http, anon, app, job, client_token):
    svc = app.extensions["fedsight"]
    jid, version = job["id"], job["current_version"]
    data = svc.models.get(version)
    url = f"/api/v1/jobs/{jid}/model"
    assert anon.get(url).status_code == 401
    resp = anon.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert resp.status_code == 401 and "unknown or revoked token" in resp.json["error"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {client_token[1]}"}
    enlist(app, jid, client_token[0], version)
    resp = anon.get(url, headers=auth)
    assert resp.status_code == 200 and resp.data == data
    assert resp.headers["X-Model-Version"] == version and resp.headers["ETag"] == f'"{version}"'
    assert hashlib.sha256(resp.data).hexdigest() == version
    resp = http.get(url, headers={**auth, "If-None-Match": f'"{version}"'})
    assert resp.status_code == 304 and resp.data == b""
    resp = http.get(url, headers={**auth, "Range": "bytes=100-"})
    assert resp.status_code == 206 and resp.data == data[100:]
    assert resp.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    resp = http.get(f"/api/v1/jobs/{jid}/models/{version}", headers={**auth, "Range": "bytes=0-9"})
    assert resp.status_code == 206 and resp.data == data[:10] and "immutable" in resp.headers["Cache-Control"]
    for bad in ("f" * 64, "../../fedsight.db", "ABC"):
        assert http.get(f"/api/v1/jobs/{jid}/models/{bad}", headers=auth).status_code == 404
    # a version of another job is not served under this job
    other = http.post("/api/v1/jobs", json={**JOB_BODY, "seed": 8}).json
    assert http.get(f"/api/v1/jobs/{jid}/models/{other['current_version']}", headers=auth).status_code == 404
    # downlink bytes are charged to the round that uses the version as its base
    svc.store.open_round(jid, 1, 1, version, {"name": "dense"}, ["x"])
    http.get(url, headers=auth)
    http.get(url, headers={**auth, "Range": "bytes=0-99"})
    http.get(url, headers={**auth, "If-None-Match": f'"{version}"'})
    assert svc.store.get_round(jid, 1, 1)["downlink_bytes"] == len(data) + 100


def test_onnx_export_failure_is_a_readable_500(http, app, job, monkeypatch):
    from coordinator.storage import exports as ex

    def boom(self, job, version):
        raise ex.ExportFailed("ONNX export failed: ExportError: no onnx today")

    monkeypatch.setattr(ex.OnnxExports, "export", boom)
    resp = http.post(f"/api/v1/jobs/{job['id']}/export")
    assert resp.status_code == 500 and "no onnx today" in resp.json["error"]
    resp = http.get(f"/api/v1/jobs/{job['id']}/onnx?version={'e' * 64}")
    assert resp.status_code == 404


def test_onnx_export_and_download(http, job):
    resp = http.post(f"/api/v1/jobs/{job['id']}/export")
    assert resp.status_code == 200, resp.json
    report = resp.json
    resp = http.get(f"/api/v1/jobs/{job['id']}/onnx")
    assert resp.status_code == 200 and hashlib.sha256(resp.data).hexdigest() == report["onnx_sha256"]
    assert resp.headers["X-Model-Version"] == job["current_version"]


def test_downlink_delta_patch(http, anon, app, job, client_token):
    from edge_sdk.protocol.modelfile import dump_model
    from edge_sdk.protocol.patch import apply_patch

    svc = app.extensions["fedsight"]
    jid, v0 = job["id"], job["current_version"]
    old = svc.models.get(v0)
    arrays, meta = load_model(old)
    name = next(k for k, a in arrays.items() if a.dtype.kind == "f")
    arrays[name].reshape(-1)[:5] += 1.0  # a sparse change, as after a top-k round
    new = dump_model(arrays, {**meta, "round": 1})
    v1 = svc.models.put(new)
    svc.store.add_model_version(jid, v1, 1, len(new))
    auth = {"Authorization": f"Bearer {client_token[1]}"}
    url = f"/api/v1/jobs/{jid}/models/{v1}/delta?from={v0}"
    assert anon.get(url).status_code == 401
    enlist(app, jid, client_token[0], v0)
    resp = http.get(url, headers=auth)
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == v1 and resp.headers["X-Patch-From"] == v0
    assert len(resp.data) < len(new) / 10
    assert apply_patch(old, resp.data) == new
    assert http.get(url, headers={**auth, "If-None-Match": resp.headers["ETag"]}).status_code == 304
    resp = http.get(f"/api/v1/jobs/{jid}/models/{v1}/delta?from={'d' * 64}", headers=auth)
    assert resp.status_code == 404 and "from" in resp.json["error"]
    assert http.get(f"/api/v1/jobs/{jid}/models/{v1}/delta", headers=auth).status_code == 404


def test_server_in_process_with_embedded_broker(tmp_path):
    """start() brings up broker + bridge + engine + HTTPS; presence flows over real mqtts; stop() is clean."""
    import json
    import threading
    import time

    import requests

    from coordinator.server import start
    from edge_sdk.protocol import topics
    from edge_sdk.transport import MqttTransport

    before = set(threading.enumerate())
    handle = start("127.0.0.1", 0, tmp_path, "embedded", broker_port=0, evaluate=False)
    try:
        api = f"{handle.url}/api/v1"
        ca = str(handle.ca_file)  # secure by default: a CA provisioned in <data_dir>/tls on first start
        assert handle.url.startswith("https://") and handle.broker_url.startswith("mqtts://")
        health = requests.get(f"{api}/health", timeout=5, verify=ca).json()
        assert health["status"] == "ok" and health["broker_url"] == handle.broker_url
        secret = handle.services.credentials.path("enroll-secret").read_text().strip()
        reg = requests.post(f"{api}/clients", json={"name": "dev", "enroll_secret": secret}, timeout=5,
                            verify=ca).json()
        as_device = {"Authorization": f"Bearer {reg['token']}"}
        acks: list[dict] = []
        got_ack = threading.Event()

        def on_message(topic: str, payload: bytes) -> None:
            acks.append(json.loads(payload))
            got_ack.set()

        assert reg["mqtt_username"] == reg["client_id"] and len(reg["mqtt_password"]) >= 32
        dev = MqttTransport(handle.broker_url, f"fedsight-{reg['client_id']}", on_message,
                            subscriptions=[topics.ack_topic(reg["client_id"])], username=reg["mqtt_username"],
                            password=reg["mqtt_password"], tls_ca=ca)
        dev.start()
        # a 12 MB message crosses the embedded broker to the bridge and is judged (it is not an update)
        assert dev.publish(topics.update_topic(reg["client_id"]), b"\x01" * (12 << 20), wait=30)
        assert got_ack.wait(30), "no ack for the 12 MB message"
        assert acks[0]["status"] == "rejected" and acks[0]["code"] == "malformed"
        dev.publish(topics.status_topic(reg["client_id"]), json.dumps({"state": "online", "jobs": None}),
                    retain=True, wait=5)
        deadline = time.time() + 5
        while not requests.get(f"{api}/clients/{reg['client_id']}", headers=as_device, timeout=5,
                               verify=ca).json()["online"]:
            assert time.time() < deadline, "presence never reached the coordinator"
            time.sleep(0.05)
        dev.stop()
    finally:
        handle.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{handle.url}/api/v1/health", timeout=2, verify=ca)
    time.sleep(0.2)
    leftover = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []


def _classes(root, names):
    from PIL import Image

    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / name / "0.png")
    return root


def test_photo_jobs_get_photo_defaults_and_carry_preprocessing_in_the_model(http):
    job = http.post("/api/v1/jobs", json={"name": "cams", "model": {"arch": "mobilenet_v3_small",
                                                                    "num_classes": 5}}).json
    cfg = job["config"]
    assert cfg["model"]["in_channels"] == 3 and cfg["model"]["image_size"] == 32 and cfg["input_scale"] == 255
    assert cfg["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert cfg["eval"] == {"dataset": None, "holdout_fraction": 0.1}  # devices score every version
    svc = http.application.extensions["fedsight"]
    meta = load_model(svc.models.get(job["current_version"]))[1]
    assert meta["input_scale"] == 255 and meta["class_names"] == ["0", "1", "2", "3", "4"]
    assert meta["normalization"] == cfg["normalization"] and meta["in_channels"] == 3
    digits = http.post("/api/v1/jobs", json={"model": {"arch": "small_cnn"}, "eval": {"dataset": "digits"}}).json
    assert digits["config"]["input_scale"] == 16 and digits["config"]["model"]["in_channels"] == 1
    assert digits["config"]["normalization"]["mean"] == [0.5] and digits["config"]["eval"]["holdout_fraction"] == 0


def test_eval_folder_names_the_classes_or_is_refused(http, tmp_path):
    folder = _classes(tmp_path / "holdout", ["cat", "dog", "fox"])
    body = {"model": {"arch": "small_cnn"}, "eval": {"dataset": "imagefolder", "path": str(folder)}}
    job = http.post("/api/v1/jobs", json=body).json
    assert job["config"]["class_names"] == ["cat", "dog", "fox"] and job["config"]["model"]["num_classes"] == 3
    assert job["config"]["eval"]["holdout_fraction"] == 0.0
    before = len(http.get("/api/v1/jobs").json["jobs"])
    for bad, fragment in [
        ({**body, "class_names": ["cat", "dog", "cow"]}, "has classes ['cat', 'dog', 'fox'] but the job's "
                                                         "class_names are ['cat', 'dog', 'cow']"),
        ({**body, "class_names": ["dog", "cat", "fox"]}, "same (sorted) order"),
        ({**body, "model": {"arch": "small_cnn", "num_classes": 5}}, "3 names for num_classes=5"),
        ({**body, "eval": {"dataset": "imagefolder", "path": str(tmp_path / "missing")}}, "is not a folder"),
        ({**body, "eval": {"dataset": "imagefolder"}}, "'eval.path' is required"),
        ({"model": {"arch": "small_cnn", "num_classes": 5}, "eval": {"dataset": "digits"}}, "10 digit classes"),
        ({**body, "eval": {"holdout_fraction": 0.9}}, "'eval.holdout_fraction' must be <= 0.5"),
        ({**body, "input_scale": 0}, "'input_scale' must be >="),
    ]:
        resp = http.post("/api/v1/jobs", json=bad)
        assert resp.status_code == 400 and fragment in resp.json["error"], resp.json
    assert len(http.get("/api/v1/jobs").json["jobs"]) == before  # nothing was created
