"""Processes that fault tests stop, kill and restart: a Mosquitto that can restart on the same port with the
same config (persistence on or off), and a coordinator process that can be SIGKILLed and started again on
the same port and data directory. Every process is started and stopped by PID, never by name."""
from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from coordinator.security.certs import ServerTls
from edge_sdk.tls import PinnedSession
from tests.support.processes import (ROOT, child_env, cli, dynsec_plugin, free_port, mosquitto_binary, stop_process,
                                     wait_for_port)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt


class RestartableMosquitto:
    """Mosquitto on a fixed loopback port; ``restart(down_s)`` stops it (SIGTERM, so a persistent broker saves
    its state) and starts it again on the same port and config. Secured like the suite's other broker: a TLS
    listener only, no anonymous clients, identities and ACLs in the dynamic-security plugin, whose file keeps
    them across restarts whether message persistence is on or off."""

    def __init__(self, workdir: Path, tls: ServerTls, persistence: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.tls = tls
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.admin = ("fedsight-admin", secrets.token_urlsafe(16))
        self.dynsec = workdir / "dynamic-security.json"
        subprocess.run([shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl", "dynsec", "init",
                        str(self.dynsec), *self.admin], check=True, capture_output=True)
        self.persistence = persistence
        self.config = workdir / "mosquitto.conf"
        self.write_config(persistence)
        self.proc: subprocess.Popen | None = None
        self._log = open(workdir / "mosquitto.log", "ab")
        self.start()
        self.observer = ("fault-observer", secrets.token_urlsafe(16))
        self._add_observer()

    def _add_observer(self) -> None:
        """A test identity that may read and re-send device tasks (to replay a task at a restarted device),
        kept in the dynamic-security file, so it survives restarts like every other identity."""
        from coordinator.mqtt.dynsec import DynsecAccounts

        admin = DynsecAccounts(self.url, *self.admin, tls_ca=self.tls.ca).start()
        try:
            admin.command(
                {"command": "createRole", "rolename": "fault-observer", "acls": [
                    {"acltype": kind, "topic": "fedsight/v1/clients/+/task", "allow": True}
                    for kind in ("publishClientSend", "subscribePattern", "publishClientReceive")]},
                {"command": "createClient", "username": self.observer[0], "password": self.observer[1],
                 "roles": [{"rolename": "fault-observer"}]})
        finally:
            admin.stop()

    def observer_client(self, client_id: str) -> "mqtt.Client":
        """A connected paho client (TLS, observer login); loop started; caller stops and disconnects it."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        client.tls_set(ca_certs=str(self.tls.ca))
        client.username_pw_set(*self.observer)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        return client

    def write_config(self, persistence: bool) -> None:
        self.persistence = persistence
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", f"cafile {self.tls.ca}",
                 f"certfile {self.tls.cert}", f"keyfile {self.tls.key}", "tls_version tlsv1.2",
                 "allow_anonymous false", f"plugin {dynsec_plugin()}", f"plugin_opt_config_file {self.dynsec}",
                 "max_queued_messages 10000", "log_dest stderr", "log_type error", "log_type warning",
                 "log_type notice"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        else:
            lines += ["persistence false"]
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o644)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def restart(self, down_s: float = 3.0) -> float:
        """Stop, wait ``down_s``, start again; returns the monotonic time at which it listens again."""
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic()

    def close(self) -> None:
        self.stop()
        self._log.close()


class CoordinatorProcess:
    """``fedsight coordinator`` on a fixed port and data dir; ``kill()`` is SIGKILL, ``start()`` restarts it."""

    def __init__(self, workdir: Path, broker_url: str, tls: ServerTls, broker_admin: tuple[str, str],
                 data_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.data_dir = data_dir or workdir / "coordinator-data"
        self.broker_url = broker_url
        self.tls = tls
        self.ca = tls.ca
        self.broker_admin = broker_admin
        self.url = f"https://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api/v1"
        self.log_path = workdir / "coordinator.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(  # the admin password travels in the environment, never on the command line
            cli("coordinator", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--broker", self.broker_url, "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key),
                "--tls-ca", str(self.tls.ca), "--broker-admin", self.broker_admin[0]),
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**child_env(), "FEDSIGHT_BROKER_ADMIN_PASSWORD": self.broker_admin[1], **self.extra_env,
                 **(env or {})})
        log.close()
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited early:\n{self.log_text()[-3000:]}")
            try:
                if requests.get(f"{self.api}/health", timeout=1, verify=str(self.ca)).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator not healthy:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    @property
    def token(self) -> str:
        return (self.data_dir / "operator-token").read_text().strip()

    @property
    def enroll_secret_file(self) -> Path:
        return self.data_dir / "enroll-secret"

    @property
    def http(self) -> requests.Session:
        """A session pinned to the test CA that carries the operator token."""
        session = PinnedSession(self.ca)
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def mount_tmpfs(path: Path, size_mb: int) -> bool:
    """A small tmpfs at ``path`` (a real ENOSPC when full); False where mounting is not allowed (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                         capture_output=True, timeout=30)
    return res.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_disk(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until the filesystem refuses (ENOSPC/EFBIG); returns it (delete it to free space)."""
    filler = directory / "filler.bin"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
        for size in (4096, 512, 1):  # fill the last partial blocks too
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                continue
    return filler


class TcpProxy:
    """A loopback TCP forwarder in front of the broker for one device: ``cut(seconds)`` drops its connections
    and refuses new ones for that long, i.e. the device loses the broker while everything else keeps it."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self._socket_mod, self._threading = socket, threading
        self.target_port = target_port
        self.port = free_port()
        self._conns: list = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = None
        self._listen()

    def _listen(self) -> None:
        sock = self._socket_mod.socket()
        sock.setsockopt(self._socket_mod.SOL_SOCKET, self._socket_mod.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self._listener = sock
        self._threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener) -> None:  # noqa: ANN001
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket_mod.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:  # noqa: ANN001
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(self._socket_mod.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self, seconds: float) -> None:
        """Partition: close the listener and every connection, wait, then listen again on the same port."""
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
        time.sleep(seconds)
        self._listen()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
