"""Real processes for integration tests: a Mosquitto broker, the coordinator server, simulated devices.

All of them speak TLS only (mqtts, HTTPS) with certificates from one private test CA (``make_pki``), as a
real deployment does; ``coordinator.http`` is a session that verifies against that CA.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from coordinator.security.certs import ServerTls, ensure_server_cert
from edge_sdk.tls import PinnedSession

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not found:
        raise RuntimeError("Mosquitto is not installed: run `bash tests/run.sh` (it apt-get installs it)")
    return found


def make_pki(directory: Path) -> ServerTls:
    """A private CA and a server certificate for localhost / 127.0.0.1, as `fedsight certs` makes them."""
    return ensure_server_cert(directory)


class Mosquitto:
    """A private Mosquitto broker with one TLS listener (mqtts) on a free loopback port and a generated config."""

    def __init__(self, workdir: Path, tls: ServerTls) -> None:
        self.port = free_port()
        self.ca = tls.ca
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.config = workdir / "mosquitto.conf"
        # Started as root, Mosquitto switches to user 'mosquitto' before it reads the 0600 key: stay root here
        # (a deployment chowns the key to that user instead, docs/security.md).
        self.config.write_text(
            ("user root\n" if os.geteuid() == 0 else "")
            + f"listener {self.port} 127.0.0.1\n"
            f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\ntls_version tlsv1.2\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 10000\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self.config.chmod(0o644)
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *args]


class Coordinator:
    """``fedsight coordinator`` as a real process with a real HTTPS server (certificate from ``tls``)."""

    def __init__(self, workdir: Path, broker_url: str, tls: ServerTls) -> None:
        self.port = free_port()
        self.ca = tls.ca
        self.http = PinnedSession(str(tls.ca))
        self.data_dir = workdir / "coordinator-data"
        self.log_path = workdir / "coordinator.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cli("coordinator", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--broker", broker_url, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
                "--tls-ca", str(tls.ca)),
            stdout=self.log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        self.url = f"https://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api/v1"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.http.get(f"{self.api}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator not healthy:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self.http.close()
        self.log.close()


def start_device(workdir: Path, coordinator_url: str, index: int, partitions: int, alpha: str = "0.5",
                 extra: tuple[str, ...] = (), ca: Path | None = None) -> subprocess.Popen:
    """One simulated device process on its Dirichlet shard of digits (``ca``: the coordinator's CA file)."""
    log = open(workdir / f"device-{index}.log", "wb")
    return subprocess.Popen(
        cli("client", "--coordinator", coordinator_url, "--dataset", "digits", "--partition", f"dirichlet:{alpha}",
            "--num-partitions", str(partitions), "--partition-index", str(index),
            "--cache-dir", str(workdir / f"device-{index}"), *(("--ca", str(ca)) if ca else ()), *extra),
        stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
