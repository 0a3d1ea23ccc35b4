"""Fine-tuning from the user's weights vs random init, under the same rounds and uplink bytes.

Pre-training task, generated locally (no download): 8 of the ``PRETRAIN`` shapes of ``shapes_dataset.py``
(shapes the target task never shows), trained centrally; its ``state_dict`` is saved with ``torch.save`` and
bytes of that file are what a job would upload (``fedsight job create --weights FILE``). The model is then
built exactly as the coordinator builds version 0 (``build_model(..., weights=file bytes)``: the 8-class head
is replaced for the 10 target classes) and federated on the ``TARGET`` shapes (5 devices, Dirichlet 0.5)
with the real device code paths (``benchmarks/fedsim.py``). Rows: random init, pre-trained (full fine-tune),
pre-trained with ``--backbone-lr-mult 0.1``, pre-trained with ``--freeze-backbone``.

    nice -n 10 python benchmarks/finetune.py --rounds 5
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fedsim import federate, load_tensors  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from benchmarks.shapes_dataset import PRETRAIN, TARGET, write_task  # noqa: E402
from edge_sdk.data import dirichlet_partition  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402

ROWS = (("random init", False, {}), ("pre-trained, full fine-tune", True, {}),
        ("pre-trained, backbone lr x0.1", True, {"backbone_lr_mult": 0.1}),
        ("pre-trained, frozen backbone", True, {"freeze_backbone": True}))


def pretrain(arch: str, root: Path, epochs: int, lr: float) -> tuple[bytes, float]:
    """Central training on the pre-training task; (torch.save bytes of the state_dict, its test accuracy)."""
    train_dir, test_dir = write_task(root, PRETRAIN[:8], 200, 25, seed=7)
    train, test = load_tensors(train_dir), load_tensors(test_dir)
    torch.manual_seed(1)
    model = build_model(arch, 8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train.tensors
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y) - 1, 32):
            idx = order[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue(), acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=100, help="target training images per class")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--codec", default="dense", help="dense or topk:DENSITY:int8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from converters.spec_text import parse_codec

    codec = parse_codec(args.codec)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights, pre_acc = pretrain(args.arch, Path(tmp) / "pretrain", args.pretrain_epochs, args.lr)
        train_dir, test_dir = write_task(Path(tmp) / "target", TARGET, args.per_class, 50, seed=0)
        train, test = load_tensors(train_dir), load_tensors(test_dir)
    shards = dirichlet_partition(train.tensors[1].numpy(), 5, 0.5, seed=0)
    results = []
    for label, pretrained, extra in ROWS:
        torch.manual_seed(0)
        model = build_model(args.arch, 10, 3, weights=weights if pretrained else None)
        cfg = {"epochs": 1, "batch_size": 32, "lr": args.lr, **extra}
        res = federate(model, train, test, shards, args.rounds, cfg, codec)
        results.append({"row": label, "accuracy_per_round": res.accuracy_per_round,
                        "final_accuracy": res.final_accuracy, "uplink_bytes": res.uplink_bytes})
        print(label, [round(a, 3) for a in res.accuracy_per_round], res.uplink_bytes, flush=True)
    out = ROOT / "benchmarks" / "results" / "finetune.json"
    out.write_text(json.dumps({"config": vars(args), "pretrain_test_accuracy": pre_acc,
                               "weights_file_bytes": len(weights), "rows": results,
                               "seconds": time.perf_counter() - t0}, indent=2))
    lines = [f"{args.arch}; pre-training: 8 other generated shapes, 1,600 images, {args.pretrain_epochs} epochs "
             f"(its own test accuracy {pre_acc:.3f}), saved with torch.save ({len(weights):,} bytes) and loaded as "
             f"a job's uploaded weights (8-class head replaced for 10). Target: {len(train)} training / "
             f"{len(test)} test images of the 10 target shapes, 5 devices, Dirichlet 0.5, {args.rounds} rounds x 1 "
             f"epoch, codec {args.codec}.", "",
             "| start | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | uplink bytes |",
             "| --- | " + " | ".join("---" for _ in range(args.rounds)) + " | --- |"]
    for r in results:
        lines.append(f"| {r['row']} | " + " | ".join(f"{a:.3f}" for a in r["accuracy_per_round"])
                     + f" | {r['uplink_bytes']:,} |")
    command = (f"python benchmarks/finetune.py --arch {args.arch} --rounds {args.rounds} "
               f"--pretrain-epochs {args.pretrain_epochs} --per-class {args.per_class} --codec {args.codec}")
    write_section("finetune", "Fine-tuning from uploaded weights vs random init", command, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
