"""``fedsight`` console script: run a coordinator or a simulated device, manage jobs, export and run ONNX.

Commands import what they need lazily: ``fedsight infer`` runs on onnxruntime + numpy alone (no torch), and
``--help`` answers instantly. User errors print one line plus a hint and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from converters import spec_text

EXIT_USER_ERROR = 2
DEFAULT_COORDINATOR = os.environ.get("FEDSIGHT_COORDINATOR", "http://127.0.0.1:8080")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
log = logging.getLogger("fedsight")


class CliError(Exception):
    """A mistake the user can fix: shown as one line and a hint, never as a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class Api:
    """Tiny REST client that turns every failure into a CliError naming the coordinator."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        import requests

        try:
            resp = requests.request(method, f"{self.base}/api/v1{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise CliError(f"cannot reach the coordinator at {self.base} ({type(exc).__name__})",
                           "start one with `fedsight coordinator` or pass --coordinator URL") from None
        if resp.status_code >= 400:
            try:
                reason = resp.json().get("error", resp.text)
            except ValueError:
                reason = resp.text.strip()[:200] or resp.reason
            hint = "`fedsight job list` shows the jobs this coordinator knows" if resp.status_code == 404 else ""
            raise CliError(f"{method} {path} failed: HTTP {resp.status_code}: {reason}", hint)
        return resp if raw else resp.json()


# ------------------------------------------------------------------------------------------- commands
def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.server import serve  # handles SIGINT/SIGTERM itself: clean shutdown

    try:
        serve(args.host, args.port, Path(args.data_dir), broker=args.broker, broker_port=args.mqtt_port)
    except KeyboardInterrupt:
        pass
    return 0


def load_partition(spec: tuple[str, Path | None], partition: float | str, num: int, index: int, seed: int,
                   image_size: int | None = None, channels: int | None = None) -> Any:
    """This device's shard of a dataset; every process with the same seed computes the same split."""
    import numpy as np
    from torch.utils.data import Subset

    from edge_sdk import data

    kind, path = spec
    if kind == "digits":
        dataset, _ = data.load_digits_split(image_size=image_size or 8, channels=channels or 1)
        labels = dataset.tensors[1].numpy()
    elif kind == "imagefolder":
        dataset = data.image_folder(path, image_size or 32, channels=channels or 3)
        labels = np.asarray(dataset.targets)
    else:
        dataset = data.cifar10(path, train=True, image_size=image_size or 32)
        labels = np.asarray(dataset.targets)
    try:
        parts = data.dirichlet_partition(labels, num, partition, seed)
    except ValueError as exc:
        raise CliError(f"cannot partition {len(labels)} samples: {exc}", "use fewer --num-partitions") from None
    return Subset(dataset, parts[index].tolist())


def cmd_client(args: argparse.Namespace) -> int:
    if not 0 <= args.partition_index < args.num_partitions:
        raise CliError(f"--partition-index {args.partition_index} is outside 0..{args.num_partitions - 1}",
                       "pass an index below --num-partitions")
    import torch

    from edge_sdk.client import EdgeClient

    torch.set_num_threads(args.threads)
    shard = load_partition(args.dataset, args.partition, args.num_partitions, args.partition_index, args.seed,
                           args.image_size, args.channels)
    cache = args.cache_dir or f"~/.cache/fedsight/client-{args.partition_index}"
    _sigterm_as_interrupt()
    try:
        client = EdgeClient(args.coordinator, dataset=shard, client_id=args.client_id, token=args.token,
                            name=args.name or f"sim-{args.partition_index}", broker_url=args.broker,
                            cache_dir=cache, jobs=args.job or None)
    except RuntimeError as exc:  # registration refused: wrong URL or not a FedSight coordinator
        raise CliError(str(exc), "check --coordinator (and --client-id/--token if given)") from None
    log.info("device %s: %d local samples (partition %d of %d)", client.client_id, len(shard),
             args.partition_index, args.num_partitions)
    client.run(max_jobs=args.max_jobs, timeout=args.timeout)
    return 0


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    """POST /jobs body from ``job create`` flags; flags left unset are omitted so the server's defaults apply."""
    def pick(**kv: Any) -> dict[str, Any]:
        return {k: v for k, v in kv.items() if v is not None}

    body = pick(name=args.name, rounds=args.rounds, clients_per_round=args.clients_per_round,
                min_clients=args.min_clients, round_timeout_s=args.round_timeout, codec=args.codec, seed=args.seed,
                class_names=args.class_names.split(",") if args.class_names else None,
                max_update_bytes=args.max_update_bytes, strategy=args.strategy)
    body["model"] = pick(arch=args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                         image_size=args.image_size)
    body["train"] = pick(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mu=args.mu,
                         freeze_backbone=args.freeze_backbone or None)
    body["eval"] = None if args.eval == "none" else {"dataset": args.eval}
    if (args.mean is None) != (args.std is None):
        raise CliError("--mean and --std go together", "give both, e.g. --mean 0.5 --std 0.5")
    if args.mean is not None:
        body["normalization"] = {"mean": args.mean, "std": args.std}
    return body


def _job_id(job: dict[str, Any]) -> str:
    return str(job.get("id") or job.get("job_id"))


def cmd_job(args: argparse.Namespace) -> int:
    api = Api(args.coordinator)
    if args.job_command == "create":
        job = api.request("POST", "/jobs", json=job_body(args))
        if args.start:
            job = api.request("POST", f"/jobs/{_job_id(job)}/start")
        print(json.dumps(job, indent=2) if args.json else _job_id(job))
    elif args.job_command in ("start", "stop"):
        job = api.request("POST", f"/jobs/{args.job_id}/{args.job_command}")
        print(f"job {args.job_id}: {job.get('status', args.job_command)}")
    elif args.job_command == "list":
        jobs = api.request("GET", "/jobs")["jobs"]
        rows = [[_job_id(j), j.get("name", ""), j.get("status", ""),
                 f"{j.get('current_round', 0)}/{j['config'].get('rounds', '?')}", j["config"]["model"]["arch"],
                 spec_text.codec_label(j["config"].get("codec"))] for j in jobs]
        print(json.dumps(jobs, indent=2) if args.json else
              format_table(["job", "name", "status", "round", "arch", "codec"], rows) if rows else "no jobs")
    else:
        job = api.request("GET", f"/jobs/{args.job_id}")
        rounds = api.request("GET", f"/jobs/{args.job_id}/rounds")["rounds"]
        if args.json:
            print(json.dumps({"job": job, "rounds": rounds}, indent=2))
            return 0
        cfg = job["config"]
        print(f"job {_job_id(job)} ({job.get('name', '')}): {job.get('status')}, round {job.get('current_round', 0)}"
              f"/{cfg.get('rounds', '?')}, {cfg['model']['arch']}, codec {spec_text.codec_label(cfg.get('codec'))}")
        if job.get("error"):
            print(f"error: {job['error']}")
        print(format_table(*rounds_table(rounds)) if rounds else "no rounds yet")
    return 0


def rounds_table(rounds: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    from coordinator.chart import human_bytes

    rows = []
    for r in rounds:
        acc = (r.get("eval") or {}).get("accuracy")
        ratio = r.get("compression_ratio")
        rows.append([str(r.get("round")), str(r.get("status", "")), f"{r.get('accepted', 0)}/{r.get('rejected', 0)}",
                     human_bytes(r.get("uplink_bytes") or 0), f"{ratio:.1f}x" if ratio else "-",
                     f"{acc * 100:.1f}%" if acc is not None else "-", f"{r.get('duration_s') or 0:.1f}s"])
    return ["round", "status", "acc/rej", "uplink", "compression", "accuracy", "time"], rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def export_local(data_dir: Path, job_id: str, version: str | None) -> tuple[bytes, str]:
    """Export from a coordinator's data directory without a running server (same cache as the server)."""
    from coordinator.exports import ExportFailed
    from coordinator.services import build_services

    if not (data_dir / "fedsight.db").is_file():
        raise CliError(f"{data_dir} is not a coordinator data directory (no fedsight.db)",
                       "pass the --data-dir the coordinator was started with")
    svc = build_services(data_dir, evaluate=False)
    try:
        job = svc.store.get_job(job_id)
        if job is None:
            raise CliError(f"unknown job {job_id!r} in {data_dir}", "`fedsight job list` shows the jobs")
        version = version or job["current_version"]
        if not svc.store.get_model_version(job_id, version):
            raise CliError(f"job {job_id} has no model version {version!r}")
        try:
            report = svc.exports.export(job, version)
        except ExportFailed as exc:
            raise CliError(str(exc)) from None
        return Path(report["path"]).read_bytes(), version
    finally:
        svc.close()


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.data_dir:
        data, version = export_local(Path(args.data_dir), args.job, args.version)
    else:
        resp = Api(args.coordinator, timeout=180).request(
            "GET", f"/jobs/{args.job}/onnx", raw=True, params={"version": args.version} if args.version else None)
        data, version = resp.content, resp.headers.get("X-Model-Version", args.version or "")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(data):,} bytes, model version {version[:12] or '?'})")
    return 0


def image_paths(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise CliError(f"no images in folder {p}", f"supported: {', '.join(sorted(IMAGE_SUFFIXES))}")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise CliError(f"no such image or folder: {p}")
    return paths


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_sdk.inference import OnnxClassifier

    if not Path(args.model).is_file():
        raise CliError(f"model file not found: {args.model}", "get one with `fedsight export --job ID --out FILE`")
    try:
        classifier = OnnxClassifier(args.model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise CliError(f"cannot load ONNX model {args.model}: {str(exc).splitlines()[0][:200]}") from None
    paths = image_paths(args.images)
    rows = []
    for start in range(0, len(paths), 64):
        chunk = paths[start:start + 64]
        try:
            preds = classifier.predict([str(p) for p in chunk])
        except OSError as exc:
            raise CliError(f"cannot read image: {exc}") from None
        for p, pred in zip(chunk, preds):
            top = np.argsort(-pred.probs)[: args.top]
            rows.append({"image": str(p), "label": pred.label, "name": pred.name, "probability": pred.probability,
                         "top": [{"label": int(i), "name": classifier.class_names[i] if i < len(
                             classifier.class_names) else str(i), "probability": float(pred.probs[i])} for i in top]})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(["image", "prediction", "probability"],
                           [[r["image"], r["name"], f"{r['probability']:.3f}"] for r in rows]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.demo import DemoConfig, run_demo

    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__})
    _sigterm_as_interrupt()  # children are cleaned up by run_demo's finally on SIGTERM too
    summary = run_demo(cfg)
    return 0 if summary["ok"] else 1


def _sigterm_as_interrupt() -> None:
    """`kill` stops long-running commands the same clean way Ctrl-C does (devices announce offline)."""
    def handler(_signum: int, _frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------- parser
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


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command's default must not reset a -v given before it (`fedsight -v job list`)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    rest = argparse.ArgumentParser(add_help=False)
    rest.add_argument("--coordinator", default=DEFAULT_COORDINATOR, metavar="URL",
                      help="coordinator base URL (default: $FEDSIGHT_COORDINATOR or %(default)s)")
    parser = argparse.ArgumentParser(
        prog="fedsight", formatter_class=_formatter, parents=[common],
        description="Federated fine-tuning of vision models on edge devices.",
        epilog="quick start:\n  fedsight demo                      # everything on this machine, ~2 min\n"
               "  fedsight coordinator --port 8080   # then, per device:\n"
               "  fedsight client --coordinator http://127.0.0.1:8080 --num-partitions 5 --partition-index 0\n"
               "  fedsight job create --rounds 10 --codec topk:0.01:int8 --start\n"
               "  fedsight job status JOB_ID\n  fedsight export --job JOB_ID --out model.onnx\n"
               "  fedsight infer model.onnx photo.png\n\nsee docs/cli.md for every option")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("coordinator", parents=[common], formatter_class=_formatter, help="run the coordinator",
                       epilog="example:\n  fedsight coordinator --port 8080 --data-dir ./fedsight-data "
                              "--broker embedded")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    p.add_argument("--data-dir", default="./fedsight-data", help="state, models, exports (default: %(default)s)")
    p.add_argument("--broker", default="embedded", type=_typed(spec_text.parse_broker, "broker"),
                   help="'embedded' (built-in MQTT broker) or mqtt://HOST:PORT (default: %(default)s)")
    p.add_argument("--mqtt-port", type=int, default=1883, help="embedded broker port (default: %(default)s)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("client", parents=[common, rest], formatter_class=_formatter,
                       help="run a simulated device on a dataset shard",
                       epilog="example:\n  fedsight client --coordinator http://127.0.0.1:8080 --dataset digits \\\n"
                              "      --partition dirichlet:0.5 --num-partitions 10 --partition-index 3")
    p.add_argument("--broker", type=_typed(spec_text.parse_broker, "broker"), metavar="mqtt://HOST:PORT",
                   help="MQTT broker (default: the one the coordinator advertises)")
    p.add_argument("--dataset", default="digits", type=_typed(spec_text.parse_dataset, "dataset"),
                   help="digits | imagefolder:PATH | cifar10:PATH (default: digits)")
    p.add_argument("--partition", default="iid", type=_typed(spec_text.parse_partition, "partition"),
                   help="iid | dirichlet:ALPHA (label skew; smaller = more skewed) (default: iid)")
    p.add_argument("--num-partitions", type=int, default=1, metavar="N", help="shards in total (default: 1)")
    p.add_argument("--partition-index", type=int, default=0, metavar="I", help="this device's shard (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="partition seed, same for all devices (default: 0)")
    p.add_argument("--image-size", type=int, help="resize images (default: 8 for digits, else 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image channels (default: 1 digits, else 3)")
    p.add_argument("--client-id", help="reuse a registered id (with --token); default: register or cached")
    p.add_argument("--token", help="client token from POST /api/v1/clients")
    p.add_argument("--name", help="display name (default: sim-INDEX)")
    p.add_argument("--cache-dir", help="credentials, model cache, residuals (default: ~/.cache/fedsight/client-I)")
    p.add_argument("--job", action="append", metavar="JOB_ID", help="only take part in these jobs (repeatable)")
    p.add_argument("--max-jobs", type=int, help="exit after taking part in this many finished jobs")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("job", parents=[common], help="create, start, stop, list and inspect jobs")
    jobs = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    c = jobs.add_parser("create", parents=[common, rest], formatter_class=_formatter, help="create a job",
                        epilog="example:\n  fedsight job create --name digits-topk --rounds 10 "
                               "--clients-per-round 5 \\\n"
                               "      --min-clients 3 --codec topk:0.01:int8 --lr 0.05 --epochs 1 --start\n\n"
                               f"codec: {spec_text.CODEC_GRAMMAR}\nunset options take the coordinator's defaults "
                               "(docs/rest.md)")
    c.add_argument("--name")
    c.add_argument("--arch", default="small_cnn",
                   help="small_cnn, mobilenet_v3_small, resnet18, ... (default: %(default)s)")
    c.add_argument("--num-classes", type=int, default=10, help="(default: %(default)s)")
    c.add_argument("--in-channels", type=int, default=1, help="(default: %(default)s, digits)")
    c.add_argument("--image-size", type=int, help="(default: 8 for small_cnn, else 32)")
    c.add_argument("--rounds", type=int, help="(server default: 10)")
    c.add_argument("--clients-per-round", type=int, help="devices selected per round (server default: 5)")
    c.add_argument("--min-clients", type=int, help="accepted updates needed to close a round (server default: 3)")
    c.add_argument("--round-timeout", type=float, metavar="SECONDS", help="(server default: 60)")
    c.add_argument("--codec", type=_typed(spec_text.parse_codec, "codec"), help="e.g. dense, topk:0.01:int8")
    c.add_argument("--epochs", type=int, help="local epochs per round (server default: 1)")
    c.add_argument("--batch-size", type=int, help="(server default: 32)")
    c.add_argument("--lr", type=float, help="local SGD learning rate (server default: 0.05)")
    c.add_argument("--mu", type=float, help="FedProx proximal strength (server default: 0)")
    c.add_argument("--freeze-backbone", action="store_true", help="train the classification head only")
    c.add_argument("--eval", default="digits", choices=("digits", "none"),
                   help="server-side evaluation set (default: %(default)s)")
    c.add_argument("--class-names", metavar="A,B,...")
    c.add_argument("--mean", type=_typed(spec_text.parse_floats, "floats"), metavar="M[,M,M]")
    c.add_argument("--std", type=_typed(spec_text.parse_floats, "floats"), metavar="S[,S,S]")
    c.add_argument("--strategy", type=_typed(_strategy, "strategy"), metavar="NAME|JSON",
                   help='fedavg (server default), fedprox, fedadam, fedyogi, or JSON like {"name": "fedadam", ...}')
    c.add_argument("--seed", type=int)
    c.add_argument("--max-update-bytes", type=int)
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
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("export", parents=[common, rest], formatter_class=_formatter,
                       help="download a global model as one ONNX file",
                       epilog="examples:\n  fedsight export --job job-1a2b3c4d --out digits.onnx\n"
                              "  fedsight export --job job-1a2b3c4d --data-dir ./fedsight-data --out digits.onnx")
    p.add_argument("--job", required=True, metavar="JOB_ID")
    p.add_argument("--version", help="model version sha256 (default: the job's current version)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--data-dir", help="export locally from a coordinator data directory instead of over REST")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("infer", parents=[common], formatter_class=_formatter,
                       help="classify images with an exported ONNX model (no torch needed)",
                       epilog="example:\n  fedsight infer digits.onnx samples/ photo.png --top 3")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top", type=int, default=3, help="top-k classes in --json output (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_infer)

    from coordinator.demo import add_demo_arguments  # the demo owns its defaults

    p = sub.add_parser("demo", parents=[common], formatter_class=_formatter,
                       help="end-to-end federated run on this machine, with a chart",
                       epilog="example:\n  fedsight demo --clients 10 --rounds 10 --alpha 0.5 --codec topk:0.05:int8")
    add_demo_arguments(p, _typed(spec_text.parse_codec, "codec"))
    p.set_defaults(func=cmd_demo)
    return parser


def _user_error(exc: BaseException) -> CliError | None:
    """Library exceptions that mean 'fix your input or setup' become CliError; anything else is a bug."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, (FileNotFoundError, ConnectionError)):
        return CliError(str(exc))
    for module, name in [("edge_sdk.protocol.errors", "ProtocolError"), ("converters.onnx_export", "ExportError"),
                         ("edge_sdk.models", "WeightsMismatchError"), ("requests", "RequestException"),
                         ("edge_sdk.data", "DatasetNotFoundError"), ("coordinator.demo", "DemoError")]:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            if module == "requests":  # its messages are walls of urllib3 detail
                url = getattr(getattr(exc, "request", None), "url", None) or "the server"
                return CliError(f"cannot reach {url} ({type(exc).__name__})",
                                "is `fedsight coordinator` running there? check --coordinator / --broker")
            first, *rest = str(exc).splitlines() or [type(exc).__name__]
            return CliError(first, " ".join(line.strip() for line in rest))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    quiet = logging.INFO if args.command in ("coordinator", "client") else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fedsight: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that decides traceback vs one-liner
        err = _user_error(exc)
        if args.verbose or err is None:
            if err is None and not args.verbose:
                print(f"fedsight: unexpected {type(exc).__name__}: {exc} (a bug? rerun with -v for the traceback)",
                      file=sys.stderr)
                return 1
            raise
        print(f"fedsight: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
