"""TLS everywhere it travels: `fedsight certs`, HTTPS and mqtts refusing what they must, secure defaults."""
from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509

from coordinator.cli import main as cli
from coordinator.mqtt.broker import EmbeddedBroker
from coordinator.security import certs
from coordinator.server import CoordinatorHandle, start
from edge_sdk.protocol import topics
from edge_sdk.tls import PinnedSession
from edge_sdk.transport import MqttTransport
from tests.support.processes import ROOT, child_env, cli as cli_command, free_port, make_pki, stop_process


def ip_and_dns(path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
            set(san.get_values_for_type(x509.DNSName)))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------ fedsight certs
def test_certs_command_writes_ca_server_cert_with_sans_and_private_keys(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert cli.main(["certs", "--out", str(out), "--san", "coord.example.com", "--san", "192.0.2.10"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "ca.pem") in printed and "coord.example.com" in printed
    ips, names = ip_and_dns(out / "server.pem")
    assert ips == {"127.0.0.1", "192.0.2.10"} and names == {"localhost", "coord.example.com"}
    assert mode(out / "ca-key.pem") == 0o600 and mode(out / "server-key.pem") == 0o600
    assert mode(out / "ca.pem") == 0o644 and mode(out / "server.pem") == 0o644
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    # A second certificate (e.g. for Mosquitto) comes from the same CA: devices keep one ca.pem.
    ca_before = (out / "ca.pem").read_bytes()
    assert cli.main(["certs", "--out", str(out), "--name", "mosquitto", "--san", "broker.lan"]) == 0
    assert (out / "ca.pem").read_bytes() == ca_before
    x509.load_pem_x509_certificate((out / "mosquitto.pem").read_bytes()).verify_directly_issued_by(ca)
    assert ip_and_dns(out / "mosquitto.pem")[1] == {"localhost", "broker.lan"}
    assert mode(out / "mosquitto-key.pem") == 0o600


def test_certs_command_rejects_a_bad_name_and_writes_nothing(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "--out", str(tmp_path / "tls"), "--san", "not a host"]) == 2
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err
    assert cli.main(["certs", "--out", str(tmp_path / "tls"), "--name", "ca"]) == 2  # would overwrite the CA
    assert "not 'ca'" in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()  # refused before anything was written


def test_server_cert_is_reissued_for_a_new_name_by_the_same_ca(tmp_path: Path) -> None:
    first = certs.ensure_server_cert(tmp_path, ["a.lan"])
    pem = first.cert.read_bytes()
    assert certs.ensure_server_cert(tmp_path, ["a.lan"]).cert.read_bytes() == pem  # kept as is
    again = certs.ensure_server_cert(tmp_path, ["b.lan"])
    assert again.cert.read_bytes() != pem
    assert ip_and_dns(again.cert)[1] == {"localhost", "a.lan", "b.lan"}  # nothing dropped
    ca = x509.load_pem_x509_certificate(first.ca.read_bytes())  # type: ignore[union-attr]
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(ca)


# ------------------------------------------------------------------------ HTTPS and embedded mqtts
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    """A coordinator started with no TLS options at all: it must serve HTTPS and mqtts on its own."""
    handle = start("127.0.0.1", 0, tmp_path_factory.mktemp("coord"), "embedded", broker_port=0, evaluate=False)
    yield handle
    handle.stop()


def enroll(url: str, data_dir: Path, ca: Path) -> dict[str, str]:
    """Register a device with the fleet secret (TLS adds to auth: the broker still refuses anonymous clients)."""
    secret = (data_dir / "enroll-secret").read_text().strip()
    with PinnedSession(ca) as http:
        resp = http.post(f"{url}/api/v1/clients", json={"name": "tls-test", "enroll_secret": secret}, timeout=5)
    assert resp.status_code == 201, resp.text
    return resp.json()


def device_transport(broker_url: str, reg: dict[str, str], ca: Path) -> MqttTransport:
    return MqttTransport(broker_url, topics.device_mqtt_id(reg["client_id"]), lambda *_: None,
                         username=reg["mqtt_username"], password=reg["mqtt_password"], tls_ca=ca)


def test_secure_by_default_serves_https_with_its_own_ca(server: CoordinatorHandle) -> None:
    assert server.url.startswith("https://") and server.broker_url.startswith("mqtts://")
    assert server.ca_file == server.services.data_dir / "tls" / "ca.pem"
    assert mode(server.services.data_dir / "tls" / "server-key.pem") == 0o600
    with PinnedSession(server.ca_file) as http:
        assert http.get(f"{server.url}/api/v1/health", timeout=5).json()["broker_url"] == server.broker_url


def test_https_with_the_wrong_ca_fails(server: CoordinatorHandle, tmp_path: Path) -> None:
    foreign = make_pki(tmp_path)
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{server.url}/api/v1/health", timeout=5, verify=str(foreign.ca))
    with PinnedSession(foreign.ca) as http, pytest.raises(requests.exceptions.SSLError):
        http.get(f"{server.url}/api/v1/health", timeout=5)


def test_cli_with_the_wrong_ca_is_a_readable_error(server: CoordinatorHandle, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIGHT_TOKEN", server.services.credentials.path("operator-token").read_text().strip())
    foreign = make_pki(tmp_path)
    assert cli.main(["job", "list", "--coordinator", server.url, "--ca", str(foreign.ca)]) == 2
    err = capsys.readouterr().err
    assert "TLS verification of the coordinator" in err and "--ca" in err
    assert cli.main(["job", "list", "--coordinator", server.url, "--ca", str(server.ca_file)]) == 0
    assert "no jobs" in capsys.readouterr().out


def test_silent_connections_do_not_stall_https(server: CoordinatorHandle) -> None:
    """Clients that connect and never start TLS must not hold up others (handshakes run on worker threads)."""
    import socket

    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert requests.get(f"{server.url}/api/v1/health", timeout=20, verify=str(server.ca_file)).ok
        assert time.monotonic() - started < 5  # was the 30 s socket timeout per silent client
    finally:
        for s in silent:
            s.close()


def test_plain_http_to_the_https_port_fails(server: CoordinatorHandle) -> None:
    plain = server.url.replace("https://", "http://")
    with pytest.raises(requests.ConnectionError):  # the handshake fails and the server drops the connection
        requests.get(f"{plain}/api/v1/health", timeout=5)


def test_embedded_broker_refuses_plain_mqtt_and_foreign_cas(server: CoordinatorHandle, tmp_path: Path) -> None:
    port = server.broker_url.rsplit(":", 1)[1]
    with pytest.raises(ConnectionError, match="did not accept"):
        MqttTransport(f"mqtt://127.0.0.1:{port}", "t-plain", lambda *_: None).start(timeout=3)
    with pytest.raises(ConnectionError, match="TLS handshake"):
        MqttTransport(server.broker_url, "t-foreign", lambda *_: None, tls_ca=make_pki(tmp_path).ca).start(timeout=5)
    ok = device_transport(server.broker_url, enroll(server.url, server.services.data_dir, server.ca_file),
                          server.ca_file)
    ok.start(timeout=10)
    ok.stop()


def test_broker_hostname_is_checked(tmp_path: Path) -> None:
    """A certificate from the right CA but for another name is refused: hostname checking is on."""
    ca_key, ca_cert, _ = certs.ensure_ca(tmp_path)
    key, cert = certs.issue_server_cert(ca_key, ca_cert, ["broker.example"])
    certs.write_key(tmp_path / "other-key.pem", key)
    certs.write_cert(tmp_path / "other.pem", cert)
    with EmbeddedBroker("127.0.0.1", 0, tls=(str(tmp_path / "other.pem"), str(tmp_path / "other-key.pem"))) as b:
        client = MqttTransport(f"mqtts://127.0.0.1:{b.port}", "t-name", lambda *_: None, tls_ca=tmp_path / "ca.pem")
        with pytest.raises(ConnectionError, match="TLS handshake"):
            client.start(timeout=5)


def test_plain_external_broker_needs_insecure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain MQTT.*--insecure"):
        start("127.0.0.1", 0, tmp_path, "mqtt://127.0.0.1:1", evaluate=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_insecure_is_plain_http_and_mqtt(tmp_path: Path) -> None:
    handle = start("127.0.0.1", 0, tmp_path, "embedded", broker_port=0, evaluate=False, insecure=True)
    try:
        assert handle.url.startswith("http://") and handle.broker_url.startswith("mqtt://")
        assert handle.ca_file is None and not (tmp_path / "tls").exists()
        assert requests.get(f"{handle.url}/api/v1/health", timeout=5).ok
    finally:
        handle.stop()


# -------------------------------------------------------------------------- fedsight coordinator
@pytest.mark.integration
def test_coordinator_command_provisions_tls_and_says_where_the_ca_is(tmp_path: Path) -> None:
    port, mqtt_port = free_port(), free_port()
    data = tmp_path / "data"
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cli_command("coordinator", "--port", str(port), "--mqtt-port", str(mqtt_port),
                                            "--data-dir", str(data)),
                                stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
    try:
        ca = data / "tls" / "ca.pem"
        deadline = time.monotonic() + 60
        while "devices verify TLS" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert str(ca.resolve()) in log_path.read_text()
        with PinnedSession(ca) as http:
            health = http.get(f"https://127.0.0.1:{port}/api/v1/health", timeout=5).json()
        assert health["broker_url"] == f"mqtts://127.0.0.1:{mqtt_port}"
        device = device_transport(health["broker_url"], enroll(f"https://127.0.0.1:{port}", data, ca), ca)
        device.start(timeout=10)
        device.stop()
    finally:
        stop_process(proc)
    assert proc.returncode == 0


def test_insecure_cannot_be_mixed_with_tls_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["coordinator", "--insecure", "--tls-san", "x.lan"]) == 2
    assert "--insecure turns TLS off" in capsys.readouterr().err
    assert cli.main(["coordinator", "--tls-cert", "c.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert cli.main(["coordinator", "--broker", "mqtt://127.0.0.1:1883"]) == 2
    assert "plain MQTT" in capsys.readouterr().err
    assert cli.main(["coordinator", "--tls-san", "bad name"]) == 2
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err


def test_client_with_a_missing_ca_file_is_a_user_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "job", "list", "--ca", str(tmp_path / "no.pem")],
                            capture_output=True, text=True, timeout=60, env=child_env(), cwd=ROOT)
    assert result.returncode == 2 and "CA file not found" in result.stderr and "Traceback" not in result.stderr
