"""A local FedSight deployment driven only through the ``fedsight`` CLI (used by ``deployment.py``).

Mosquitto (TLS, dynamic security), ``fedsight coordinator`` (HTTPS) and N enrolled ``fedsight client`` processes
on loopback; jobs are created, started,
watched, exported and scored with ``fedsight job create/status``, ``fedsight export`` and ``fedsight infer``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.processes import Coordinator, Mosquitto, make_pki  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("cli_cluster")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def fedsight(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run one ``fedsight`` command and return its stdout (raises with stderr on failure)."""
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**_env(), **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"fedsight {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


class Cluster:
    """Broker + coordinator + ``devices`` clients on Dirichlet(``alpha``) shards of ``train_dir``.

    The secure defaults, as an operator runs them: Mosquitto with TLS and dynamic security (one broker
    identity per device), the coordinator over HTTPS, devices enrolled with the fleet secret, and the CLI
    authenticated with the operator token (``FEDSIGHT_TOKEN_FILE``, ``FEDSIGHT_CA``)."""

    def __init__(self, work: Path, train_dir: Path, devices: int, alpha: float) -> None:
        self.work, self.train_dir, self.devices, self.alpha = work, train_dir, devices, alpha
        self.procs: list[subprocess.Popen] = []
        self.url = ""
        self.cli_env: dict[str, str] = {}
        self._broker: Mosquitto | None = None
        self._coordinator: Coordinator | None = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        logf = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Cluster:
        self.work.mkdir(parents=True, exist_ok=True)
        pki = make_pki(self.work / "pki")
        self._broker = Mosquitto(self.work / "broker", pki)
        self._coordinator = Coordinator(self.work, self._broker.url, pki, self._broker.admin)
        self.procs.append(self._coordinator.proc)
        self.url = self._coordinator.url
        self.cli_env = {"FEDSIGHT_TOKEN_FILE": str(self._coordinator.data_dir / "operator-token"),
                        "FEDSIGHT_CA": str(pki.ca)}
        cli = [sys.executable, "-m", "coordinator.cli"]
        for i in range(self.devices):
            self._spawn(f"client-{i}", [*cli, "client", "--coordinator", self.url, "--ca", str(pki.ca),
                                        "--enroll-secret-file", str(self._coordinator.enroll_secret_file),
                                        "--dataset", f"imagefolder:{self.train_dir}",
                                        "--partition", f"dirichlet:{self.alpha}",
                                        "--num-partitions", str(self.devices), "--partition-index", str(i),
                                        "--seed", "0", "--image-size", "32", "--channels", "3", "--threads", "1",
                                        "--cache-dir", str(self.work / f"client-{i}")])

        def ready() -> bool:
            clients = self._coordinator.http.get(f"{self.url}/api/v1/clients", timeout=5).json()["clients"]
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
        if self._coordinator is not None:
            self._coordinator.stop()
        if self._broker is not None:
            self._broker.stop()

    def train_export_infer(self, create_flags: list[str], test_dir: Path, onnx_out: Path) -> dict[str, Any]:
        """job create --start, poll job status until done, export, infer over ``test_dir``: one result row."""
        t0 = time.monotonic()
        job_id = fedsight("job", "create", "--coordinator", self.url, *create_flags, "--start", env=self.cli_env).strip()
        while True:
            time.sleep(15)  # each poll is a CLI process start: keep them rare on a busy machine
            status = json.loads(fedsight("job", "status", job_id, "--coordinator", self.url, "--json", env=self.cli_env))
            state = status["job"]["status"]
            if state in ("finished", "failed", "stopped"):
                break
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited during job {job_id}; see logs in {self.work}")
        train_s = time.monotonic() - t0
        if state != "finished":
            raise RuntimeError(f"job {job_id} ended {state}: {status['job'].get('error')}")
        fedsight("export", "--job", job_id, "--out", str(onnx_out), "--coordinator", self.url, env=self.cli_env)
        preds = json.loads(fedsight("infer", str(onnx_out), str(test_dir), "--json", "--top", "1"))
        correct = sum(Path(p["image"]).parent.name == p["name"] for p in preds)
        rounds = status["rounds"]
        return {"job_id": job_id, "onnx_accuracy": correct / len(preds), "test_images": len(preds),
                "uplink_bytes": int(sum(r.get("uplink_bytes") or 0 for r in rounds)),
                "downlink_bytes": int(sum(r.get("downlink_bytes") or 0 for r in rounds)),
                "rounds_closed": sum(r.get("status") == "closed" for r in rounds), "seconds": train_s,
                "onnx_bytes": onnx_out.stat().st_size}
