"""Throughput of the SDK's LocalTrainer vs a plain hand-written PyTorch loop.

Both sides train the same architecture from the same init, with the same batch size, precision (bf16
autocast + channels_last on CUDA, fp32 on CPU), SGD(momentum=0.9) and the same in-memory data: the
baseline cuts shuffled batches by indexing resident tensors (the fastest plain loop, no DataLoader), with
no metric tracking at all. The SDK side is a full ``LocalTrainer.train`` call (setup, loss/accuracy
tracking over the epoch, the final sync). Warmup runs are excluded; the two sides alternate ``--reps``
times and the best run of each is compared (on a shared machine interference only ever slows a run down,
so the fastest run is the best estimate of each loop's own cost; medians are kept in the JSON too).

    python benchmarks/training.py                      # CPU cases, plus CUDA cases when a GPU is present
    python benchmarks/training.py --device cuda --steps 200

Writes benchmarks/results/training.json (merged per device type) and the section between
``<!-- training:start -->`` and ``<!-- training:end -->`` in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from benchmarks.report import write_section  # noqa: E402
from edge_sdk.data import load_digits_split  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402

log = logging.getLogger("benchmarks.training")
RESULTS = ROOT / "benchmarks" / "results" / "training.json"


@dataclass
class Case:
    name: str
    arch: str
    image_size: int
    in_channels: int
    batch_size: int
    steps: int
    data: str  # "digits" or "random"
    device: str


def cases(device: str, steps: int | None, quick: bool) -> list[Case]:
    if device == "cpu":
        return [
            Case("small_cnn digits 8px", "small_cnn", 8, 1, 32, steps or (150 if quick else 400), "digits", "cpu"),
            Case("mobilenet_v3_small 64px", "mobilenet_v3_small", 64, 3, 32, steps or (15 if quick else 40),
                 "random", "cpu"),
        ]
    return [
        Case("mobilenet_v3_small 224px bf16+CL", "mobilenet_v3_small", 224, 3, 128, steps or 200, "random", "cuda"),
        Case("resnet18 224px bf16+CL", "resnet18", 224, 3, 128, steps or 200, "random", "cuda"),
    ]


def make_data(case: Case, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if case.data == "digits":
        train, _ = load_digits_split(image_size=case.image_size, channels=case.in_channels)
        x, y = train.tensors
        reps = -(-n // len(y))
        return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()
    dev = torch.device(case.device)
    if dev.type == "cuda":  # generate in place: a 224px CUDA run holds several GiB of images
        g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, case.in_channels, case.image_size, case.image_size, generator=g, device=dev)
    return x, torch.randint(0, 10, (n,), generator=g, device=dev)


def plain_loop(model: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch_size: int,
               device: torch.device, amp: bool, channels_last: bool, seed: int = 0) -> None:
    """The reference: what a PyTorch user writes by hand for in-memory data."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x_all, y_all = x_all.to(device), y_all.to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = len(y_all)
    perm = torch.randperm(n, generator=gen).to(device)
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        x, y = x_all[idx], y_all[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)


def run_case(case: Case, warmup: int, reps: int) -> dict:
    dev = torch.device(case.device)
    cuda = dev.type == "cuda"
    n = case.steps * case.batch_size
    x, y = make_data(case, n)
    trainer = LocalTrainer(device=dev, mixed_precision=cuda, channels_last=cuda, max_device_bytes=1 << 40)
    torch.manual_seed(0)
    init = build_model(case.arch, 10, case.in_channels)
    sdk_model, plain_model = copy.deepcopy(init), copy.deepcopy(init)
    cfg = {"epochs": 1, "batch_size": case.batch_size, "lr": 0.01, "seed": 0}
    warm = TensorDataset(x[: warmup * case.batch_size], y[: warmup * case.batch_size])
    full = TensorDataset(x, y)

    def sdk() -> float:
        t0 = time.perf_counter()
        trainer.train(sdk_model, full, cfg)  # ends with a device sync (metrics read back)
        return time.perf_counter() - t0

    def plain() -> float:
        t0 = time.perf_counter()
        plain_loop(plain_model, x, y, case.batch_size, dev, cuda, cuda)
        return time.perf_counter() - t0

    trainer.train(sdk_model, warm, cfg)
    plain_loop(plain_model, *warm.tensors, case.batch_size, dev, cuda, cuda)
    sdk_t, plain_t = [], []
    for r in range(reps):  # alternate, and swap who goes first, to spread machine noise evenly
        order = (sdk, plain) if r % 2 == 0 else (plain, sdk)
        for fn in order:
            (sdk_t if fn is sdk else plain_t).append(fn())
    sdk_ips = [n / t for t in sdk_t]
    plain_ips = [n / t for t in plain_t]
    out = {
        "case": case.name, "arch": case.arch, "image_size": case.image_size, "batch_size": case.batch_size,
        "steps": case.steps, "device": case.device, "precision": "bf16+channels_last" if cuda else "fp32",
        "sdk_images_per_s": max(sdk_ips), "plain_images_per_s": max(plain_ips),
        "sdk_median_images_per_s": statistics.median(sdk_ips),
        "plain_median_images_per_s": statistics.median(plain_ips),
        "sdk_runs": sdk_ips, "plain_runs": plain_ips,
    }
    out["ratio"] = out["sdk_images_per_s"] / out["plain_images_per_s"]
    log.info("%-34s sdk %9.1f img/s  plain %9.1f img/s  ratio %.3f", case.name, out["sdk_images_per_s"],
             out["plain_images_per_s"], out["ratio"])
    return out


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_markdown(results: dict) -> None:
    lines = ["Best of alternating runs (images/s), warmup excluded; ratio = SDK / plain (target >= 0.95).",
             "Medians and every run are in `benchmarks/results/training.json`.", ""]
    for dev_type, block in results.items():
        lines += [f"**{dev_type}** — {json.dumps(block['environment'])}", "",
                  "| case | batch | steps | precision | SDK img/s | plain img/s | ratio |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in block["cases"]:
            lines.append(f"| {r['case']} | {r['batch_size']} | {r['steps']} | {r['precision']} | "
                         f"{r['sdk_images_per_s']:.1f} | {r['plain_images_per_s']:.1f} | {r['ratio']:.3f} |")
        lines.append("")
    commands = " ; ".join(dict.fromkeys(block["command"] for block in results.values()))
    write_section("training", "Training throughput: LocalTrainer vs plain PyTorch loop", commands, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU cases, plus CUDA cases when a GPU is present")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default per case)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warmup steps per side")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per side")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer CPU steps (~1 min)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("edge_sdk").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if not torch.cuda.is_available():
        if args.device == "cuda":
            ap.error("no CUDA device available")
        devices = [d for d in devices if d != "cuda"]
    command = "python benchmarks/training.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                  " " + shlex.join(sys.argv[1:] if argv is None else argv))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for dev in devices:
        rows = [run_case(c, args.warmup, args.reps) for c in cases(dev, args.steps, args.quick)]
        results[dev] = {"environment": environment(dev), "command": command, "cases": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    log.info("wrote %s and BENCHMARKS.md", RESULTS.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
