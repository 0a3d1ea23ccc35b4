"""LiveModel: verified hot swaps of the job's ONNX model while threads keep classifying frames."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from coordinator.server import CoordinatorHandle, start
from edge_sdk.inference import OnnxClassifier
from edge_sdk.live_model import LiveModel, NoModelYet
from edge_sdk.protocol.modelfile import dump_model, load_model

JOB = {"name": "live", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
       "rounds": 5, "clients_per_round": 1, "min_clients": 1, "eval": None, "seed": 0}
FRAMES = np.random.default_rng(3).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


def operator(handle: CoordinatorHandle) -> dict[str, str]:
    """LiveModel downloads ONNX exports, which are operator-only (docs/security.md)."""
    return {"Authorization": f"Bearer {operator_token(handle)}"}


def operator_token(handle: CoordinatorHandle) -> str:
    return handle.services.credentials.path("operator-token").read_text().strip()


def new_version(handle: CoordinatorHandle, job_id: str, round_: int) -> str:
    """What a closed round does to the store: a new global version (weights moved a lot, so outputs differ)."""
    svc = handle.services
    job = svc.store.get_job(job_id)
    arrays, meta = load_model(svc.models.get(job["current_version"]))
    rng = np.random.default_rng(round_)
    moved = {k: (v + rng.normal(0, 0.5, v.shape).astype(v.dtype)) if v.dtype.kind == "f" and "running" not in k
             else v for k, v in arrays.items()}
    data = dump_model(moved, {**meta, "round": round_})
    version = svc.models.put(data)
    svc.store.add_model_version(job_id, version, round_, len(data))
    svc.store.update_job(job_id, current_round=round_, current_version=version)
    return version


def expected_probs(handle: CoordinatorHandle, job_id: str, version: str) -> np.ndarray:
    onnx = requests.get(f"{handle.url}/api/v1/jobs/{job_id}/onnx", params={"version": version}, timeout=120,
                        verify=str(handle.ca_file),
                        headers=operator(handle))
    assert onnx.ok, onnx.text
    return np.stack([p.probs for p in OnnxClassifier(onnx.content).predict(list(FRAMES))])


def test_swaps_under_concurrent_inference_and_keeps_the_old_model_on_bad_downloads(
        server: CoordinatorHandle, tmp_path: Path) -> None:
    job_id = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=120,
                           verify=str(server.ca_file), headers=operator(server)).json()["id"]
    live = LiveModel(server.url, job_id, token=operator_token(server), poll_s=0, cache_dir=tmp_path / "live",
                     ca_file=server.ca_file)
    with pytest.raises(NoModelYet):
        live.predict(FRAMES)
    live.start()
    assert live.wait_ready(120), live.last_error
    versions = [live.version]
    expected = {versions[0]: expected_probs(server, job_id, versions[0])}

    results: list[list[str]] = [[] for _ in range(3)]
    calls = [0, 0, 0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def classify(i: int) -> None:
        try:
            while not stop.is_set():
                calls[i] += 1
                result = live.predict(list(FRAMES))
                probs = np.stack([p.probs for p in result.predictions])
                assert len(result.predictions) == len(FRAMES)  # none dropped
                matches = [v for v, ref in list(expected.items()) if np.allclose(probs, ref, atol=1e-5)]
                assert matches == [result.version], (result.version[:12], [m[:12] for m in matches])
                results[i].append(result.version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=classify, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in (1, 2):
            version = new_version(server, job_id, round_)
            expected[version] = expected_probs(server, job_id, version)  # known before it can go live
            live.on_event(job_id, {"type": "model_updated", "job_id": job_id, "round": round_, "version": version,
                                   "model_path": f"/api/v1/jobs/{job_id}/models/{version}"})
            versions.append(version)
            deadline = threading.Event()
            for _ in range(600):
                if live.version == version:
                    break
                deadline.wait(0.1)
            assert live.version == version, live.last_error
            while len(results[0]) < 3 + 10 * round_:  # keep classifying on each version for a while
                deadline.wait(0.01)

        # A corrupted download: the served file no longer matches the export report's sha256.
        bad = new_version(server, job_id, 3)
        report = requests.get(f"{server.url}/api/v1/jobs/{job_id}/onnx/report", params={"version": bad},
                              timeout=120, headers=operator(server), verify=str(server.ca_file)).json()
        assert "path" not in report and report["version"] == bad and report["parity"]["passed"] is True
        onnx_file = server.services.exports.out_dir(job_id) / f"{bad}.onnx"
        good = onnx_file.read_bytes()
        raw = bytearray(good)
        raw[len(raw) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(raw))
        assert live.update(bad) is False and "corrupt" in (live.last_error or "")
        assert live.version == versions[-1]
        # An export whose parity check did not pass is refused too.
        report_file = onnx_file.with_name(f"{bad}.onnx.json")
        stored = json.loads(report_file.read_text())
        onnx_file.write_bytes(good)
        stored["parity"]["passed"] = False
        report_file.write_text(json.dumps(stored))
        assert live.update(bad) is False and "parity" in (live.last_error or "")
        assert live.update() is False and live.version == versions[-1]  # polling finds the same bad current one
        before = len(results[0])
        while len(results[0]) < before + 5:
            stop.wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        live.stop()
    assert not errors, errors[0]
    order = {v: i for i, v in enumerate(versions)}
    for seen in results:
        assert seen and sum(seen.count(v) for v in versions) == len(seen)
        assert [order[v] for v in seen] == sorted(order[v] for v in seen)  # never back to an older version
        assert {versions[0], versions[-1]} <= set(seen)
    assert all(len(r) == c for r, c in zip(results, calls))  # every call returned a result
    assert live.swaps == 3 and live.failures == 3

    # A restarted device classifies at once with the last good version, before the coordinator answers.
    again = LiveModel("http://127.0.0.9:9", job_id, poll_s=0, cache_dir=tmp_path / "live")
    assert again.version == versions[-1]
    np.testing.assert_allclose(np.stack([p.probs for p in again.predict(list(FRAMES)).predictions]),
                               expected[versions[-1]], atol=1e-5)
    cached = tmp_path / "live" / f"{job_id}.onnx"
    cached.write_bytes(cached.read_bytes()[:-10])
    assert LiveModel("http://127.0.0.9:9", job_id, poll_s=0, cache_dir=tmp_path / "live").version is None


def test_camera_app_example_follows_versions_without_torch(server: CoordinatorHandle, tmp_path: Path) -> None:
    from PIL import Image

    from tests.support.processes import ROOT, child_env, ctrl_c_reaches_child

    job_id = requests.post(f"{server.url}/api/v1/jobs", json=JOB, timeout=120,
                           verify=str(server.ca_file), headers=operator(server)).json()["id"]
    first = server.services.store.get_job(job_id)["current_version"]
    for i, frame in enumerate(FRAMES):
        (tmp_path / "frames").mkdir(exist_ok=True)
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i}.png")
    app = [str(tmp_path / "frames"), "--coordinator", server.url, "--ca", str(server.ca_file), "--job", job_id,
           "--poll", "0.5", "--loop",
           "--fps", "20", "--max-frames", "240", "--cache-dir", str(tmp_path / "cache"),
           "--token", operator_token(server)]
    no_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['camera_app.py', *sys.argv[1:]]; "
                "runpy.run_path('examples/camera_app.py', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", no_torch, *app], cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_reaches_child)
    lines: list[str] = []
    second = None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if second is None and f"model {first[:12]} (round 0) is live" in line:
            second = new_version(server, job_id, 1)
    assert proc.wait(60) == 0, "".join(lines[-30:])
    out = "".join(lines)
    assert second is not None and f"model {second[:12]} (round 1) is live" in out, out[-3000:]
    frames = [ln for ln in lines if " frame " in ln or ": frame " in ln]
    assert len(frames) == 240 and all(f"[model {first[:12]}]" in ln or f"[model {second[:12]}]" in ln
                                      for ln in frames)


def test_camera_app_that_trains_swaps_on_job_events(server: CoordinatorHandle, tmp_path: Path) -> None:
    """--train: the app's own EdgeClient trains round 1, and its model_updated event (not polling) swaps."""
    import signal

    from PIL import Image

    from tests.support.processes import ROOT, child_env, ctrl_c_reaches_child

    for i, frame in enumerate(FRAMES):
        folder = tmp_path / "frames" / str(i % 3)  # sub-folder = label, as in imagefolder
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(folder / f"{i}.png")
    body = {**JOB, "rounds": 1, "round_timeout_s": 60, "train": {"epochs": 1, "batch_size": 4}}
    job_id = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=120,
                           verify=str(server.ca_file), headers=operator(server)).json()["id"]
    assert requests.post(f"{server.url}/api/v1/jobs/{job_id}/start", timeout=60,
                         verify=str(server.ca_file), headers=operator(server)).ok
    secret = server.services.credentials.path("enroll-secret").read_text().strip()
    proc = subprocess.Popen([sys.executable, "examples/camera_app.py", str(tmp_path / "frames"), "--train",
                             "--coordinator", server.url, "--ca", str(server.ca_file), "--job", job_id,
                             "--poll", "1000", "--loop", "--fps", "20",
                             "--cache-dir", str(tmp_path / "cache"), "--token", operator_token(server)], cwd=ROOT,
                            env={**child_env(), "FEDSIGHT_ENROLL_SECRET": secret}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_reaches_child)
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "(round 1) is live" in line:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    out = "".join(lines)
    final = server.services.store.get_job(job_id)
    assert final["status"] == "finished" and final["current_round"] == 1, out[-3000:]
    assert f"model {final['current_version'][:12]} (round 1) is live" in out, out[-3000:]
    # version 0 was live first (swapped from, not from "none"), and this app's own client trained round 1
    first = min(server.services.store.list_model_versions(job_id), key=lambda v: v["round"])["version"]
    assert re.search(r"live model [0-9a-f]{12} -> [0-9a-f]{12} \(round 1\)", out), out[-3000:]
    assert f"live model {first[:12]} -> " in out, out[-3000:]
    assert re.search(r"round 1 attempt \d+: \d+ samples", out), out[-3000:]
