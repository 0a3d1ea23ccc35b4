"""BatchNorm under federation: eval-mode accuracy of the global model with each way of handling running stats.

In-process FedAvg (the device code paths of ``benchmarks/fedsim.py``) on the generated 10-class 32 px shapes
(``benchmarks/shapes_dataset.py``), 5 devices, Dirichlet 0.5. Training uses batch statistics, so the weights
are the same whatever happens to the running statistics: one federation gives every row. Each device trains,
records its running statistics as torchvision leaves them (momentum 0.01 for MobileNetV3, 0.1 for the others),
then re-estimates them (``edge_sdk/bn_stats.py``, the ``LocalTrainer`` default). FedAvg averages each kind.
Columns, all eval mode (= the exported ONNX model) except "batch stats":

* torchvision running averages (what product code did before);
* re-estimated after local training (default now);
* oracle: the global weights with statistics re-estimated on all training data (what a statistics-only round
  after aggregation would give);
* batch stats: BatchNorm in train mode over the whole test set (what the weights can do).

    nice -n 10 python benchmarks/bn_stats.py --rounds 8
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fedsim import load_tensors  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from benchmarks.shapes_dataset import TARGET, write_task  # noqa: E402
from edge_sdk.data import dirichlet_partition  # noqa: E402
from edge_sdk import params  # noqa: E402
from edge_sdk.bn_stats import recalibrate_batchnorm, training_batchnorms  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, test: TensorDataset) -> float:
    x, y = test.tensors
    pred = model.train()(x).argmax(1)
    return float((pred == y).float().mean())


@torch.no_grad()
def eval_accuracy(model: nn.Module, test: TensorDataset) -> float:
    x, y = test.tensors
    return float((model.eval()(x).argmax(1) == y).float().mean())


def _average(states: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: (sum(s[k].astype(np.float64) * w for s, w in zip(states, weights)) / total).astype(v.dtype)
            if np.issubdtype(v.dtype, np.floating) else v for k, v in states[0].items()}


def run(arch: str, train: TensorDataset, test: TensorDataset, rounds: int, lr: float) -> Iterator[dict]:
    """One federation; yields each round's accuracies as soon as they are measured."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 3)
    shards = [Subset(train, s.tolist()) for s in dirichlet_partition(train.tensors[1].numpy(), 5, 0.5, seed=0)]
    trainer = LocalTrainer("cpu")
    stale = fresh = params.state_to_arrays(model)
    for rnd in range(1, rounds + 1):
        kinds: dict[str, list[dict[str, np.ndarray]]] = {"stale": [], "fresh": []}
        for cid, shard in enumerate(shards):
            # both globals hold the same weights (running statistics never change training, which uses batch
            # statistics), so one local run from the stale one gives both kinds of update
            params.load_arrays(model, stale)
            trainer.train(model, shard, {"epochs": 1, "batch_size": 32, "lr": lr, "seed": rnd * 100 + cid,
                                         "bn_recalibrate": False})
            kinds["stale"].append(params.state_to_arrays(model))
            model.train()
            trainer._recalibrate(model, shard)
            kinds["fresh"].append(params.state_to_arrays(model))
        sizes = [len(s) for s in shards]
        stale, fresh = _average(kinds["stale"], sizes), _average(kinds["fresh"], sizes)
        row = {"arch": arch, "round": rnd}
        params.load_arrays(model, stale)
        row["torchvision_running_averages"] = eval_accuracy(model, test)
        params.load_arrays(model, fresh)
        row["re_estimated"] = eval_accuracy(model, test)
        row["batch_stats"] = batch_stats_accuracy(model, test)
        model.train()
        recalibrate_batchnorm(model, training_batchnorms(model),
                              (train.tensors[0][i:i + 256] for i in range(0, len(train), 256)))
        row["oracle"] = eval_accuracy(model, test)
        print(json.dumps(row), flush=True)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--archs", default="mobilenet_v3_small,small_cnn")
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, test_dir = write_task(Path(tmp), TARGET, args.per_class, 100, seed=0)
        train, test = load_tensors(train_dir), load_tensors(test_dir)
    results: list[dict] = []
    for arch in args.archs.split(","):
        for row in run(arch, train, test, args.rounds, args.lr):
            results.append(row)
            write(args, results, len(train), len(test))  # after every round: a cut-short run still reports


def write(args: argparse.Namespace, results: list[dict], n_train: int, n_test: int) -> None:
    out = ROOT / "benchmarks" / "results" / "bn_stats.json"
    out.write_text(json.dumps(results, indent=2))
    lines = [f"5 devices, Dirichlet 0.5, {args.rounds} rounds x 1 local epoch, lr {args.lr}, dense FedAvg from "
             f"random init, {n_train} training / {n_test} test images (generated shapes, 32 px). "
             "Accuracy of the global model after each round.", "",
             "| arch | round | torchvision running averages | re-estimated (default) | oracle stats | "
             "batch stats |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['round']} | {r['torchvision_running_averages']:.3f} | {r['re_estimated']:.3f} "
              f"| {r['oracle']:.3f} | {r['batch_stats']:.3f} |" for r in results]
    command = f"python benchmarks/bn_stats.py --rounds {args.rounds} --lr {args.lr} --archs {args.archs}"
    write_section("bn_stats", "BatchNorm statistics under federation", command, lines)

if __name__ == "__main__":
    main()
