"""A private CA and the server certificates it signs, made with ``cryptography`` (no hand-written crypto).

Devices pin the CA (``ca.pem``), so a deployment needs no public certificate authority, and one CA covers
the REST API (HTTPS) and the MQTT broker (mqtts), embedded or Mosquitto. A TLS directory holds::

    ca.pem           CA certificate: the file every device gets (``fedsight client --ca ca.pem``)
    ca-key.pem       CA private key (0600): stays on the coordinator host; needed only to issue certificates
    server.pem       server certificate for HTTPS and the MQTT TLS listener (NAME.pem for ``--name NAME``)
    server-key.pem   its private key (0600)

``fedsight certs`` writes this layout; ``fedsight coordinator`` without TLS options provisions it in
``<data-dir>/tls`` on first start and re-issues the server certificate (same CA, so devices keep their
``ca.pem``) when it expires within 30 days or lacks a name the coordinator is reached by.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_SANS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_WITHIN_DAYS = 30
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class ServerTls:
    """What a TLS server needs: its certificate and key, and the CA file clients verify it with.

    ``ca`` is None when the certificate comes from a public CA that clients already trust."""

    cert: Path
    key: Path
    ca: Path | None = None


def parse_san(text: str) -> x509.GeneralName:
    """``192.0.2.7`` / ``::1`` -> IP address entry, ``coord.example.com`` / ``*.lan`` -> DNS entry."""
    text = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS.match(text):
        raise ValueError(f"{text!r} is neither an IP address nor a DNS name (e.g. coord.example.com, 10.0.0.2)")
    return x509.DNSName(text.lower())


def san_strings(names: Iterable[x509.GeneralName]) -> list[str]:
    return [str(n.value) for n in names]


def sans_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san_strings(ext)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: fast, and every TLS stack speaks it


def create_ca(common_name: str = "FedSight CA", days: int = CA_DAYS) -> tuple[PrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedSight")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_server_cert(ca_key: PrivateKey, ca_cert: x509.Certificate, sans: Sequence[str],
                      days: int = SERVER_DAYS) -> tuple[PrivateKey, x509.Certificate]:
    """A TLS server certificate for ``sans`` (hostname checks use these, not the common name)."""
    names = [parse_san(s) for s in sans]
    if not names:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         content_commitment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


# ------------------------------------------------------------------------------------------ files
def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with ``mode``, so a key is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; a certificate should stay world-readable
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_key(path: Path, key: PrivateKey) -> None:
    _write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate: {exc}") from None


def load_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key written by `fedsight certs`")
    return key


def ensure_ca(directory: Path) -> tuple[PrivateKey, x509.Certificate, bool]:
    """Load ``ca.pem`` + ``ca-key.pem`` from ``directory`` or create them; the bool says 'created'."""
    ca_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if ca_path.exists() and key_path.exists():
        return load_key(key_path), load_cert(ca_path), False
    if ca_path.exists() or key_path.exists():
        raise ValueError(f"{directory} has only one of ca.pem / ca-key.pem; restore the other or use a new folder")
    key, cert = create_ca()
    write_key(key_path, key)
    write_cert(ca_path, cert)
    log.info("created a private CA in %s", directory)
    return key, cert, True


def _needs_new(cert_path: Path, ca_cert: x509.Certificate, sans: Sequence[str]) -> str | None:
    """Why the certificate at ``cert_path`` cannot be kept (None: keep it)."""
    if not cert_path.exists():
        return "none yet"
    cert = load_cert(cert_path)
    if cert.issuer != ca_cert.subject:
        return "not signed by this CA"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return "not signed by this CA"
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_WITHIN_DAYS):
        return "expires soon"
    have = {str(parse_san(s).value) for s in sans_of(cert)}
    missing = [s for s in sans if str(parse_san(s).value) not in have]
    return f"lacks {', '.join(missing)}" if missing else None


def with_defaults(sans: Iterable[str]) -> list[str]:
    """``sans`` plus localhost and 127.0.0.1 (the coordinator reaches its embedded broker on loopback)."""
    out: list[str] = []
    for s in [*DEFAULT_SANS, *sans]:
        value = str(parse_san(s).value)
        if value not in out:
            out.append(value)
    return out


def ensure_server_cert(directory: Path, sans: Iterable[str] = (), name: str = "server",
                       force: bool = False) -> ServerTls:
    """``directory/NAME.pem`` + ``NAME-key.pem`` valid for ``sans`` (+ loopback), issued by the directory's CA.

    Keeps a suitable existing certificate; otherwise (or with ``force``) issues a new one, creating the CA
    first when the directory has none."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or name == "ca" or name.endswith("-key"):
        raise ValueError(f"certificate name {name!r}: use letters, digits, '-', '_' (not 'ca', not ending '-key')")
    directory = Path(directory)
    wanted = with_defaults(sans)
    ca_key, ca_cert, _ = ensure_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    reason = "requested" if force else _needs_new(cert_path, ca_cert, wanted)
    if reason is None and key_path.exists():
        return ServerTls(cert_path, key_path, directory / "ca.pem")
    if reason is not None and cert_path.exists():  # keep what it covered, so re-issuing never drops a name
        wanted = with_defaults([*wanted, *sans_of(load_cert(cert_path))]) if reason.startswith("lacks") else wanted
    key, cert = issue_server_cert(ca_key, ca_cert, wanted)
    write_key(key_path, key)
    write_cert(cert_path, cert)
    log.info("issued %s for %s (%s)", cert_path, ", ".join(wanted), reason or "key missing")
    return ServerTls(cert_path, key_path, directory / "ca.pem")
