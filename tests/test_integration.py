"""End to end over real parts, all over TLS: Mosquitto (mqtts), the coordinator's HTTPS server, device
processes that pin the deployment's CA, onnxruntime.

One module-scoped federation (broker + coordinator + 4 device processes) runs a dense job with a rogue
device that sends every kind of bad update in its first round, then a top-k job; both must reach 90 %
digits accuracy, and every rejection must come back to the sender with its reason.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.modelfile import flatten, layout_sizes, load_model
from edge_sdk.protocol.wire import UpdateHeader, encode_update
from edge_sdk.tls import PinnedSession
from edge_sdk.transport import MqttTransport
from tests.support.processes import Coordinator, Mosquitto, start_devices_online, stop_process

pytestmark = pytest.mark.integration

DEVICES = 4
MAX_UPDATE = 1 << 20


def job_body(name: str, codec: dict, rounds: int, clients: int, min_clients: int) -> dict:
    return {"name": name, "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": rounds, "clients_per_round": clients, "min_clients": min_clients, "round_timeout_s": 90,
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.05}, "codec": codec, "eval": {"dataset": "digits"},
            "seed": 0, "max_update_bytes": MAX_UPDATE}


def wait_finished(http: requests.Session, api: str, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"{api}/jobs/{job_id}", timeout=5).json()
        if job["status"] in ("finished", "failed", "stopped"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s: {job}")


class Rogue:
    """A registered device that, in its first task, sends one of every kind of bad update.

    It holds two stolen-looking identities (its own and a victim's), each on its own broker connection: the
    broker ACLs confine every connection to its own topics, so the rogue can only lie inside the messages.
    """

    def __init__(self, api: str, broker_url: str, enroll_secret: str, ca: Path) -> None:
        self.http = http = PinnedSession(ca)  # its own: it serves tasks from a thread of its own

        def enroll(name: str) -> dict:
            resp = http.post(f"{api}/clients", json={"name": name, "enroll_secret": enroll_secret}, timeout=5)
            assert resp.status_code == 201, resp.text
            return resp.json()

        creds = enroll("rogue")
        self.id, self.token, self.api = creds["client_id"], creds["token"], api
        victim = enroll("victim")
        self.victim_id = victim["client_id"]
        self.acks: queue.Queue = queue.Queue()
        self.tasks: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.keys = {c["client_id"]: bytes.fromhex(c["device_key"]) for c in (creds, victim)}
        self.transports = {
            c["client_id"]: MqttTransport(broker_url, f"fedsight-{c['client_id']}", self.on_message,
                                          subscriptions=[topics.task_topic(c["client_id"]),
                                                         topics.ack_topic(c["client_id"])],
                                          username=c["mqtt_username"], password=c["mqtt_password"], tls_ca=ca)
            for c in (creds, victim)}
        for cid, transport in self.transports.items():  # both identities online, so both are selected
            transport.start()
            transport.publish(topics.status_topic(cid), json.dumps({"state": "online"}), retain=True, wait=5)

    def on_message(self, topic: str, payload: bytes) -> None:
        cid, kind = topics.parse_client_topic(topic)
        (self.tasks if kind == topics.TASK else self.acks).put((cid, json.loads(payload)))

    def send(self, message: bytes, client_id: str | None = None) -> None:
        cid = client_id or self.id
        assert self.transports[cid].publish(topics.update_topic(cid), message, wait=10)

    def first_tasks(self) -> dict[str, dict]:
        got: dict[str, dict] = {}
        while len(got) < len(self.keys):
            cid, task = self.tasks.get(timeout=60)
            got[cid] = task
        return got

    def answer(self, task: dict, sabotage: bool, as_client: str | None = None) -> dict[str, str]:
        """Send the bad variants (when ``sabotage``), then one good update and its duplicate."""
        me = as_client or self.id
        model = self.http.get(f"{self.api}/jobs/{task['job_id']}/models/{task['base_version']}",
                             headers={"Authorization": f"Bearer {self.token}"}, timeout=10).content
        arrays, _ = load_model(model)
        numel, sizes = flatten(arrays).size, layout_sizes(arrays)
        spec = task["config"]["codec"]
        zero = np.zeros(numel, np.float32)
        good_payload, _ = codecs.encode(spec, zero, sizes)

        def msg(payload: bytes = good_payload, key: bytes | None = None, codec: dict = spec, **kw: object) -> bytes:
            fields = dict(job_id=task["job_id"], round=task["round"], client_id=me,
                          base_version=task["base_version"], codec_digest=codec_digest(codec), num_samples=1,
                          numel=numel,
                          metrics={}, attempt=task["attempt"])
            fields.update(kw)
            signer = key or self.keys.get(str(fields["client_id"]), b"g" * 32)  # 'ghost' is unknown anyway
            return encode_update(UpdateHeader(**fields), payload, signer)  # type: ignore[arg-type]

        expected: dict[str, str] = {}
        if sabotage:
            dense = {"name": "dense", "dtype": "float32"}
            noise = np.random.default_rng(0).standard_normal(numel).astype(np.float32) * 1e-3
            nan, _ = codecs.encode(dense, noise, sizes)  # incompressible, so values sit raw after 10 bytes
            nan = nan[:10] + np.float32(np.nan).tobytes() + nan[14:]
            variants = {
                "garbage": b"this is not an update",
                "truncated": msg()[:-7],
                "oversize": msg(payload=b"\x00" * (MAX_UPDATE + 10)),
                "nan": msg(payload=nan, codec=dense) if spec["name"] == "dense" else None,
                "wrong_round": msg(round=task["round"] + 5),
                "old_base": msg(base_version="0" * 64),
                "wrong_numel": msg(numel=numel + 1),
                "wrong_codec": msg(codec={"name": "dense", "dtype": "float16"}),
                "bad_mac": msg(key=b"not my device key, just a guess!"),
                # my update relabelled as the victim's: the MAC was made with my key
                "relabelled": msg(client_id=self.victim_id, key=self.keys[self.id]),
                # the victim's genuine (signed) update, copied onto my topic
                "id_mismatch": msg(client_id=self.victim_id),
            }
            for name, message in variants.items():
                if message is not None:
                    self.send(message)
                    expected[name] = self.acks.get(timeout=15)[1]["reason"]
            self.send(msg(client_id="ghost"))  # an unregistered id in the header (the ACL bars ghost's topic)
            expected["unknown_client"] = self.acks.get(timeout=15)[1]["reason"]
        self.send(msg(), client_id=me)
        expected["good"] = self.acks.get(timeout=15)[1]["status"]
        if sabotage:
            self.send(msg())  # the accepted bytes again, as an eavesdropper would replay them
            expected["replayed"] = self.acks.get(timeout=15)[1]["reason"]
            self.send(msg(metrics={"loss": 1.0}))  # a second, different update for the same round
            expected["duplicate"] = self.acks.get(timeout=15)[1]["reason"]
        return expected

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                cid, task = self.tasks.get(timeout=0.5)
            except queue.Empty:
                continue
            self.answer(task, sabotage=False, as_client=cid)

    def stop(self) -> None:
        self.stopped.set()
        for cid, transport in self.transports.items():
            transport.publish(topics.status_topic(cid), json.dumps({"state": "offline"}), retain=True, wait=5)
            transport.stop()
        self.http.close()


@pytest.fixture(scope="module")
def federation(coordinator: Coordinator, mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Coordinator, Mosquitto, Path]]:
    workdir = tmp_path_factory.mktemp("devices")
    procs = start_devices_online(workdir, coordinator, DEVICES, timeout=90)
    yield coordinator, mosquitto, workdir
    for p in procs:
        stop_process(p)


def test_dense_job_with_rogue_device(federation: tuple[Coordinator, Mosquitto, Path]) -> None:
    coordinator, mosquitto, _ = federation
    api, http = coordinator.api, coordinator.http
    rogue = Rogue(api, mosquitto.url, coordinator.enroll_secret, mosquitto.ca)
    try:
        job = http.post(f"{api}/jobs", json=job_body("dense", {"name": "dense", "dtype": "float32"},
                                                         rounds=6, clients=DEVICES + 2, min_clients=DEVICES),
                        timeout=60).json()  # the first job imports torch in the coordinator: slow on a busy host
        assert http.post(f"{api}/jobs/{job['id']}/start", timeout=10).ok
        first = rogue.first_tasks()
        # The victim identity answers last, so round 1 is still open while the rogue misbehaves.
        reasons = rogue.answer(first[rogue.id], sabotage=True)
        assert rogue.answer(first[rogue.victim_id], sabotage=False, as_client=rogue.victim_id)["good"] == "accepted"
        helper = threading.Thread(target=rogue.serve, daemon=True)  # later rounds: honest zero updates
        helper.start()
        finished = wait_finished(http, api, job["id"], timeout=300)
    finally:
        rogue.stop()
    assert finished["status"] == "finished"
    assert reasons.pop("good") == "accepted"
    expect = {"garbage": "malformed", "truncated": "truncated", "oversize": "oversize", "nan": "non_finite",
              "wrong_round": "stale_round", "old_base": "old_base_version", "wrong_numel": "wrong_numel",
              "wrong_codec": "wrong_codec", "bad_mac": "bad_mac", "relabelled": "bad_mac",
              "id_mismatch": "client_mismatch", "unknown_client": "unknown_client", "replayed": "replayed",
              "duplicate": "duplicate"}
    for name, needle in expect.items():
        assert reasons[name].startswith(needle + ":"), (name, reasons[name])

    rounds = http.get(f"{api}/jobs/{job['id']}/rounds", timeout=5).json()["rounds"]
    closed = [r for r in rounds if r["status"] == "closed"]
    assert [r["round"] for r in closed] == list(range(1, 7))
    # unauthenticated junk (garbage, truncated, oversize, bad MACs, id_mismatch, unknown_client, replays) is
    # counted on the round, not stored; the authenticated rejections are stored (wrong_round names another round)
    junk = {"garbage", "truncated", "oversize", "bad_mac", "relabelled", "id_mismatch", "unknown_client", "replayed"}
    assert closed[0]["junk"] >= len(junk) - 1 and closed[0]["junk_bytes"] > 0
    assert closed[0]["rejected"] >= len(expect) - len(junk) - 2 and closed[0]["accepted"] >= DEVICES
    assert all(r["uplink_bytes"] > 0 for r in closed)
    assert closed[0]["rejected_bytes"] > 0 and closed[0]["uplink_bytes"] < closed[0]["junk_bytes"]  # oversize apart
    assert closed[-1]["eval"]["accuracy"] >= 0.90
    updates = http.get(f"{api}/jobs/{job['id']}/updates", timeout=5).json()["updates"]
    assert sum(u["status"] == "rejected" for u in updates) >= len(expect) - len(junk) - 1
    assert all(u["reason"] and u["reason"].split(":")[0] not in {"malformed", "truncated", "oversize", "bad_mac",
               "client_mismatch", "unknown_client", "replayed"} for u in updates if u["status"] == "rejected")

    # The exported ONNX model runs in onnxruntime and matches the PyTorch accuracy.
    onnx_bytes = http.get(f"{api}/jobs/{job['id']}/onnx", timeout=120).content
    from edge_sdk.data import load_digits_split
    from edge_sdk.inference import OnnxClassifier
    _, test = load_digits_split()
    x, y = (t.numpy() for t in test.tensors)
    clf = OnnxClassifier(onnx_bytes)
    preds = np.array([p.label for p in clf.predict_tensor(x.astype(np.float32))])
    assert (preds == y).mean() >= 0.90


def test_topk_job_reaches_target(federation: tuple[Coordinator, Mosquitto, Path]) -> None:
    coordinator, _, _ = federation
    api, http = coordinator.api, coordinator.http
    codec = {"name": "topk", "density": 0.1, "values": "int8", "error_feedback": True}
    job = http.post(f"{api}/jobs", json=job_body("topk", codec, rounds=10, clients=DEVICES,
                                                 min_clients=DEVICES - 1), timeout=60).json()
    assert http.post(f"{api}/jobs/{job['id']}/start", timeout=10).ok
    assert wait_finished(http, api, job["id"], timeout=400)["status"] == "finished"
    rounds = [r for r in http.get(f"{api}/jobs/{job['id']}/rounds", timeout=5).json()["rounds"]
              if r["status"] == "closed"]
    assert rounds[-1]["eval"]["accuracy"] >= 0.90
    assert all(r["compression_ratio"] >= 10 for r in rounds)


def test_bad_rest_input_is_rejected_readably(coordinator: Coordinator) -> None:
    api, http = coordinator.api, coordinator.http
    r = http.post(f"{api}/jobs", data="{not json", headers={"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400 and "json" in r.json()["error"].lower()
    body = job_body("bad", {"name": "dense", "dtype": "float32"}, 1, 1, 1)
    body["model"]["arch"] = "alexnet9000"
    r = http.post(f"{api}/jobs", json=body, timeout=5)
    assert r.status_code == 400 and "alexnet9000" in r.json()["error"]
    r = http.post(f"{api}/jobs", json={**body, "rounds": -1}, timeout=5)
    assert r.status_code == 400 and "rounds" in r.json()["error"]
    assert http.get(f"{api}/jobs/nope", timeout=5).status_code == 404
    assert http.get(f"{api}/health", timeout=5).json()["status"] == "ok"
