"""The commands an operator runs on the coordinator's machine: `fedsight coordinator` (with its TLS and external
broker checks, so a misconfiguration is one readable line, not a traceback) and `fedsight certs`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from coordinator.cli.rest_client import CliError


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.security.certs import ServerTls, parse_san
    from coordinator.server import serve  # handles SIGINT/SIGTERM itself: clean shutdown

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together", "or give neither: a certificate is generated")
    if args.insecure and (args.tls_cert or args.tls_ca or args.tls_san or args.broker_ca):
        raise CliError("--insecure turns TLS off; it cannot be combined with --tls-* or --broker-ca options")
    for path in (args.tls_cert, args.tls_key, args.tls_ca, args.broker_ca):
        if path and not Path(path).is_file():
            raise CliError(f"no such file: {path}", "`fedsight certs` creates a CA and certificates")
    if args.broker.startswith("mqtt://") and not args.insecure:
        raise CliError(f"--broker {args.broker} is plain MQTT", "give the broker a TLS listener and use "
                       "mqtts://HOST:PORT (docs/security.md), or add --insecure")
    for name in args.tls_san:
        try:
            parse_san(name)
        except ValueError as exc:
            raise CliError(f"--tls-san: {exc}") from None
    tls = ServerTls(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None) \
        if args.tls_cert else None
    port = args.mqtt_port if args.mqtt_port is not None else (1883 if args.insecure else 8883)
    try:
        serve(args.host, args.port, Path(args.data_dir), broker=args.broker, broker_host=args.mqtt_host,
              broker_port=port, public_url=args.public_url, advertised_broker_url=args.public_broker,
              weights_dir=args.weights_dir, broker_admin=broker_admin(args), tls=tls, insecure=args.insecure,
              tls_names=tuple(args.tls_san), broker_ca=args.broker_ca)
    except KeyboardInterrupt:
        pass
    return 0


def broker_admin(args: argparse.Namespace) -> tuple[str, str] | None:
    """The external broker's dynamic-security admin identity from flags / environment (None when embedded)."""
    if args.broker == "embedded":
        return None
    hint = ("create it with `mosquitto_ctrl dynsec init FILE USER`, then pass --broker-admin USER and set "
            "FEDSIGHT_BROKER_ADMIN_PASSWORD (docs/security.md)")
    if not args.broker_admin:
        raise CliError(f"--broker {args.broker} needs the broker's dynamic-security admin identity", hint)
    if args.broker_admin_password_file:
        try:
            lines = Path(args.broker_admin_password_file).read_text().splitlines()
        except OSError as exc:
            raise CliError(f"cannot read --broker-admin-password-file: {exc}") from None
        password = lines[0] if lines else ""
    else:
        password = os.environ.get("FEDSIGHT_BROKER_ADMIN_PASSWORD", "")
    if not password:
        raise CliError(f"no password for broker admin {args.broker_admin!r}", hint)
    return args.broker_admin, password


def cmd_certs(args: argparse.Namespace) -> int:
    from coordinator.security.certs import ensure_server_cert, load_cert, sans_of

    try:
        files = ensure_server_cert(Path(args.out), args.san, name=args.name, force=args.force)
    except ValueError as exc:
        raise CliError(str(exc), "e.g. fedsight certs --san coord.example.com --san 192.0.2.10") from None
    print(f"CA for devices:   {files.ca}  (fedsight client --ca {files.ca})")
    print(f"CA key (secret):  {Path(args.out) / 'ca-key.pem'}")
    print(f"certificate:      {files.cert}  valid for {', '.join(sans_of(load_cert(files.cert)))}")
    print(f"key (0600):       {files.key}")
    return 0
