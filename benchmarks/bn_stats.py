"""BatchNorm under federation: eval-mode accuracy of the global model with each way of handling running stats.

Same shards, rounds, seeds and bytes for every row (in-process FedAvg, ``benchmarks/fedsim.py``), on the
generated 10-class 32 px shapes set (``benchmarks/shapes_dataset.py``) split over 5 devices, Dirichlet 0.5:

* torchvision as built, no re-estimation (what product code did before: momentum 0.01 for MobileNetV3);
* BatchNorm momentum patched to 0.1 (what benchmarks/compression.py used to do);
* re-estimated running statistics after local training (``LocalTrainer`` default, ``edge_sdk/bn_stats.py``).

The "batch stats" column evaluates the same weights with BatchNorm in train mode over whole test batches: what
the weights can do when statistics are not the problem.

    nice -n 10 python benchmarks/bn_stats.py --rounds 10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fedsim import federate, load_tensors  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from benchmarks.shapes_dataset import TARGET, write_task  # noqa: E402
from edge_sdk.data import dirichlet_partition  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402

VARIANTS = (("torchvision BN, no re-estimation", None, False), ("momentum 0.1, no re-estimation", 0.1, False),
            ("re-estimated after local training (default)", None, True))


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, test: TensorDataset, batch: int = 500) -> float:
    was = model.training
    model.train()
    x, y = test.tensors
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return correct / len(y)


def run(arch: str, variant: tuple[str, float | None, bool], train: TensorDataset, test: TensorDataset,
        rounds: int, epochs: int) -> dict:
    label, momentum, recal = variant
    torch.manual_seed(0)
    model = build_model(arch, 10, 3)
    if momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    shards = dirichlet_partition(train.tensors[1].numpy(), 5, 0.5, seed=0)
    cfg = {"epochs": epochs, "batch_size": 32, "lr": 0.05, "bn_recalibrate": recal}
    res = federate(model, train, test, shards, rounds, cfg)
    model.eval()
    return {"arch": arch, "variant": label, "rounds": rounds, "epochs": epochs,
            "eval_accuracy": res.final_accuracy, "accuracy_per_round": res.accuracy_per_round,
            "batch_stats_accuracy": batch_stats_accuracy(model, test), "uplink_bytes": res.uplink_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--archs", default="mobilenet_v3_small,small_cnn")
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, test_dir = write_task(Path(tmp), TARGET, args.per_class, 100, seed=0)
        train, test = load_tensors(train_dir), load_tensors(test_dir)
    results = []
    for arch in args.archs.split(","):
        for variant in VARIANTS:
            results.append(run(arch, variant, train, test, args.rounds, args.epochs))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "accuracy_per_round"}), flush=True)
    out = ROOT / "benchmarks" / "results" / "bn_stats.json"
    out.write_text(json.dumps(results, indent=2))
    lines = [f"5 devices, Dirichlet 0.5, {args.rounds} rounds x {args.epochs} local epoch(s), dense FedAvg, "
             f"{len(train)} training / {len(test)} test images (generated shapes, 32 px).", "",
             "| arch | running statistics | eval-mode accuracy (= ONNX) | batch-stats accuracy |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['variant']} | {r['eval_accuracy']:.3f} | {r['batch_stats_accuracy']:.3f} |"
              for r in results]
    command = f"python benchmarks/bn_stats.py --rounds {args.rounds} --epochs {args.epochs} --archs {args.archs}"
    write_section("bn_stats", "BatchNorm statistics under federation", command, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
