"""A real federation for fault scenarios: restartable Mosquitto, a coordinator process, N device processes.

Shared by ``tests/test_faults.py`` and ``benchmarks/faults.py``. Devices keep their cache directory (and so
their identity, residual and sent-journal) across restarts; everything started here is stopped by PID in
:meth:`Federation.close`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.support.fault_procs import CoordinatorProcess, RestartableMosquitto, TcpProxy, mount_tmpfs, unmount
from tests.support.processes import ROOT, child_env, cli, make_pki, stop_process

HOLD_FILE = "hold-commit"
STARTUP_S = 300.0  # device processes import torch; on a loaded 2-core machine six of them take minutes


def job_body(name: str, rounds: int, devices: int, min_clients: int = 3, timeout_s: float = 20.0,
             seed: int = 0, **extra: Any) -> dict[str, Any]:
    """small_cnn on digits, IID shards: any 3+ devices learn the same thing, so fault-free and faulty runs on
    the same seed end within a point of each other. Top-k with error feedback, so residuals matter.

    lr 0.03 x 4 epochs: in a 6-seed simulation (half of them losing 2 of 6 devices from round 2) final accuracy
    after 6 rounds spanned 98.6-99.2 % (0.56 points); lr 0.1 x 3 epochs spanned 1.4 points, too noisy to
    compare runs at a 1-point tolerance.

    The clip bound adapts once per round (``step: round``): the default per-update step clips by arrival order,
    which faults change on purpose, so two runs on the same seed would differ before any fault did anything."""
    return {"name": name, "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": rounds, "clients_per_round": devices, "min_clients": min_clients,
            "round_timeout_s": timeout_s, "train": {"epochs": 4, "batch_size": 16, "lr": 0.03},
            "codec": {"name": "topk", "density": 0.25, "values": "float32"}, "eval": {"dataset": "digits"},
            "limits": {"clip": {"mode": "adaptive", "step": "round"}}, "seed": seed, **extra}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


class Federation:
    def __init__(self, workdir: Path, devices: int = 6, persistence: bool = False, tmpfs_mb: int = 0) -> None:
        self.workdir = workdir
        self.n = devices
        self.devices: dict[int, subprocess.Popen] = {}
        self.broker: RestartableMosquitto | None = None
        self.coord: CoordinatorProcess | None = None  # type: ignore[assignment]
        self.proxy: TcpProxy | None = None
        self.data_dir = workdir / "coordinator-data"
        self.tmpfs = bool(tmpfs_mb) and mount_tmpfs(self.data_dir, tmpfs_mb)
        self.hold_file = workdir / HOLD_FILE
        try:
            self.tls = make_pki(workdir / "pki")
            self.broker = RestartableMosquitto(workdir / "broker", self.tls, persistence=persistence)
            self.coord = CoordinatorProcess(workdir, self.broker.url, self.tls, self.broker.admin, self.data_dir,
                                            env={"FEDSIGHT_FAULT_COMMIT_HOLD": str(self.hold_file)})
            self.http = self.coord.http
            self.proxy = TcpProxy(self.broker.port)  # the last device reaches the broker through it (partitions)
            for i in range(devices):
                self.start_device(i)
            self.ids = {i: self._client_id(i) for i in range(devices)}
            wait_until(lambda: self.online() >= devices, STARTUP_S, f"{devices} devices online")
        except BaseException:
            self.close()  # never leave a process behind, even when start-up fails
            raise

    # ------------------------------------------------------------------------------------------ processes
    def start_device(self, i: int) -> None:
        log = open(self.workdir / f"device-{i}.log", "ab")
        self.devices[i] = subprocess.Popen(
            cli("client", "--coordinator", self.coord.url, "--ca", str(self.tls.ca), "--enroll-secret-file",
                str(self.coord.enroll_secret_file), "--dataset", "digits", "--partition", "iid",
                "--num-partitions", str(self.n), "--partition-index", str(i),
                "--cache-dir", str(self.workdir / f"device-{i}"),
                *(["--broker", f"mqtts://127.0.0.1:{self.proxy.port}"] if i == self.n - 1 else [])),
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        log.close()

    def _client_id(self, i: int) -> str:
        creds = self.workdir / f"device-{i}" / "credentials.json"
        wait_until(creds.exists, STARTUP_S, f"device {i} registered")
        return str(json.loads(creds.read_text())["client_id"])

    def index_of(self, client_id: str) -> int:
        return next(i for i, c in self.ids.items() if c == client_id)

    def kill_device(self, i: int) -> None:
        proc = self.devices[i]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def device_log(self, i: int) -> str:
        return (self.workdir / f"device-{i}.log").read_text(errors="replace")

    def restart_coordinator(self, down_s: float = 1.0) -> None:
        self.coord.kill()
        time.sleep(down_s)
        self.coord.start()

    def close(self) -> None:
        self.hold_file.unlink(missing_ok=True)
        for proc in self.devices.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a SIGSTOPped device cannot handle SIGTERM
                except ProcessLookupError:
                    pass
            stop_process(proc)
        if self.coord is not None:
            self.coord.stop()
        if self.proxy is not None:
            self.proxy.close()
        if self.broker is not None:
            self.broker.close()
        if self.tmpfs:
            unmount(self.data_dir)

    # ------------------------------------------------------------------------------------------------ REST
    def get(self, path: str) -> Any:
        return self.http.get(f"{self.coord.api}{path}", timeout=10).json()

    def online(self) -> int:
        try:
            return sum(1 for c in self.get("/clients")["clients"] if c.get("ready"))
        except (requests.RequestException, ValueError):
            return 0

    def create_job(self, body: dict[str, Any]) -> str:
        job = self.http.post(f"{self.coord.api}/jobs", json=body, timeout=180).json()  # builds the initial model
        self.http.post(f"{self.coord.api}/jobs/{job['id']}/start", timeout=60).raise_for_status()
        return str(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}")

    def rounds(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/jobs/{job_id}/rounds")["rounds"]

    def updates(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/jobs/{job_id}/updates?limit=100000")["updates"]

    def open_round(self, job_id: str, round_: int, min_accepted: int = 0, timeout: float = 120,
                   later_ok: bool = False) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            try:
                rnd = self.job(job_id).get("open_round")
            except (requests.RequestException, ValueError):
                return None
            if rnd and rnd["round"] == round_ and rnd["accepted"] >= min_accepted:
                return rnd
            # Rounds of this small model last about a second; on a quiet machine round_ can open and close
            # between two polls. A later open round is just as much "mid-round" for the fault to hit.
            return rnd if rnd and rnd["round"] > round_ and rnd["accepted"] >= min_accepted and later_ok else None
        return wait_until(ready, timeout, f"round {round_} open with {min_accepted} accepted", poll=0.05)

    def wait_finished(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            try:
                job = self.job(job_id)
            except (requests.RequestException, ValueError):
                return None
            return job if job["status"] in ("finished", "failed", "stopped") else None
        return wait_until(done, timeout, f"job {job_id} to finish", poll=0.5)

    def summary(self, job_id: str) -> dict[str, Any]:
        """Rounds lost (attempts that did not commit), final accuracy, and double-count check."""
        rounds = self.rounds(job_id)
        closed = [r for r in rounds if r["status"] == "closed"]
        accepted: dict[tuple[int, int, str], int] = {}
        for u in self.updates(job_id):
            if u["status"] == "accepted":
                key = (u["round"], u["attempt"], u["client_id"])
                accepted[key] = accepted.get(key, 0) + 1
        return {"rounds_lost": sum(1 for r in rounds if r["status"] != "closed"),
                "rounds_closed": len(closed),
                "final_accuracy": (closed[-1].get("eval") or {}).get("accuracy") if closed else None,
                "max_accepts_per_client_round": max(accepted.values(), default=0),
                "participants_match": all(len(r["participants"]) == r["accepted"] for r in closed)}
