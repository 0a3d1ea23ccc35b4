"""Real processes for integration tests: a Mosquitto broker, the coordinator server, simulated devices.

All of them speak TLS only (mqtts, HTTPS) with certificates from one private test CA (``make_pki``), as a
real deployment does; ``coordinator.http`` is a session that verifies against that CA.
"""
from __future__ import annotations

import getpass
import os
import signal
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from coordinator.security.certs import ServerTls, ensure_server_cert
from edge_sdk.tls import PinnedSession

if TYPE_CHECKING:
    from coordinator.mqtt.dynsec import DynsecAccounts

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_MAX_PACKET_SIZE = (64 << 20) + 64 * 1024  # default job max_update_bytes + MQTT framing


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


DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib")


def dynsec_plugin() -> str:
    for d in PLUGIN_DIRS:
        if os.path.exists(os.path.join(d, DYNSEC_PLUGIN)):
            return os.path.join(d, DYNSEC_PLUGIN)
    raise RuntimeError(f"{DYNSEC_PLUGIN} not found (it ships with Debian's mosquitto package)")


def make_pki(directory: Path) -> ServerTls:
    """A private CA and a server certificate for localhost / 127.0.0.1, as `fedsight certs` makes them."""
    return ensure_server_cert(directory)


class Mosquitto:
    """A private Mosquitto broker with one TLS listener (mqtts) on a free loopback port and a generated config.

    Secure like a production setup: TLS only, anonymous clients are refused and identities/ACLs live in the
    dynamic-security plugin, initialised with an admin identity (``admin``) the coordinator manages it with.
    ``tester`` is an extra identity allowed everything outside ``fedsight/`` (for transport tests).
    """

    def __init__(self, workdir: Path, tls: ServerTls, max_packet_size: int = MOSQUITTO_MAX_PACKET_SIZE) -> None:
        self.port = free_port()
        self.ca = tls.ca
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.admin = ("fedsight-admin", secrets.token_urlsafe(16))
        dynsec = workdir / "dynamic-security.json"
        subprocess.run([shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl", "dynsec", "init", str(dynsec),
                        *self.admin], check=True, capture_output=True)
        self.config = workdir / "mosquitto.conf"
        # Started as root, Mosquitto switches to user 'mosquitto' before it reads the 0600 key: stay root here
        # (a deployment chowns the key to that user instead, docs/security.md).
        self.config.write_text(
            f"user {getpass.getuser()}\n"  # root would otherwise switch to 'mosquitto', who cannot read the
            # 0600 key nor save dynsec (a deployment chowns both to that user instead, docs/security.md)
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\ntls_version tlsv1.2\n"
            "allow_anonymous false\n"
            f"plugin {dynsec_plugin()}\n"
            f"plugin_opt_config_file {dynsec}\n"
            "persistence false\n"
            "max_queued_messages 10000\n"
            f"max_packet_size {max_packet_size}\n"  # as docs/mqtt.md tells deployments: the job limit + framing
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self.config.chmod(0o644)
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)
        self.tester = ("tester", secrets.token_urlsafe(16))
        try:
            accounts = self.accounts()
        except BaseException:
            self.stop()
            raise
        try:
            accounts.command(
                {"command": "createRole", "rolename": "tester", "acls": [
                    {"acltype": kind, "topic": topic, "allow": True}
                    for kind in ("publishClientSend", "subscribePattern", "publishClientReceive")
                    for topic in ("t/#", "dev/#")]},
                {"command": "createClient", "username": self.tester[0], "password": self.tester[1],
                 "roles": [{"rolename": "tester"}]})
        finally:
            accounts.stop()

    def accounts(self) -> "DynsecAccounts":
        """A started admin connection (stop() it)."""
        from coordinator.mqtt.dynsec import DynsecAccounts

        return DynsecAccounts(self.url, *self.admin, tls_ca=self.ca).start()

    @property
    def login(self) -> dict[str, str]:
        """``username=``/``password=`` of the tester identity, for MqttTransport."""
        return {"username": self.tester[0], "password": self.tester[1]}

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


def ctrl_c_reaches_child() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: a shell that starts pytest in the background
    (no job control) ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *args]


class Coordinator:
    """``fedsight coordinator`` as a real process with a real HTTPS server (certificate from ``tls``)."""

    def __init__(self, workdir: Path, broker_url: str, tls: ServerTls,
                 broker_admin: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.ca = tls.ca
        self.http = PinnedSession(str(tls.ca))  # verifies against the test CA; the operator's once healthy
        self.data_dir = workdir / "coordinator-data"
        self.log_path = workdir / "coordinator.log"
        self.log = open(self.log_path, "wb")
        env = child_env()
        admin: tuple[str, ...] = ()
        if broker_admin is not None:  # the password travels in the environment, never on the command line
            admin = ("--broker-admin", broker_admin[0])
            env["FEDSIGHT_BROKER_ADMIN_PASSWORD"] = broker_admin[1]
        self.proc = subprocess.Popen(
            cli("coordinator", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--broker", broker_url, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
                "--tls-ca", str(tls.ca), *admin),
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
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
        # written 0600 by the coordinator on first start, as an operator on this machine would find them
        self.token = (self.data_dir / "operator-token").read_text().strip()
        self.enroll_secret_file = self.data_dir / "enroll-secret"
        self.enroll_secret = self.enroll_secret_file.read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def stop(self) -> None:
        self.http.close()
        stop_process(self.proc)
        self.log.close()


@dataclass(frozen=True)
class CoordinatorAddress:
    """What a device process needs of a coordinator started some other way (URL, enrollment secret, CA)."""

    url: str
    enroll_secret_file: Path
    ca: Path | None = None


def start_device(workdir: Path, coordinator: Coordinator | CoordinatorAddress, index: int, partitions: int,
                 alpha: str = "0.5", extra: tuple[str, ...] = (), ca: Path | None = None) -> subprocess.Popen:
    """One simulated device process on its Dirichlet shard of digits, enrolling with the fleet secret and
    verifying TLS with ``ca`` (default: the coordinator's CA file)."""
    ca = ca if ca is not None else coordinator.ca
    log = open(workdir / f"device-{index}.log", "wb")
    return subprocess.Popen(
        cli("client", "--coordinator", coordinator.url, "--dataset", "digits", "--partition", f"dirichlet:{alpha}",
            "--num-partitions", str(partitions), "--partition-index", str(index),
            "--enroll-secret-file", str(coordinator.enroll_secret_file),
            "--cache-dir", str(workdir / f"device-{index}"), *(("--ca", str(ca)) if ca else ()), *extra),
        stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)


def start_devices_online(workdir: Path, coordinator: Coordinator, count: int, timeout: float = 90.0,
                         extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """``count`` device processes on their shards, returned once the coordinator lists all of them online."""
    procs = [start_device(workdir, coordinator, i, count, extra=extra) for i in range(count)]
    deadline = time.monotonic() + timeout
    while sum(c.get("online", False) for c in coordinator.http.get(f"{coordinator.api}/clients", timeout=5).json()
              ["clients"]) < count:
        if time.monotonic() > deadline:
            for p in procs:
                stop_process(p)
            raise TimeoutError(f"devices did not come online: {[p.poll() for p in procs]}")
        time.sleep(0.5)
    return procs


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
