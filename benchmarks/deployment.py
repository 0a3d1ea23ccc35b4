"""From demo to deployment: federated training through the CLI only, scored by the exported ONNX model.

For each architecture and codec: a generated 10-class 32 px colour shapes set (``shapes_dataset.py``, held-out
test split) is trained by ``fedsight coordinator`` + 5 ``fedsight client`` device processes (Dirichlet 0.5
partitions of the ImageFolder tree) with ``fedsight job create/status``, exported with ``fedsight export`` and
scored with ``fedsight infer`` on the test folder. The ceiling next to each row is plain centralised PyTorch
training (SGD, same lr, batch size, epochs = rounds x local epochs) of the same architecture on the same
images, evaluated in eval mode. Target: federated ONNX accuracy >= 85 % of that ceiling.

    nice -n 10 python benchmarks/deployment.py                       # full run
    nice -n 10 python benchmarks/deployment.py --smoke               # small_cnn dense, 2 rounds, tiny set
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fedsim import load_tensors  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from benchmarks.shapes_dataset import TARGET, write_task  # noqa: E402
from benchmarks.cli_cluster import Cluster  # noqa: E402
from coordinator.cli.chart import human_bytes  # noqa: E402
from edge_sdk.data import IMAGENET_NORMALIZATION  # noqa: E402
from edge_sdk.bn_stats import recalibrate_batchnorm, training_batchnorms  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402

log = logging.getLogger("deployment")
TARGET_SHARE = 0.85
RESULTS = ROOT / "benchmarks" / "results" / "deployment.json"


def centralised(arch: str, train_dir: Path, test_dir: Path, epochs: int, lr: float, batch: int,
                seed: int = 0) -> dict[str, Any]:
    """Plain PyTorch: one model, all training images, SGD(momentum 0.9), eval-mode accuracy on the test set.

    The ceiling is the better of the plain model and the same model with its BatchNorm statistics re-estimated
    over the training images (what the SDK does after local training): torchvision's MobileNetV3/EfficientNet
    BatchNorm momentum of 0.01 can leave plain eval-mode statistics behind the weights, and a ceiling that low
    would flatter the federated rows."""
    torch.set_num_threads(1)
    train, test = load_tensors(train_dir), load_tensors(test_dir)
    x, y = train.tensors
    torch.manual_seed(seed)
    model = build_model(arch, 10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y) - 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())

    plain = accuracy()
    model.train()
    with torch.no_grad():
        recalibrate_batchnorm(model, training_batchnorms(model), (x[i:i + 256] for i in range(0, len(x), 256)))
    recalibrated = accuracy()
    return {"accuracy": max(plain, recalibrated), "plain_accuracy": plain, "recalibrated_accuracy": recalibrated,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="as `fedsight job create --max-steps`: SGD steps per device per round (0: whole epochs)")
    parser.add_argument("--archs", default="small_cnn,mobilenet_v3_small,resnet18")
    parser.add_argument("--codecs", default="dense,topk:0.01:int8")
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--strategy", default=None,
                        help="job strategy (name or JSON, as `fedsight job create --strategy`); default: the job default")
    parser.add_argument("--logit-adjust", type=float, default=None,
                        help="as `fedsight job create --logit-adjust`; default: the job default")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--workdir", help="keep data, coordinator state and exports here (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="small_cnn dense, 2 rounds, 30 images per class")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md / results")
    parser.add_argument("--rewrite", action="store_true",
                        help="only re-render the section from benchmarks/results/deployment.json (with --note)")
    parser.add_argument("--note", action="append", default=[], help="a line of analysis under the table")
    parser.add_argument("--recompute-ceilings", action="store_true",
                        help="with --rewrite and the --workdir of the run: train the centralised ceilings again")
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads(RESULTS.read_text())
        rows = saved["rows"]
        if args.recompute_ceilings:
            if not args.workdir:
                parser.error("--recompute-ceilings needs the --workdir of the run (its data/ folder)")
            config = saved["config"]
            data = Path(args.workdir) / "data"
            epochs = ceiling_epochs(argparse.Namespace(**config), config["per_class"] * 10)
            ceilings = {arch: centralised(arch, data / "train", data / "test", epochs, config["lr"],
                                          config["batch_size"]) for arch in dict.fromkeys(r["arch"] for r in rows)}
            rows = finish(rows, ceilings)
        report(argparse.Namespace(**{**saved["config"], "note": args.note}), rows)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.rounds, args.per_class, args.test_per_class = 2, 30, 10
        args.archs, args.codecs = "small_cnn", "dense"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        results = run(args, work, None if args.no_write else lambda rows: report(args, rows))
    if not args.no_write:
        report(args, results)


def run(args: argparse.Namespace, work: Path,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    train_dir, test_dir = write_task(work / "data", TARGET, args.per_class, args.test_per_class, seed=0)
    class_names = sorted(TARGET)  # ImageFolder's label order
    results = []
    ceilings: dict[str, dict[str, Any]] = {}
    archs, codecs = args.archs.split(","), args.codecs.split(",")
    # every arch's first codec (and its ceiling) before any second codec: a cut-short run still covers each arch
    plan = [(arch, codec) for codec in codecs for arch in archs]
    with Cluster(work / "cluster", train_dir, args.devices, args.alpha) as cluster:
        for arch, codec in plan:
            flags = ["--arch", arch, "--num-classes", "10", "--in-channels", "3", "--image-size", "32",
                     "--class-names", ",".join(class_names), "--eval", "none",
                     "--mean", ",".join(map(str, IMAGENET_NORMALIZATION["mean"])),
                     "--std", ",".join(map(str, IMAGENET_NORMALIZATION["std"])),
                     "--rounds", str(args.rounds), "--clients-per-round", str(args.devices),
                     "--min-clients", str(args.devices), "--round-timeout", "1200", "--codec", codec,
                     "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                     "--seed", "0", "--name", f"{arch}-{codec}"]
            if args.strategy:
                flags += ["--strategy", args.strategy]
            if getattr(args, "logit_adjust", None) is not None:
                flags += ["--logit-adjust", str(args.logit_adjust)]
            if args.max_steps:
                flags += ["--max-steps", str(args.max_steps)]
            row = cluster.train_export_infer(flags, test_dir, work / "exports" / f"{arch}-{codec}.onnx")
            row.update(arch=arch, codec=codec)
            log.info("%s %s: ONNX accuracy %.3f %s", arch, codec, row["onnx_accuracy"], json.dumps(row))
            results.append(row)
            if arch not in ceilings:
                epochs = ceiling_epochs(args, len(class_names) * args.per_class)
                log.info("centralised %s, %d epochs", arch, epochs)
                ceilings[arch] = centralised(arch, train_dir, test_dir, epochs, args.lr, args.batch_size)
                log.info("centralised %s: %.3f", arch, ceilings[arch]["accuracy"])
            if on_row is not None:
                on_row(finish(results, ceilings))
    return finish(results, ceilings)


def ceiling_epochs(args: argparse.Namespace, train_images: int) -> int:
    """Centralised epochs that process at least as many samples as the whole fleet did: ``rounds x epochs``, or
    with ``--max-steps`` the fleet's ``rounds x devices x max_steps x batch`` samples in whole epochs, rounded up
    (a device whose shard is smaller than ``max_steps`` batches processes less, so the ceiling never trains less)."""
    full = args.rounds * args.epochs
    steps = getattr(args, "max_steps", 0)
    if not steps:
        return full
    return min(full, math.ceil(args.rounds * args.devices * steps * args.batch_size / train_images))


def finish(results: list[dict[str, Any]], ceilings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the architectures whose ceiling is known, with their share of it."""
    results = [dict(r) for r in results if r["arch"] in ceilings]
    for row in results:
        ceiling = ceilings[row["arch"]]["accuracy"]
        row["centralised_accuracy"] = ceiling
        row["centralised_seconds"] = ceilings[row["arch"]]["seconds"]
        row["centralised_plain_accuracy"] = ceilings[row["arch"]].get("plain_accuracy", ceiling)
        row["share_of_ceiling"] = row["onnx_accuracy"] / ceiling if ceiling > 0 else 0.0
        row["meets_target"] = row["share_of_ceiling"] >= TARGET_SHARE
    dense = {r["arch"]: r["uplink_bytes"] for r in results if r["codec"] == "dense"}
    for row in results:
        row["uplink_ratio_vs_dense"] = dense[row["arch"]] / row["uplink_bytes"] if row["arch"] in dense else None
    return results


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    RESULTS.write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "rewrite"},
                                   "rows": results}, indent=2))
    strategy = getattr(args, "strategy", None)  # absent in results saved before --strategy existed
    adjust = getattr(args, "logit_adjust", None)
    steps = getattr(args, "max_steps", 0)  # absent in results saved before --max-steps existed
    local = f"{args.epochs} local epoch"
    if steps:
        local = (f"at most {steps} SGD steps per device (`--max-steps`; the ceiling trains "
                 f"{ceiling_epochs(args, args.per_class * 10)} epochs, at least the fleet's samples)")
    lines = [f"Generated 10-class 32 px colour shapes (`benchmarks/shapes_dataset.py`): {args.per_class * 10} "
             f"training / {args.test_per_class * 10} held-out test images. {args.devices} `fedsight client` "
             f"processes (Dirichlet {args.alpha}), {args.rounds} rounds x {local}, lr {args.lr}, "
             f"batch {args.batch_size}, strategy {strategy or 'fedavg (job default)'}, logit adjustment "
             f"{'job default' if adjust is None else adjust}; accuracy is `fedsight infer` "
             "on the exported ONNX model over the test "
             "folder. Ceiling: centralised PyTorch training, same images and epochs, the better of its plain eval-mode "
             "accuracy and the same model with BatchNorm statistics re-estimated on the training images (plain in "
             "brackets).", "",
             "| arch | codec | ONNX accuracy (`fedsight infer`) | centralised ceiling | share | >= 85 % | "
             "uplink total | vs dense | wall time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = f"{r['uplink_ratio_vs_dense']:.0f}x less" if r["uplink_ratio_vs_dense"] not in (None, 1.0) else "-"
        plain = r.get("centralised_plain_accuracy", r["centralised_accuracy"])
        lines.append(f"| {r['arch']} | {r['codec']} | {r['onnx_accuracy']:.3f} | {r['centralised_accuracy']:.3f} "
                     f"({plain:.3f}) "
                     f"| {100 * r['share_of_ceiling']:.0f} % | {'yes' if r['meets_target'] else '**no**'} "
                     f"| {human_bytes(r['uplink_bytes'])} | {ratio} | {r['seconds']:.0f} s |")
    for note in getattr(args, "note", []):
        lines += ["", note]
    command = (f"nice -n 10 python benchmarks/deployment.py --rounds {args.rounds} --epochs {args.epochs} "
               f"--archs {args.archs} --codecs {args.codecs} --per-class {args.per_class}"
               + (f" --strategy {strategy}" if strategy else "")
               + (f" --logit-adjust {adjust}" if adjust is not None else "")
               + (f" --max-steps {steps}" if steps else ""))
    write_section("deployment", "From demo to deployment (CLI end to end, ONNX scored)", command, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
