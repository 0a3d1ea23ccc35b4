"""A local FedSight deployment driven only through the ``fedsight`` CLI (used by ``deployment.py``).

Mosquitto, ``fedsight coordinator`` and N ``fedsight client`` processes on loopback; jobs are created, started,
watched, exported and scored with ``fedsight job create/status``, ``fedsight export`` and ``fedsight infer``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("cli_cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def fedsight(*args: str, timeout: float = 600) -> str:
    """Run one ``fedsight`` command and return its stdout (raises with stderr on failure)."""
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"fedsight {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


class Cluster:
    """Broker + coordinator + ``devices`` clients on Dirichlet(``alpha``) shards of ``train_dir``."""

    def __init__(self, work: Path, train_dir: Path, devices: int, alpha: float) -> None:
        self.work, self.train_dir, self.devices, self.alpha = work, train_dir, devices, alpha
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        logf = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Cluster:
        self.work.mkdir(parents=True, exist_ok=True)
        mport, hport = _free_port(), _free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(f"listener {mport} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 10000\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._spawn("mosquitto", [mosquitto, "-c", str(conf)])
        cli = [sys.executable, "-m", "coordinator.cli"]
        self._spawn("coordinator", [*cli, "coordinator", "--port", str(hport), "--data-dir",
                                    str(self.work / "coord"), "--broker", f"mqtt://127.0.0.1:{mport}"])
        self.url = f"http://127.0.0.1:{hport}"
        self._wait(lambda: requests.get(f"{self.url}/api/v1/health", timeout=2).ok, 60, "coordinator")
        for i in range(self.devices):
            self._spawn(f"client-{i}", [*cli, "client", "--coordinator", self.url, "--dataset",
                                        f"imagefolder:{self.train_dir}", "--partition", f"dirichlet:{self.alpha}",
                                        "--num-partitions", str(self.devices), "--partition-index", str(i),
                                        "--seed", "0", "--image-size", "32", "--channels", "3", "--threads", "1",
                                        "--cache-dir", str(self.work / f"client-{i}")])

        def ready() -> bool:
            clients = requests.get(f"{self.url}/api/v1/clients", timeout=5).json()["clients"]
            return sum(c["ready"] for c in clients) >= self.devices
        self._wait(ready, 300, "devices")
        return self

    def _wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited while waiting for {what}; see logs in {self.work}")
            try:
                if check():
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{what} not ready after {timeout}s; see logs in {self.work}")

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def train_export_infer(self, create_flags: list[str], test_dir: Path, onnx_out: Path) -> dict[str, Any]:
        """job create --start, poll job status until done, export, infer over ``test_dir``: one result row."""
        t0 = time.monotonic()
        job_id = fedsight("job", "create", "--coordinator", self.url, *create_flags, "--start").strip()
        while True:
            time.sleep(15)  # each poll is a CLI process start: keep them rare on a busy machine
            status = json.loads(fedsight("job", "status", job_id, "--coordinator", self.url, "--json"))
            state = status["job"]["status"]
            if state in ("finished", "failed", "stopped"):
                break
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited during job {job_id}; see logs in {self.work}")
        train_s = time.monotonic() - t0
        if state != "finished":
            raise RuntimeError(f"job {job_id} ended {state}: {status['job'].get('error')}")
        fedsight("export", "--job", job_id, "--out", str(onnx_out), "--coordinator", self.url)
        preds = json.loads(fedsight("infer", str(onnx_out), str(test_dir), "--json", "--top", "1"))
        correct = sum(Path(p["image"]).parent.name == p["name"] for p in preds)
        rounds = status["rounds"]
        return {"job_id": job_id, "onnx_accuracy": correct / len(preds), "test_images": len(preds),
                "uplink_bytes": int(sum(r.get("uplink_bytes") or 0 for r in rounds)),
                "downlink_bytes": int(sum(r.get("downlink_bytes") or 0 for r in rounds)),
                "rounds_closed": sum(r.get("status") == "closed" for r in rounds), "seconds": train_s,
                "onnx_bytes": onnx_out.stat().st_size}
