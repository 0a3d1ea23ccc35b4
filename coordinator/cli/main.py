"""``fedsight`` console script: run a coordinator or a simulated device, manage jobs, export and run ONNX.

Commands import what they need lazily: ``fedsight infer`` runs on onnxruntime + numpy alone (no torch), and
``--help`` answers instantly. User errors print one line plus a hint and exit with status 2.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from converters import spec_text

from coordinator.cli import parser
from coordinator.cli.rest_client import TLS_HINT, Api, CliError, operator_token
from coordinator.cli.server_commands import cmd_certs, cmd_coordinator
from coordinator.cli.privacy_flags import privacy_flags
from coordinator.cli.secagg_flags import secagg_flags
from coordinator.cli.tables import eval_notes, eval_summary, format_table, privacy_summary, rounds_table

EXIT_USER_ERROR = 2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
log = logging.getLogger("fedsight")


# ------------------------------------------------------------------------------------------- commands
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
        dataset = data.image_folder(path, image_size, channels=channels or 3)  # no size: follows the job
        labels = np.asarray(dataset.targets)
    else:
        dataset = data.cifar10(path, train=True, image_size=image_size)  # no size: follows the job
        labels = np.asarray(dataset.targets)
    try:
        parts = data.dirichlet_partition(labels, num, partition, seed)
    except ValueError as exc:
        raise CliError(f"cannot partition {len(labels)} samples: {exc}", "use fewer --num-partitions") from None
    return Subset(dataset, parts[index].tolist())


def operator_api(args: argparse.Namespace, timeout: float = 30.0) -> Api:
    return Api(args.coordinator, timeout=timeout, token=operator_token(args.token_file), verify=args.ca)


def cmd_manage_clients(args: argparse.Namespace) -> int:
    api = operator_api(args)
    if args.client_command == "revoke":
        api.request("DELETE", f"/clients/{args.revoke_id}")
        print(f"client {args.revoke_id}: revoked")
        return 0
    clients = api.request("GET", "/clients")["clients"]
    rows = [[c["id"], c.get("name", ""), "online" if c.get("online") else "offline"] for c in clients]
    print(format_table(["client", "name", "state"], rows) if rows else "no clients")
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    from coordinator.auth.credentials import Credentials
    from coordinator.storage.store import Store

    data_dir = Path(args.data_dir)
    if not (data_dir / "fedsight.db").is_file():
        raise CliError(f"{data_dir} is not a coordinator data directory (no fedsight.db)",
                       "pass the --data-dir the coordinator was started with")
    store = Store(data_dir / "fedsight.db")
    try:
        creds = Credentials(data_dir, store)
        creds.rotate(args.secret)
        print(f"new {args.secret} written to {creds.path(args.secret)} (mode 600); the old one no longer works")
    finally:
        store.close()
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    if args.client_command is not None:
        return cmd_manage_clients(args)
    if not 0 <= args.partition_index < args.num_partitions:
        raise CliError(f"--partition-index {args.partition_index} is outside 0..{args.num_partitions - 1}",
                       "pass an index below --num-partitions")
    import torch

    from edge_sdk.client import EdgeClient

    torch.set_num_threads(args.threads)
    shard = load_partition(args.dataset, args.partition, args.num_partitions, args.partition_index, args.seed,
                           args.image_size, args.channels)
    cache = args.cache_dir or f"~/.cache/fedsight/client-{args.partition_index}"
    secret = None
    if args.enroll_secret_file:
        try:
            secret = Path(args.enroll_secret_file).expanduser().read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read --enroll-secret-file: {exc}") from None
    _sigterm_as_interrupt()
    try:
        client = EdgeClient(args.coordinator, dataset=shard, client_id=args.client_id, token=args.token,
                            device_key=args.device_key, enroll_secret=secret,
                            name=args.name or f"sim-{args.partition_index}", broker_url=args.broker,
                            cache_dir=cache, jobs=args.job or None, ca_file=args.ca)
    except (RuntimeError, ValueError) as exc:  # registration refused: wrong URL, secret or credentials
        raise CliError(str(exc), "check --coordinator, --enroll-secret-file (and --client-id/--token/--device-key "
                                 "if given)") from None
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
                max_update_bytes=args.max_update_bytes, strategy=args.strategy, input_scale=args.input_scale,
                stall_timeout_s=args.stall_timeout, on_stall=args.on_stall)
    body["model"] = pick(arch=args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                         image_size=args.image_size)
    body["train"] = pick(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mu=args.mu,
                         freeze_backbone=args.freeze_backbone or None, backbone_lr_mult=args.backbone_lr_mult,
                         bn_recalibrate=args.bn_recalibrate, logit_adjust=args.logit_adjust,
                         max_steps=args.max_steps)
    kind, path = args.eval or (None, None)
    if kind == "none":
        if args.holdout:
            raise CliError("--eval none turns evaluation off; it cannot go with --holdout", "drop one of them")
        body["eval"] = None
    elif kind or args.holdout is not None:
        body["eval"] = pick(dataset=kind, path=path, holdout_fraction=args.holdout)
    body.update(privacy_flags(args))
    body.update(secagg_flags(args))
    if (args.mean is None) != (args.std is None):
        raise CliError("--mean and --std go together", "give both, e.g. --mean 0.5 --std 0.5")
    if args.mean is not None:
        body["normalization"] = {"mean": args.mean, "std": args.std}
    return body


def create_job(api: Api, body: dict[str, Any], weights: str | None) -> dict[str, Any]:
    """POST /jobs: plain JSON, or multipart with the weights file so a remote coordinator receives it."""
    if weights is None:
        return api.request("POST", "/jobs", json=body)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CliError(f"weights file not found: {path}", "save one with torch.save(model.state_dict(), FILE)")
    with path.open("rb") as fh:
        upload = copy.copy(api)  # same coordinator, token and CA; a longer timeout for the file
        upload.timeout = max(api.timeout, 300.0)
        return upload.request(
            "POST", "/jobs", data={"job": json.dumps(body)},
            files={"weights": (path.name, fh, "application/octet-stream")})


def _job_id(job: dict[str, Any]) -> str:
    return str(job.get("id") or job.get("job_id"))


def cmd_job(args: argparse.Namespace) -> int:
    api = operator_api(args, timeout=120 if args.job_command == "create" else 30)  # create builds a model
    if args.job_command == "create":
        job = create_job(api, job_body(args), args.weights)
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
        print(f"evaluation: {eval_summary(cfg)}")
        if privacy_summary(job):
            print(privacy_summary(job))
        if job.get("reason"):
            print(f"finished early: {job['reason']}")
        if job.get("notice"):
            print(f"notice: {job['notice']}")
        if job.get("error") and job.get("error") != job.get("notice"):
            print(f"{'waiting' if job.get('status') == 'paused' else 'error'}: {job['error']}")
        print(format_table(*rounds_table(rounds)) if rounds else "no rounds yet")
        for note in eval_notes(rounds):
            print(note)
    return 0


def export_local(data_dir: Path, job_id: str, version: str | None) -> tuple[bytes, str]:
    """Export from a coordinator's data directory without a running server (same cache as the server)."""
    from coordinator.storage.exports import ExportFailed
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
        resp = operator_api(args, timeout=180).request(
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
    from coordinator.cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__})
    _sigterm_as_interrupt()  # children are cleaned up by run_demo's finally on SIGTERM too
    summary = run_demo(cfg, say=lambda line: print(line, flush=True),
                       complain=lambda line: print(line, file=sys.stderr, flush=True))
    return 0 if summary["ok"] else 1


def _sigterm_as_interrupt() -> None:
    """`kill` stops long-running commands the same clean way Ctrl-C does (devices announce offline)."""
    def handler(_signum: int, _frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def build_parser() -> argparse.ArgumentParser:
    return parser.build_parser({"coordinator": cmd_coordinator, "client": cmd_client, "job": cmd_job,
                                    "export": cmd_export, "infer": cmd_infer, "demo": cmd_demo, "auth": cmd_auth,
                                    "certs": cmd_certs})


# What each command needs beyond the torch-free base install (setup.py extras).
EXTRA_FOR = {"client": "edge", "coordinator": "server", "demo": "server", "job": "server", "export": "server",
             "certs": "server"}


def _missing_extra(exc: BaseException, command: str) -> CliError | None:
    """A package left out of a slim install is a setup step, not a bug: name the extra to install."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name or command not in EXTRA_FOR:
        return None
    extra = EXTRA_FOR[command]
    return CliError(f"`fedsight {command}` needs {exc.name.split('.')[0]!r}, which this install lacks",
                    f'pip install "fedsight[{extra}]" (from a checkout: pip install ".[{extra}]")')


def _user_error(exc: BaseException) -> CliError | None:
    """Library exceptions that mean 'fix your input or setup' become CliError; anything else is a bug."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, (FileNotFoundError, ConnectionError)):
        return CliError(str(exc))
    for module, name in [("edge_sdk.protocol.errors", "ProtocolError"), ("converters.onnx_export", "ExportError"),
                         ("edge_sdk.models", "WeightsMismatchError"), ("requests", "RequestException"),
                         ("edge_sdk.data", "DatasetNotFoundError"), ("coordinator.cli.demo", "DemoError"),
                         ("coordinator.mqtt.accounts", "BrokerAccountError")]:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            if module == "requests":  # its messages are walls of urllib3 detail
                url = getattr(getattr(exc, "request", None), "url", None) or "the server"
                if isinstance(exc, sys.modules["requests"].exceptions.SSLError):
                    return CliError(f"TLS verification of {url} failed", TLS_HINT)
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
        err = _missing_extra(exc, args.command) or _user_error(exc)
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
