"""The ``fedsight`` argument parser: every sub-command, its options and the help people read first."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from converters import spec_text
from coordinator.cli.secagg_flags import add_secagg_arguments

DEFAULT_COORDINATOR = os.environ.get("FEDSIGHT_COORDINATOR", "https://127.0.0.1:8080")
DEFAULT_CA = os.environ.get("FEDSIGHT_CA")


def _typed(fn: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """argparse shows ArgumentTypeError messages verbatim (a bare ValueError becomes 'invalid value')."""
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = what
    return convert


def _strategy(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        spec = json.loads(text)  # ValueError -> usage error
        if not isinstance(spec, dict):
            raise ValueError("strategy JSON must be an object")
        return spec
    return {"name": text}


def _eval_set(text: str) -> tuple[str, str | None]:
    """``digits`` | ``imagefolder:PATH`` | ``none`` -> (kind, absolute path or None)."""
    kind, _, path = text.partition(":")
    if kind in ("digits", "none") and not path:
        return kind, None
    if kind == "imagefolder" and path:
        return kind, os.path.abspath(os.path.expanduser(path))
    raise ValueError(f"--eval must be digits, imagefolder:PATH or none, got {text!r}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 0.5:
        raise ValueError(f"--holdout must be between 0 and 0.5, got {text}")
    return value


def _public_url(text: str) -> str:
    from edge_sdk.coordinator_origin import CoordinatorOrigin

    return CoordinatorOrigin(text).base_url


def _public_broker(text: str) -> str:
    if text == "embedded":
        raise ValueError("give the URL devices should use, mqtts://HOST:PORT")
    return spec_text.parse_broker(text)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The whole ``fedsight`` argument parser; ``commands`` maps each sub-command to its handler."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command's default must not reset a -v given before it (`fedsight -v job list`)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    rest = argparse.ArgumentParser(add_help=False)
    rest.add_argument("--coordinator", default=DEFAULT_COORDINATOR, metavar="URL",
                      help="coordinator base URL (default: $FEDSIGHT_COORDINATOR or %(default)s)")
    rest.add_argument("--token-file", metavar="FILE",
                      help="operator token file (default: $FEDSIGHT_TOKEN, else $FEDSIGHT_TOKEN_FILE, else "
                           "./fedsight-data/operator-token)")
    rest.add_argument("--ca", default=DEFAULT_CA, metavar="CA.pem",
                      help="CA file that signed the coordinator's certificate, e.g. <data-dir>/tls/ca.pem "
                           "(default: $FEDSIGHT_CA, else the system's trusted CAs)")
    parser = argparse.ArgumentParser(
        prog="fedsight", formatter_class=_formatter, parents=[common],
        description="Federated fine-tuning of vision models on edge devices.",
        epilog="quick start:\n  fedsight demo                      # everything on this machine, ~2 min\n"
               "  fedsight coordinator --port 8080   # HTTPS + mqtts; prints its CA file\n"
               "  export FEDSIGHT_CA=fedsight-data/tls/ca.pem   # what devices and the CLI verify it with\n"
               "  fedsight client --coordinator https://127.0.0.1:8080 --num-partitions 5 --partition-index 0\n"
               "  fedsight job create --eval digits --rounds 10 --codec topk:0.01:int8 --start\n"
               "  fedsight job status JOB_ID\n  fedsight export --job JOB_ID --out model.onnx\n"
               "  fedsight infer model.onnx photo.png\n\nsee docs/cli.md for every option")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("coordinator", parents=[common], formatter_class=_formatter, help="run the coordinator",
                       epilog="examples:\n  fedsight coordinator --port 8080 --data-dir ./fedsight-data\n"
                              "  fedsight coordinator --host 0.0.0.0 --mqtt-host 0.0.0.0 "
                              "--public-url https://cams.example:8080   # devices on other hosts")
    p.add_argument("--host", default="127.0.0.1", help="HTTPS bind address, e.g. 0.0.0.0 (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTPS port (default: %(default)s)")
    p.add_argument("--data-dir", default="./fedsight-data", help="state, models, exports (default: %(default)s)")
    p.add_argument("--broker", default="embedded", type=_typed(spec_text.parse_broker, "broker"),
                   help="'embedded' (built-in MQTT broker) or mqtts://HOST:PORT (default: %(default)s)")
    p.add_argument("--mqtt-host", default="127.0.0.1", help="embedded broker bind address (default: %(default)s)")
    p.add_argument("--mqtt-port", type=int, help="embedded broker port (default: 8883; 1883 with --insecure)")
    p.add_argument("--public-url", type=_typed(_public_url, "url"), metavar="URL",
                   help="HTTPS origin devices use, e.g. https://cams.example:8080 (default: the bind address; "
                        "its host goes into the generated certificate)")
    p.add_argument("--public-broker", type=_typed(_public_broker, "broker"), metavar="mqtts://HOST:PORT",
                   help="MQTT broker URL devices are told (default: --broker, or the embedded broker at "
                        "--public-url's host)")
    p.add_argument("--weights-dir", metavar="DIR",
                   help="directory job specs may load model.weights files from (default: none allowed)")
    p.add_argument("--broker-admin", metavar="USER", default=os.environ.get("FEDSIGHT_BROKER_ADMIN_USER"),
                   help="with --broker mqtts://...: the Mosquitto dynamic-security admin the coordinator manages "
                        "device identities with (default: $FEDSIGHT_BROKER_ADMIN_USER); its password comes from "
                        "$FEDSIGHT_BROKER_ADMIN_PASSWORD or --broker-admin-password-file")
    p.add_argument("--broker-admin-password-file", metavar="FILE",
                   help="file holding the admin password (first line)")
    tls = p.add_argument_group("TLS (default: HTTPS + mqtts with a private CA kept in DATA_DIR/tls)")
    tls.add_argument("--tls-cert", metavar="PEM", help="serve this certificate instead (with --tls-key)")
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    tls.add_argument("--tls-ca", metavar="PEM", help="CA that signed --tls-cert, the file devices pin "
                     "(omit for a publicly trusted certificate)")
    tls.add_argument("--tls-san", action="append", default=[], metavar="NAME_OR_IP",
                     help="extra DNS name or IP devices use, for the generated certificate (repeatable)")
    tls.add_argument("--broker-ca", metavar="PEM", help="CA of an external mqtts broker (default: the devices' CA)")
    tls.add_argument("--insecure", action="store_true",
                     help="no TLS: plain HTTP and MQTT (trusted test networks only; docs/security.md)")
    p.set_defaults(func=commands["coordinator"])

    p = sub.add_parser("client", parents=[common, rest], formatter_class=_formatter,
                       help="run a simulated device on a dataset shard",
                       epilog="example:\n  fedsight client --coordinator https://127.0.0.1:8080 --ca ca.pem "
                              "--dataset digits \\\n"
                              "      --partition dirichlet:0.5 --num-partitions 10 --partition-index 3")
    p.add_argument("--broker", type=_typed(spec_text.parse_broker, "broker"), metavar="mqtts://HOST:PORT",
                   help="MQTT broker (default: the one the coordinator advertises)")
    p.add_argument("--dataset", default="digits", type=_typed(spec_text.parse_dataset, "dataset"),
                   help="digits | imagefolder:PATH | cifar10:PATH (default: digits)")
    p.add_argument("--partition", default="iid", type=_typed(spec_text.parse_partition, "partition"),
                   help="iid | dirichlet:ALPHA (label skew; smaller = more skewed) (default: iid)")
    p.add_argument("--num-partitions", type=int, default=1, metavar="N", help="shards in total (default: 1)")
    p.add_argument("--partition-index", type=int, default=0, metavar="I", help="this device's shard (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="partition seed, same for all devices (default: 0)")
    p.add_argument("--image-size", type=int,
                   help="resize images (default: 8 for digits; imagefolder and cifar10 follow the job's model)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image channels (default: 1 digits, else 3)")
    p.add_argument("--client-id", help="reuse a registered id (with --token, --device-key); default: cached or enroll")
    p.add_argument("--token", help="client token from POST /api/v1/clients")
    p.add_argument("--device-key", help="device key (hex) from the same registration")
    p.add_argument("--enroll-secret-file", metavar="FILE",
                   help="fleet enrollment secret, to register (default: $FEDSIGHT_ENROLL_SECRET; the coordinator "
                        "wrote it to <data-dir>/enroll-secret)")
    p.add_argument("--name", help="display name (default: sim-INDEX)")
    p.add_argument("--cache-dir", help="credentials, model cache, residuals (default: ~/.cache/fedsight/client-I)")
    p.add_argument("--job", action="append", metavar="JOB_ID", help="only take part in these jobs (repeatable)")
    p.add_argument("--max-jobs", type=int, help="exit after taking part in this many finished jobs")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.set_defaults(func=commands["client"], client_command=None)
    manage = p.add_subparsers(dest="client_command", required=False, metavar="[list|revoke]",
                              title="manage registered devices (operator)")
    manage.add_parser("list", parents=[common, rest], help="registered devices and their state")
    a = manage.add_parser("revoke", parents=[common, rest], help="revoke a device's credentials for good",
                          epilog="example:\n  fedsight client revoke c-3f9a0b1c2d3e", formatter_class=_formatter)
    a.add_argument("revoke_id", metavar="CLIENT_ID")

    p = sub.add_parser("auth", parents=[common], formatter_class=_formatter,
                       help="rotate the operator token or the enrollment secret (on the coordinator's data dir)",
                       epilog="example:\n  fedsight auth rotate operator-token --data-dir ./fedsight-data")
    auth = p.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    a = auth.add_parser("rotate", parents=[common], help="replace a secret; the old one stops working at once")
    a.add_argument("secret", choices=("operator-token", "enroll-secret"))
    a.add_argument("--data-dir", default="./fedsight-data", help="the coordinator's data dir (default: %(default)s)")
    p.set_defaults(func=commands["auth"])

    p = sub.add_parser("job", parents=[common], help="create, start, stop, list and inspect jobs")
    jobs = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    c = jobs.add_parser("create", parents=[common, rest], formatter_class=_formatter, help="create a job",
                        epilog="examples:\n  fedsight job create --name digits-topk --eval digits --rounds 10 "
                               "--clients-per-round 5 \\\n"
                               "      --min-clients 3 --codec topk:0.01:int8 --lr 0.05 --epochs 1 --start\n"
                               "  fedsight job create --name cams --arch mobilenet_v3_small --num-classes 5 "
                               "--image-size 224 \\\n"
                               "      --eval imagefolder:./holdout --codec topk:0.01:int8\n"
                               "  fedsight job create --eval digits --codec randk:0.1 --secure-aggregation "
                               "--epsilon 8 --dp-clip fixed:1.0\n\n"
                               "defaults: a job is a digits job only with --eval digits (1 channel, 8x8, mean/std "
                               "0.5, input scale 16);\nevery other job gets photo defaults (3 channels, 32x32, "
                               "ImageNet mean/std, input scale 255)\nand, without a server-side --eval set, "
                               "devices score each version on 10% held-out data.\n\n"
                               f"codec: {spec_text.CODEC_GRAMMAR}\nunset options take the coordinator's defaults "
                               "(docs/rest.md)")
    c.add_argument("--name")
    c.add_argument("--arch", default="small_cnn",
                   help="small_cnn, mobilenet_v3_small, resnet18, ... (default: %(default)s)")
    c.add_argument("--num-classes", type=int,
                   help="(default: number of --class-names or of --eval imagefolder classes, else 10)")
    c.add_argument("--in-channels", type=int, help="(default: 1 for --eval digits, else 3)")
    c.add_argument("--image-size", type=int, help="(default: 8 for --eval digits, else 32)")
    c.add_argument("--rounds", type=int, help="(server default: 10)")
    c.add_argument("--clients-per-round", type=int, help="devices selected per round (server default: 5)")
    c.add_argument("--min-clients", type=int, help="accepted updates needed to close a round (server default: 3)")
    c.add_argument("--round-timeout", type=float, metavar="SECONDS", help="(server default: 60)")
    c.add_argument("--codec", type=_typed(spec_text.parse_codec, "codec"), help="e.g. dense, topk:0.01:int8")
    c.add_argument("--epochs", type=int, help="local epochs per round (server default: 1)")
    c.add_argument("--max-steps", type=int, metavar="N",
                   help="stop each device's round after N SGD steps, even inside an epoch: more, shorter rounds at "
                        "the same total epochs drift less on label-skewed devices; 0 = whole epochs "
                        "(server default: 0)")
    c.add_argument("--batch-size", type=int, help="(server default: 32)")
    c.add_argument("--lr", type=float, help="local SGD learning rate (server default: 0.05)")
    c.add_argument("--mu", type=float, help="FedProx proximal strength (server default: 0)")
    c.add_argument("--freeze-backbone", action="store_true", help="train the classification head only")
    c.add_argument("--logit-adjust", type=float, metavar="TAU",
                   help="devices train on logits + TAU * log(their own label shares): less client drift when each "
                        "device sees a few classes; the shares never leave the device; 0 = off "
                        "(server default: 1)")
    c.add_argument("--weights", metavar="FILE",
                   help="start from your torchvision state_dict (torch.save(model.state_dict(), FILE)) for --arch; "
                        "the head is replaced for --num-classes. Sent to the coordinator with the job")
    c.add_argument("--backbone-lr-mult", type=float, metavar="X",
                   help="backbone learning rate = --lr * X, head keeps --lr; 0 freezes the backbone weights "
                        "(server default: 1)")
    c.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BatchNorm running statistics after local training (server default: on)")
    c.add_argument("--eval", type=_typed(_eval_set, "eval"), metavar="digits|imagefolder:PATH|none",
                   help="server-side evaluation set: digits, or a held-out ImageFolder on the coordinator's disk "
                        "whose class folders match the class names; none = no evaluation at all "
                        "(default: devices score on held-out data only)")
    c.add_argument("--holdout", type=_typed(_fraction, "fraction"), metavar="FRACTION",
                   help="share of each device's data held out to score every version (federated evaluation; "
                        "0-0.5; default: 0.1 without a server-side --eval set, else 0)")
    c.add_argument("--class-names", metavar="A,B,...", help="(default: the --eval imagefolder classes, else 0..N-1)")
    c.add_argument("--mean", type=_typed(spec_text.parse_floats, "floats"), metavar="M[,M,M]",
                   help="per-channel normalisation mean (default: ImageNet for 3 channels, 0.5 otherwise)")
    c.add_argument("--std", type=_typed(spec_text.parse_floats, "floats"), metavar="S[,S,S]")
    c.add_argument("--input-scale", type=float, metavar="N",
                   help="raw integer pixels are divided by this (default: 255; 16 for --eval digits)")
    c.add_argument("--strategy", type=_typed(_strategy, "strategy"), metavar="NAME|JSON",
                   help='fedavg (server default), fedprox, fedavgm, fedadam, fedyogi, '
                        'or JSON like {"name": "fedadam", ...}')
    c.add_argument("--seed", type=int)
    c.add_argument("--max-update-bytes", type=int)
    c.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="report a job with too few devices after this long (server default: 300)")
    c.add_argument("--on-stall", choices=("pause", "fail"), help="then pause (default) or fail the job")
    c.add_argument("--epsilon", type=float, help="client-level differential privacy with this budget; the job "
                   "finishes before a round would exceed it (docs/privacy.md)")
    c.add_argument("--delta", type=float, help="DP delta (server default: 1e-5); needs --epsilon")
    c.add_argument("--noise-multiplier", type=float, metavar="Z", help="DP noise multiplier (default: calibrated "
                   "so that --rounds rounds spend --epsilon); needs --epsilon")
    c.add_argument("--dp-clip", metavar="fixed:C|adaptive:C", help="DP clip bound (server default: adaptive "
                   "starting at 1.0); needs --epsilon")
    add_secagg_arguments(c)
    c.add_argument("--start", action="store_true", help="start the job right away")
    c.add_argument("--json", action="store_true", help="print the job as JSON instead of its id")
    for action, text in (("start", "start a created job"), ("stop", "stop a running job"),
                         ("status", "per-round table: accepted/rejected, uplink bytes, compression, accuracy")):
        a = jobs.add_parser(action, parents=[common, rest], help=text, formatter_class=_formatter,
                            epilog=f"example:\n  fedsight job {action} job-1a2b3c4d")
        a.add_argument("job_id", metavar="JOB_ID")
        if action == "status":
            a.add_argument("--json", action="store_true", help="raw job and rounds JSON")
    a = jobs.add_parser("list", parents=[common, rest], help="list jobs")
    a.add_argument("--json", action="store_true")
    p.set_defaults(func=commands["job"])

    p = sub.add_parser("export", parents=[common, rest], formatter_class=_formatter,
                       help="download a global model as one ONNX file",
                       epilog="examples:\n  fedsight export --job job-1a2b3c4d --out digits.onnx\n"
                              "  fedsight export --job job-1a2b3c4d --data-dir ./fedsight-data --out digits.onnx")
    p.add_argument("--job", required=True, metavar="JOB_ID")
    p.add_argument("--version", help="model version sha256 (default: the job's current version)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--data-dir", help="export locally from a coordinator data directory instead of over REST")
    p.set_defaults(func=commands["export"])

    p = sub.add_parser("infer", parents=[common], formatter_class=_formatter,
                       help="classify images with an exported ONNX model (no torch needed)",
                       epilog="example:\n  fedsight infer digits.onnx samples/ photo.png --top 3")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top", type=int, default=3, help="top-k classes in --json output (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands["infer"])

    p = sub.add_parser("certs", parents=[common], formatter_class=_formatter,
                       help="create a private CA and server certificates (HTTPS, mqtts)",
                       epilog="examples:\n  fedsight certs --san coord.example.com --san 192.0.2.10\n"
                              "  fedsight certs --out ./fedsight-data/tls --name mosquitto --san broker.lan\n\n"
                              "writes ca.pem (give it to every device), ca-key.pem (keep secret), NAME.pem and\n"
                              "NAME-key.pem; keys are 0600. An existing CA in --out is reused.")
    p.add_argument("--out", default="./fedsight-data/tls", metavar="DIR",
                   help="TLS folder; the coordinator's default is DATA_DIR/tls (default: %(default)s)")
    p.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="DNS name or IP address clients use (repeatable); localhost and 127.0.0.1 always included")
    p.add_argument("--name", default="server", help="certificate file name stem (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-issue even if a valid certificate exists")
    p.set_defaults(func=commands["certs"])

    from coordinator.cli.demo import add_demo_arguments  # the demo owns its defaults

    p = sub.add_parser("demo", parents=[common], formatter_class=_formatter,
                       help="end-to-end federated run on this machine, with a chart",
                       epilog="example:\n  fedsight demo --clients 10 --rounds 10 --alpha 0.5 --codec topk:0.05:int8")
    add_demo_arguments(p, _typed(spec_text.parse_codec, "codec"))
    p.set_defaults(func=commands["demo"])
    return parser


