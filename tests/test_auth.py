"""Secure by default: operator token on every operator endpoint, device tokens scoped to the device,
enrollment secret + rate limit on registration, coordinator-assigned ids, revocation, confined weight paths,
0600 secret files and rotation. Every denial is asserted by status and readable message."""
from __future__ import annotations

import stat

import pytest
import torch

from coordinator.api.app import create_app
from coordinator.auth.credentials import Credentials
from coordinator.auth.rate_limit import RateLimiter
from coordinator.cli import main as cli

JOB_BODY = {"name": "t", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": 1, "clients_per_round": 1, "min_clients": 1, "eval": None}
V = "ab" * 32

# Every operator endpoint (method, path); {job} and {client} are filled in. Devices may use none of them.
OPERATOR_ENDPOINTS = [
    ("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/{job}"), ("POST", "/jobs/{job}/start"),
    ("POST", "/jobs/{job}/stop"), ("GET", "/jobs/{job}/rounds"), ("GET", "/jobs/{job}/updates"),
    ("GET", "/jobs/{job}/metrics"), ("GET", "/jobs/{job}/models"), ("GET", "/jobs/{job}/onnx"),
    ("POST", "/jobs/{job}/export"), ("GET", "/clients"), ("DELETE", "/clients/{client}"),
]
DEVICE_ENDPOINTS = [("GET", "/clients/{client}"), ("GET", "/clients/{client}/updates"), ("GET", "/jobs/{job}/model"),
                    ("GET", "/jobs/{job}/models/{version}"), ("GET", "/jobs/{job}/models/{version}/delta?from={version}"),
                    ("POST", "/clients/{client}/broker-credentials"), ("GET", "/jobs/{job}/preprocessing")]


class Fleet:
    def __init__(self, app):
        self.app = app
        self.svc = app.extensions["fedsight"]
        self.token = self.svc.credentials.path("operator-token").read_text().strip()
        self.secret = self.svc.credentials.path("enroll-secret").read_text().strip()
        self.http = app.test_client()

    def call(self, method: str, path: str, token: str | None = None, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.open(f"/api/v1{path}", method=method, headers=headers, **kw)

    def op(self, method: str, path: str, **kw):
        return self.call(method, path, self.token, **kw)

    def enroll(self, name: str = "dev", **kw) -> dict:
        resp = self.call("POST", "/clients", json={"name": name, "enroll_secret": self.secret, **kw})
        assert resp.status_code == 201, resp.json
        return resp.json


@pytest.fixture
def fleet(tmp_path):
    app = create_app({"data_dir": tmp_path / "data", "evaluate": False})
    yield Fleet(app)
    app.extensions["fedsight"].close()


@pytest.fixture
def job(fleet):
    resp = fleet.op("POST", "/jobs", json=JOB_BODY)
    assert resp.status_code == 201, resp.json
    return resp.json


def fill(path: str, job: dict, client: str) -> str:
    return path.format(job=job["id"], client=client, version=job["current_version"])


def test_secret_files_are_0600_and_only_hashes_are_stored(fleet, tmp_path):
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("master.key", "operator-token", "enroll-secret"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    raw = (data / "fedsight.db").read_bytes() + b"".join(p.read_bytes() for p in data.glob("fedsight.db-*"))
    assert fleet.token.encode() not in raw and fleet.secret.encode() not in raw


def test_no_or_wrong_operator_token_is_401_on_every_operator_endpoint(fleet, job):
    dev = fleet.enroll()
    for method, path in OPERATOR_ENDPOINTS:
        url = fill(path, job, dev["client_id"])
        resp = fleet.call(method, url, json={} if method == "POST" else None)
        assert resp.status_code == 401 and "authentication required" in resp.json["error"], (method, path)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = fleet.call(method, url, "fso_wrong", json={} if method == "POST" else None)
        assert resp.status_code == 401 and "unknown or revoked token" in resp.json["error"], (method, path)
        resp = fleet.call(method, url, dev["token"], json={} if method == "POST" else None)
        assert resp.status_code == 403 and "operator token" in resp.json["error"], (method, path)
    for method, path in DEVICE_ENDPOINTS:  # without any token, device endpoints are closed too
        assert fleet.call(method, fill(path, job, dev["client_id"])).status_code == 401, path
    assert fleet.op("GET", "/jobs").status_code == 200  # and the operator gets in
    assert fleet.call("GET", "/health").status_code == 200  # health stays public


def test_device_reads_only_its_own_records_and_jobs_that_selected_it(fleet, job):
    a, b = fleet.enroll("a"), fleet.enroll("b")
    assert fleet.call("GET", f"/clients/{a['client_id']}", a["token"]).json["id"] == a["client_id"]
    assert fleet.call("GET", f"/clients/{a['client_id']}/updates", a["token"]).json == {"updates": []}
    for path in (f"/clients/{b['client_id']}", f"/clients/{b['client_id']}/updates"):
        resp = fleet.call("GET", path, a["token"])
        assert resp.status_code == 403 and "only its own" in resp.json["error"]
    model = f"/jobs/{job['id']}/models/{job['current_version']}"
    resp = fleet.call("GET", model, a["token"])
    assert resp.status_code == 403 and "not taking part" in resp.json["error"]
    fleet.svc.store.open_round(job["id"], 1, 1, job["current_version"], {"name": "dense"}, [a["client_id"]])
    assert fleet.call("GET", model, a["token"]).status_code == 200  # selected: may fetch the job's models
    assert fleet.call("GET", f"/jobs/{job['id']}/model", a["token"]).status_code == 200
    assert fleet.call("GET", model, b["token"]).status_code == 403  # b was not selected


def test_registration_needs_the_secret_and_ids_are_assigned(fleet):
    for body, status, fragment in [({"name": "x"}, 403, "enrollment secret"),
                                   ({"name": "x", "enroll_secret": "fse_guess"}, 403, "enrollment secret"),
                                   ({"name": "x", "enroll_secret": 7}, 403, "enrollment secret"),
                                   ({"enroll_secret": fleet.secret, "client_id": "coordinator"}, 400, "assigns"),
                                   ({"enroll_secret": fleet.secret, "client_id": "cam-2"}, 400, "assigns")]:
        resp = fleet.call("POST", "/clients", json=body)
        assert resp.status_code == status and fragment in resp.json["error"], body
    assert fleet.svc.store.list_clients() == []  # nothing was created by the refusals
    # the operator cannot pick ids either
    assert fleet.op("POST", "/clients", json={"client_id": "coordinator"}).status_code == 400
    ids = {fleet.enroll()["client_id"] for _ in range(5)}
    assert len(ids) == 5 and all(i.startswith("c-") and len(i) == 14 for i in ids)


def test_registration_is_rate_limited_per_address(fleet):
    fleet.svc.enroll_limiter = RateLimiter(3, 0.01)
    for _ in range(3):
        fleet.enroll()
    resp = fleet.call("POST", "/clients", json={"enroll_secret": fleet.secret})
    assert resp.status_code == 429 and "too many registrations" in resp.json["error"]
    assert int(resp.headers["Retry-After"]) >= 1
    # guessing the secret costs the same tokens: brute force is throttled too
    assert fleet.call("POST", "/clients", json={"enroll_secret": "guess"}).status_code == 429
    other = fleet.http.post("/api/v1/clients", json={"enroll_secret": fleet.secret},
                            environ_base={"REMOTE_ADDR": "127.0.0.9"})
    assert other.status_code == 201  # another address has its own bucket
    assert fleet.op("POST", "/clients", json={}).status_code == 201  # the operator is not throttled
    assert len(fleet.svc.store.list_clients()) == 5


def test_rate_limiter_refills():
    now = [0.0]
    limiter = RateLimiter(2, 1.0, clock=lambda: now[0])
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0
    assert limiter.acquire("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.acquire("a") == 0 and limiter.acquire("a") > 0


def test_revoked_device_loses_rest_mqtt_key_and_selection(fleet, job):
    calls = []

    class Accounts:
        def add_device(self, client_id: str, password: str) -> None:
            calls.append(("add", client_id, password))

        def remove_device(self, client_id: str) -> None:
            calls.append(("remove", client_id))

    fleet.svc.broker_accounts = Accounts()
    dev = fleet.enroll()
    cid = dev["client_id"]
    assert dev["mqtt_username"] == cid and len(dev["mqtt_password"]) >= 24  # connects as MQTT id fedsight-<cid>
    assert calls == [("add", cid, dev["mqtt_password"])]
    fleet.svc.engine.presence.update(cid, True)
    assert fleet.svc.engine.eligible_clients(job["id"]) == [cid]
    assert fleet.svc.engine._key_of(cid) is not None
    resp = fleet.op("DELETE", f"/clients/{cid}")
    assert resp.status_code == 200 and resp.json == {"id": cid, "revoked": True}
    assert calls[-1] == ("remove", cid)
    assert fleet.call("GET", f"/clients/{cid}", dev["token"]).status_code == 401
    assert fleet.svc.engine.eligible_clients(job["id"]) == []
    assert fleet.svc.engine._key_of(cid) is None  # its updates are now unknown_client
    assert fleet.op("DELETE", f"/clients/{cid}").status_code == 404
    assert cid not in [c["id"] for c in fleet.op("GET", "/clients").json["clients"]]


def test_failed_broker_account_undoes_the_registration(fleet):
    class Broken:
        def add_device(self, client_id: str, password: str) -> None:
            raise RuntimeError("broker unreachable")

        def remove_device(self, client_id: str) -> None:
            return None

    fleet.svc.broker_accounts = Broken()
    resp = fleet.call("POST", "/clients", json={"enroll_secret": fleet.secret})
    assert resp.status_code == 503 and "broker unreachable" in resp.json["error"]
    assert fleet.svc.store.list_clients() == []


def test_weights_path_is_confined_to_the_weights_dir(fleet, tmp_path):
    from edge_sdk.models import build_model

    inside = tmp_path / "weights"
    inside.mkdir()
    torch.save(build_model("small_cnn", 10, in_channels=1).state_dict(), inside / "cnn.pt")
    outside = tmp_path / "secret.pt"
    outside.write_bytes((inside / "cnn.pt").read_bytes())
    (inside / "link.pt").symlink_to(outside)

    def create(weights: str):
        return fleet.op("POST", "/jobs", json={**JOB_BODY, "model": {**JOB_BODY["model"], "weights": weights}})

    resp = create(str(inside / "cnn.pt"))  # no --weights-dir: server paths are off
    assert resp.status_code == 400 and "--weights-dir" in resp.json["error"]
    fleet.svc.weights_dir = inside
    assert create("cnn.pt").status_code == 201
    assert create(str(inside / "cnn.pt")).status_code == 201
    for probe in (str(outside), "../secret.pt", "link.pt", "/etc/passwd", "/nonexistent/x.pt"):
        resp = create(probe)
        assert resp.status_code == 400 and "must name a file inside" in resp.json["error"], probe
    resp = create("missing.pt")
    assert resp.status_code == 400 and "no file" in resp.json["error"]


def test_rotation_takes_effect_at_once(fleet, tmp_path, capsys):
    data = tmp_path / "data"
    old_token, old_secret = fleet.token, fleet.secret
    assert cli.main(["auth", "rotate", "operator-token", "--data-dir", str(data)]) == 0
    assert "operator-token" in capsys.readouterr().out
    new_token = (data / "operator-token").read_text().strip()
    assert new_token != old_token and stat.S_IMODE((data / "operator-token").stat().st_mode) == 0o600
    assert fleet.call("GET", "/jobs", old_token).status_code == 401  # the running app sees it at once
    assert fleet.call("GET", "/jobs", new_token).status_code == 200
    assert cli.main(["auth", "rotate", "enroll-secret", "--data-dir", str(data)]) == 0
    assert fleet.call("POST", "/clients", json={"enroll_secret": old_secret}).status_code == 403
    new_secret = (data / "enroll-secret").read_text().strip()
    assert fleet.call("POST", "/clients", json={"enroll_secret": new_secret}).status_code == 201
    assert cli.main(["auth", "rotate", "operator-token", "--data-dir", str(tmp_path / "nowhere")]) == 2


def test_device_keys_are_derived_and_survive_restart(tmp_path):
    from coordinator.storage.store import Store

    store = Store(tmp_path / "fedsight.db")
    first = Credentials(tmp_path, store)
    again = Credentials(tmp_path, store)  # a restart: same files, same keys, same tokens
    assert first.device_key("c-1") == again.device_key("c-1") != first.device_key("c-2")
    assert len(first.device_key("c-1")) == 32
    other = tmp_path / "other"
    assert Credentials(other, Store(other / "fedsight.db")).device_key("c-1") != first.device_key("c-1")
    store.close()
