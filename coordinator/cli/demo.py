"""``fedsight demo``: a whole federation on one machine, start to ONNX, in a couple of minutes.

An in-process coordinator with the embedded MQTT broker (free loopback ports; HTTPS and mqtts with a fresh
private CA unless ``--insecure``), N simulated device
*processes* on non-IID (Dirichlet) shards of the digits training split, one small_cnn job evaluated on the
held-out test split, a progress bar fed by the REST rounds endpoint, then the ONNX export evaluated with
onnxruntime next to PyTorch, a chart and ``summary.json``. Every child process is stopped on success,
failure and Ctrl-C alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The best configuration measured in benchmarks/compression.py (BENCHMARKS.md): 0.3 % top-k, 1-bit values, Rice
# positions, density warm-up from 25 % over 6 rounds, server momentum. It is used as a pair: the sparse
# codec relies on the server momentum (--codec alone keeps plain FedAvg).
DEFAULT_CODEC = "topk:0.003:sign:rice:warmup=6/0.25"
DEFAULT_STRATEGY: dict[str, Any] = {"name": "fedavgm", "beta": 0.7, "eta": 0.7}
_LOGGERS = ("coordinator", "edge_sdk", "converters", "amqtt", "cheroot")


@dataclass
class DemoConfig:
    clients: int = 10
    rounds: int = 30
    alpha: float = 0.5
    codec: dict[str, Any] | None = None  # None: DEFAULT_CODEC with DEFAULT_STRATEGY
    out: Path = Path("./fedsight-demo")
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 32
    clients_per_round: int | None = None  # default: every device, every round
    round_timeout: float = 60.0
    seed: int = 0
    timeout: float = 900.0
    progress: bool = True
    insecure: bool = False
    epsilon: float | None = None  # a DP job with this budget (delta below); None: no differential privacy
    delta: float = 1e-5


def add_demo_arguments(p: argparse.ArgumentParser, codec_type: Callable[[str], Any]) -> None:
    d = DemoConfig()
    p.add_argument("--clients", type=int, default=d.clients, help="simulated devices (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="(default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="Dirichlet label skew; smaller = more non-IID (default: %(default)s)")
    p.add_argument("--codec", type=codec_type, default=None,
                   help=f"update codec (default: {DEFAULT_CODEC} with server momentum; a codec given here "
                        "runs with plain FedAvg)")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per round (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="local learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--clients-per-round", type=int, help="devices selected per round (default: all)")
    p.add_argument("--round-timeout", type=float, default=d.round_timeout, help="seconds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="give up after this many seconds "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--insecure", action="store_true", help="plain HTTP and MQTT instead of HTTPS and mqtts")
    p.add_argument("--epsilon", type=float, help="client-level differential privacy with this budget "
                   "(docs/privacy.md); the job stops before it would exceed it (default: no DP)")
    p.add_argument("--delta", type=float, default=d.delta, help="DP delta with --epsilon (default: %(default)s)")


class DemoError(RuntimeError):
    """The demo could not complete; the message points at the log that says why."""


def _clean_dir(path: Path, marker: str) -> None:
    """Remove a previous run's folder, but only if it is recognisably ours."""
    if path.exists():
        if not (path / marker).exists() and any(path.iterdir()):
            raise DemoError(f"{path} exists and is not from a previous demo run; pick another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _log_to_file(path: Path) -> logging.Handler:
    """Server-side logs go to a file so the console shows only the progress bar and the results."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return handler


def _start_devices(cfg: DemoConfig, url: str, job_id: str, logs: Path, caches: Path,
                   enroll_secret_file: Path, ca_file: Path | None) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding coordinator/ and edge_sdk/
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for i in range(cfg.clients):
        cmd = [sys.executable, "-m", "coordinator.cli", "client", "--coordinator", url, "--dataset", "digits",
               "--partition", f"dirichlet:{cfg.alpha}", "--num-partitions", str(cfg.clients),
               "--partition-index", str(i), "--seed", str(cfg.seed), "--cache-dir", str(caches / f"device-{i}"),
               "--enroll-secret-file", str(enroll_secret_file),
               "--job", job_id, "--max-jobs", "1", "--threads", "1", "--timeout", str(cfg.timeout)]
        cmd += ["--ca", str(ca_file.resolve())] if ca_file is not None else []
        with open(logs / f"device-{i}.log", "wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=root))
    return procs


def _stop_devices(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Devices exit by themselves after the job; stragglers get SIGTERM (they go offline cleanly), then KILL."""
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    for p in alive:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _check_devices(procs: list[subprocess.Popen], logs: Path) -> None:
    """Fail fast (with the evidence) when no device is left, instead of waiting for round timeouts."""
    if procs and all(p.poll() is not None for p in procs):
        log_path = logs / "device-0.log"
        raise DemoError(f"all devices exited (codes {sorted({p.returncode for p in procs})}); "
                        f"last lines of {log_path}:\n{_tail(log_path)}")


def _round_rows(rows: list[dict[str, Any]], numel: int) -> list[dict[str, Any]]:
    """One record per round: the closed attempt's accuracy, all attempts' traffic. ``uplink_bytes`` counts
    accepted updates only (so the compression shown compares like with like); rejected and junk bytes are
    kept apart in ``rejected_bytes``."""
    out: dict[int, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["round"], r["attempt"])):
        rec = out.setdefault(r["round"], {"round": r["round"], "accuracy": None, "uplink_bytes": 0,
                                          "dense_bytes": 0, "rejected_bytes": 0, "accepted": 0, "rejected": 0,
                                          "junk": 0, "closed": False})
        rec["uplink_bytes"] += int(r.get("uplink_bytes") or 0)
        rec["dense_bytes"] += 4 * numel * int(r.get("accepted") or 0)  # raw fp32 (4 x numel), no header, no zlib
        rec["rejected_bytes"] += int(r.get("rejected_bytes") or 0) + int(r.get("junk_bytes") or 0)
        rec["accepted"] += int(r.get("accepted") or 0)
        rec["rejected"] += int(r.get("rejected") or 0)
        rec["junk"] += int(r.get("junk") or 0)
        if r.get("status") == "closed":
            rec["closed"] = True
            rec["accuracy"] = (r.get("eval") or {}).get("accuracy")
            rec["compression_ratio"] = r.get("compression_ratio")
            rec["epsilon"] = (r.get("privacy") or {}).get("epsilon")  # DP jobs: total spent after this round
            rec["duration_s"] = r.get("duration_s")
    return [out[k] for k in sorted(out)]


def _follow(cfg: DemoConfig, rest: Callable[..., Any], job_id: str, numel: int, procs: list[subprocess.Popen],
            logs: Path, deadline: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from tqdm import tqdm

    from coordinator.cli.chart import human_bytes

    bar = tqdm(total=cfg.rounds, unit="round", desc="federated rounds", disable=not cfg.progress, file=sys.stdout,
               dynamic_ncols=True)
    done = 0
    try:
        while True:
            job = rest("GET", f"/jobs/{job_id}").json()
            rows = _round_rows(rest("GET", f"/jobs/{job_id}/rounds").json()["rounds"], numel)
            closed = [r for r in rows if r["closed"]]
            if len(closed) > done:
                last = closed[-1]
                # a round's version is scored in the background: show the newest score there is
                acc = next((r["accuracy"] for r in reversed(closed) if r["accuracy"] is not None), None)
                bar.set_postfix_str(f"acc {acc * 100:.1f}% uplink {human_bytes(last['uplink_bytes'])}"
                                    if acc is not None else f"uplink {human_bytes(last['uplink_bytes'])}")
                bar.update(len(closed) - done)
                done = len(closed)
            if job["status"] in ("finished", "failed", "stopped"):
                return job, rows
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {cfg.timeout:.0f}s at round {done}/{cfg.rounds}; "
                                f"see {logs / 'coordinator.log'}")
            _check_devices(procs, logs)
            time.sleep(0.5)
    finally:
        bar.close()


def _evaluate_exports(model_bytes: bytes, onnx_bytes: bytes) -> dict[str, float]:
    """Accuracy of the final global model in PyTorch and of its ONNX export (onnxruntime) on the same test set."""
    import numpy as np
    import torch

    from edge_sdk.data import load_digits_split
    from edge_sdk.inference import OnnxClassifier
    from edge_sdk.models import build_model
    from edge_sdk.params import load_arrays
    from edge_sdk.protocol.modelfile import load_model

    arrays, meta = load_model(model_bytes)
    _, test = load_digits_split(image_size=int(meta["image_size"]), channels=int(meta["in_channels"]))
    x, y = test.tensors
    model = build_model(meta["arch"], int(meta["num_classes"]), in_channels=int(meta["in_channels"]))
    load_arrays(model, arrays)
    with torch.inference_mode():
        torch_pred = model.eval()(x).argmax(1).numpy()
    onnx_pred = np.array([p.label for p in OnnxClassifier(onnx_bytes).predict_tensor(x.numpy())])
    labels = y.numpy()
    return {"pytorch_accuracy": float((torch_pred == labels).mean()),
            "onnx_accuracy": float((onnx_pred == labels).mean()),
            "prediction_agreement": float((torch_pred == onnx_pred).mean()), "test_samples": int(len(labels))}


def _job_body(cfg: DemoConfig) -> dict[str, Any]:
    from converters.spec_text import parse_codec

    k = cfg.clients_per_round or cfg.clients
    return {"name": f"demo-{cfg.clients}clients-alpha{cfg.alpha}",
            "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": cfg.rounds, "clients_per_round": k, "min_clients": max(1, math.ceil(0.6 * k)),
            "round_timeout_s": cfg.round_timeout, "codec": cfg.codec or parse_codec(DEFAULT_CODEC),
            "eval": {"dataset": "digits"}, "seed": cfg.seed,
            **({} if cfg.codec else {"strategy": DEFAULT_STRATEGY}),
            "train": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr},
            **({"privacy": {"epsilon": cfg.epsilon, "delta": cfg.delta}} if cfg.epsilon is not None else {})}


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = log.info,
             complain: Callable[[str], None] = log.error) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also written to ``<out>/summary.json``).

    ``say`` / ``complain`` receive the lines meant for a person (the CLI prints them to stdout / stderr)."""
    import torch

    from converters.spec_text import codec_label
    from coordinator.cli.chart import human_bytes, plot_rounds
    from coordinator.cli.rest_client import Api, CliError
    from coordinator.server import start
    from edge_sdk.protocol.modelfile import flatten, load_model

    started = time.monotonic()
    torch.set_num_threads(1)  # leave the cores to the devices
    out = Path(cfg.out).resolve()  # device processes run in another directory: give them absolute paths
    out.mkdir(parents=True, exist_ok=True)
    data_dir, logs, caches = out / "coordinator-data", out / "logs", out / "devices"
    _clean_dir(data_dir, "fedsight.db")
    _clean_dir(caches, "device-0")
    logs.mkdir(exist_ok=True)
    for stale in ("summary.json", "chart.png", "model.onnx"):
        (out / stale).unlink(missing_ok=True)
    handler = _log_to_file(logs / "coordinator.log")
    procs: list[subprocess.Popen] = []
    handle = None
    finished = False
    try:
        handle = start("127.0.0.1", 0, data_dir, "embedded", broker_port=0, insecure=cfg.insecure)
        creds = handle.services.credentials  # in-process: the demo reads the secrets the coordinator wrote
        api = Api(handle.url, timeout=120, token=creds.path("operator-token").read_text().strip(),
                  verify=handle.ca_file)

        def rest(method: str, path: str, **kw: Any) -> Any:
            return api.request(method, path, raw=True, **kw)

        job = rest("POST", "/jobs", json=_job_body(cfg)).json()
        job_id = job["id"]
        numel = int(flatten(load_model(handle.services.models.get(job["current_version"]))[0]).size)
        say(f"coordinator {handle.url}, MQTT {handle.broker_url}; job {job_id}: small_cnn on digits, "
              f"{cfg.clients} devices (Dirichlet alpha={cfg.alpha}), {cfg.rounds} rounds, codec "
              f"{codec_label(job['config']['codec'])}; logs in {logs}")
        say(f"TLS: devices verify HTTPS and mqtts with {handle.ca_file}" if handle.ca_file else
            "no TLS (--insecure): plain HTTP and MQTT")
        procs = _start_devices(cfg, handle.url, job_id, logs, caches, creds.path("enroll-secret"), handle.ca_file)
        deadline = started + cfg.timeout
        while sum(c["online"] for c in rest("GET", "/clients").json()["clients"]) < cfg.clients:
            _check_devices(procs, logs)
            if time.monotonic() > deadline:
                raise DemoError(f"devices did not come online; see {logs / 'device-0.log'}")
            time.sleep(0.3)
        say(f"{cfg.clients} devices online after {time.monotonic() - started:.1f}s")
        rest("POST", f"/jobs/{job_id}/start")
        job, rounds = _follow(cfg, rest, job_id, numel, procs, logs, deadline)
        if job["status"] != "finished":
            raise DemoError(f"job ended as {job['status']}: {job.get('error')}; see {logs / 'coordinator.log'}")
        finished = True  # devices now leave by themselves (--max-jobs 1)
        train_s = time.monotonic() - started
        report = rest("POST", f"/jobs/{job_id}/export", json={}).json()
        onnx_bytes = rest("GET", f"/jobs/{job_id}/onnx").content
        onnx_path = out / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        scores = _evaluate_exports(handle.services.models.get(job["current_version"]), onnx_bytes)
        metrics = rest("GET", f"/jobs/{job_id}/metrics").json()["metrics"]
        base = [m for m in metrics if m["round"] == 0 and m["source"] == "eval" and m["name"] == "accuracy"]
        chart_rows = ([{"round": 0, "accuracy": base[0]["value"], "uplink_bytes": 0}] if base else []) + rounds
        chart = plot_rounds(chart_rows, out / "chart.png", onnx_accuracy=scores["onnx_accuracy"],
                            title=f"FedSight demo: {cfg.clients} devices, non-IID digits (alpha={cfg.alpha}), "
                                  f"codec {codec_label(job['config']['codec'])}")
        sent, dense = sum(r["uplink_bytes"] for r in rounds), sum(r["dense_bytes"] for r in rounds)
        summary = {
            "ok": True, "job_id": job_id, "config": {**asdict(cfg), "out": str(cfg.out)},
            "codec": job["config"]["codec"], "codec_label": codec_label(job["config"]["codec"]),
            "numel": numel, "rounds": rounds, "initial_accuracy": base[0]["value"] if base else None,
            "final_server_eval_accuracy": rounds[-1]["accuracy"] if rounds else None, **scores,
            "onnx_max_abs_diff": report.get("max_abs_diff"), "onnx_path": str(onnx_path),
            "onnx_bytes": len(onnx_bytes), "chart_path": str(chart), "uplink_bytes_total": sent,
            "dense_fp32_bytes_total": dense, "uplink_reduction": dense / sent if sent else None,
            "uplink_reduction_basis": "vs raw fp32 (4 bytes x numel per accepted update)",
            "rejected_bytes_total": sum(r["rejected_bytes"] for r in rounds),
            "train_wall_time_s": round(train_s, 2), "wall_time_s": round(time.monotonic() - started, 2),
            "privacy": job.get("privacy"), "finish_reason": job.get("reason"),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"final accuracy on {scores['test_samples']} held-out digits: PyTorch {scores['pytorch_accuracy']:.2%}"
              f", ONNX (onnxruntime) {scores['onnx_accuracy']:.2%} (agreement {scores['prediction_agreement']:.2%}, "
              f"max |logit diff| {report.get('max_abs_diff', float('nan')):.1e})")
        refused = summary["rejected_bytes_total"]
        say(f"uplink: {human_bytes(sent)} in accepted updates vs {human_bytes(dense)} as raw fp32 (4 B x numel) "
              f"({summary['uplink_reduction'] or 0:.1f}x less vs raw fp32)"
              + (f"; {human_bytes(refused)} rejected" if refused else "")
              + f"; wall time {summary['wall_time_s']:.1f}s")
        if job.get("privacy"):
            p = job["privacy"]
            say(f"privacy: epsilon {p['epsilon_spent']:.3f} of {p['target_epsilon']:g} spent (delta {p['delta']:g}) "
                f"over {p['rounds_released']} round(s), noise multiplier {p['noise_multiplier']:.3g}"
                + (f"; {job['reason']}" if job.get("reason") else ""))
        say(f"wrote {chart}, {out / 'summary.json'}, {onnx_path}")
        return summary
    except BaseException as exc:  # every way out leaves a summary that says why
        error = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        failure = {"ok": False, "error": error, "wall_time_s": round(time.monotonic() - started, 2)}
        (out / "summary.json").write_text(json.dumps(failure, indent=2) + "\n")
        if isinstance(exc, (DemoError, CliError)):
            complain(f"demo failed: {exc}")
            return failure
        raise
    finally:
        _stop_devices(procs, grace=10.0 if finished else 0.0)
        if handle is not None:
            handle.stop()
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
