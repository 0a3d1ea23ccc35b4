"""Uplink compression vs accuracy: every codec row under the same seeds, rounds and local training.

Each simulated round runs the real code paths a job uses: ``LocalTrainer`` on each selected client's shard,
error feedback through ``ResidualStore``, ``codecs.encode`` and the wire framing (bytes are the full
``encode_update`` message, headers included), then ``decode_update`` + ``codecs.decode`` and the
coordinator's streaming ``FedAvg`` accumulator. Only MQTT is left out (it moves the bytes counted here).

    python benchmarks/compression.py                 # digits (10 clients, alpha 0.5 and IID) + MobileNetV3 run
    python benchmarks/compression.py --quick         # fewer rounds / rows, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402
from coordinator.rounds.strategy import FedAvg  # noqa: E402
from edge_sdk import params  # noqa: E402
from edge_sdk.data import dirichlet_partition, load_digits_split  # noqa: E402
from edge_sdk.error_feedback import ResidualStore  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.protocol import codecs  # noqa: E402
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten  # noqa: E402
from edge_sdk.protocol.wire import UpdateHeader, decode_update, encode_update  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402
from edge_sdk.update import encode_delta, statistics_mask  # noqa: E402

DENSE = {"name": "dense", "dtype": "float32"}


def rows(quick: bool) -> list[tuple[str, dict]]:
    out = [("dense fp32", DENSE), ("dense fp16", {"name": "dense", "dtype": "float16"})]
    for d in (0.1, 0.01, 0.001):
        out.append((f"top-k {d:.1%} fp16 +EF", {"name": "topk", "density": d, "values": "float16",
                                                "error_feedback": True}))
        out.append((f"top-k {d:.1%} fp16 no EF", {"name": "topk", "density": d, "values": "float16",
                                                  "error_feedback": False}))
    out.append(("top-k 1.0% int8 +EF", {"name": "topk", "density": 0.01, "values": "int8", "error_feedback": True}))
    out.append(("top-k 0.5% int8 +EF", {"name": "topk", "density": 0.005, "values": "int8",
                                        "error_feedback": True}))
    out.append(("rand-k 1.0% fp16 +EF", {"name": "randk", "density": 0.01, "values": "float16",
                                         "error_feedback": True}))
    if quick:
        keep = {"dense fp32", "top-k 1.0% int8 +EF", "top-k 1.0% fp16 +EF"}
        out = [r for r in out if r[0] in keep]
    return out


@dataclass
class Setup:
    name: str
    arch: str
    in_channels: int
    train: TensorDataset
    test: TensorDataset
    shards: list[np.ndarray]
    per_round: int
    rounds: int
    train_cfg: dict


def digits_setup(alpha: float | str, rounds: int) -> Setup:
    train, test = load_digits_split()
    shards = dirichlet_partition(train.tensors[1].numpy(), 10, alpha, seed=0)
    return Setup(f"digits, 10 clients, {'IID' if alpha == 'iid' else f'Dirichlet a={alpha}'}", "small_cnn", 1,
                 train, test, shards, 10, rounds, {"epochs": 2, "batch_size": 16, "lr": 0.05})


def synthetic_setup(rounds: int, clients: int = 100, per_client: int = 48, size: int = 32) -> Setup:
    """Generated images: class = oriented stripe pattern + colour cast, plus noise (nothing downloaded)."""
    g = torch.Generator().manual_seed(0)
    n_cls = 5
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, n_cls, (n,), generator=g)
        angle = y.float() * (np.pi / n_cls)
        phase = torch.rand(n, generator=g) * 6.28
        wave = torch.sin((xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None])
                         * 0.6 + phase[:, None, None])
        colour = torch.stack([torch.cos(angle), torch.sin(angle), -torch.cos(angle)], 1)[:, :, None, None] * 0.3
        x = wave[:, None] + colour + 0.5 * torch.randn(n, 3, size, size, generator=g)
        return TensorDataset(x.float(), y)

    train, test = make(clients * per_client), make(500)
    shards = dirichlet_partition(train.tensors[1].numpy(), clients, "iid", seed=0)
    # torchvision's BatchNorm momentum (0.01) is left as built: LocalTrainer re-estimates the running
    # statistics at the end of each local round (edge_sdk/bn_stats.py), as every device does.
    return Setup(f"MobileNetV3-small, {clients} clients / 10 per round, generated {size}px images",
                 "mobilenet_v3_small", 3, train, test, shards, 10, rounds,
                 {"epochs": 2, "batch_size": 16, "lr": 0.05})


def simulate(setup: Setup, spec: dict, seed: int = 0, progress: str = "") -> dict:
    torch.manual_seed(seed)
    n_classes = int(setup.train.tensors[1].max()) + 1
    model = build_model(setup.arch, n_classes, setup.in_channels)
    template = params.state_to_arrays(model)
    sizes = layout_sizes(template)
    global_vec = flatten(template)
    stats = statistics_mask(template)
    trainer = LocalTrainer(device="cpu")
    strategy = FedAvg()
    rng = np.random.default_rng(seed)
    accs, bytes_sent, enc_t, dec_t, train_t = [], [], [], [], []
    dense_bytes = None
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for rnd in tqdm(range(1, setup.rounds + 1), desc=progress, leave=False):
            chosen = rng.choice(len(setup.shards), setup.per_round, replace=False)
            round_spec = strategy.configure_round({"id": "bench", "config": {"codec": spec, "seed": seed}}, rnd,
                                                  [])["codec"]
            acc = strategy.begin(global_vec)
            for cid in chosen:
                params.load_arrays(model, unflatten(global_vec, template))
                torch.manual_seed(seed * 100003 + rnd * 1009 + int(cid))
                res = trainer.train(model, Subset(setup.train, setup.shards[cid].tolist()),
                                    {**setup.train_cfg, "seed": rnd})
                train_t.append(res.wall_time_s)
                delta = flatten(params.state_to_arrays(model)) - global_vec
                t0 = time.perf_counter()
                store = stores.setdefault(cid, ResidualStore(Path(tmp) / str(cid)))
                payload, _ = encode_delta(round_spec, delta, sizes, store, "bench", stats)
                header = UpdateHeader("bench-job-0001", rnd, f"client-{cid:03d}", "f" * 64, round_spec,
                                      res.num_samples, int(global_vec.size), res.metrics())
                message = encode_update(header, payload, b"k" * 32)
                enc_t.append(time.perf_counter() - t0)
                bytes_sent.append(len(message))
                if dense_bytes is None:
                    dense_bytes = len(encode_update(header, b"\x00" * (4 * global_vec.size), b"k" * 32))
                t0 = time.perf_counter()
                head, body = decode_update(message)
                decoded = codecs.decode(head.codec, body, head.numel, sizes)
                acc.add(decoded, head.num_samples)
                dec_t.append(time.perf_counter() - t0)
            global_vec = acc.finalize()
            params.load_arrays(model, unflatten(global_vec, template))
            accs.append(trainer.evaluate(model, setup.test)["accuracy"])
    reach = next((i + 1 for i, a in enumerate(accs) if a >= 0.9), None)
    mean_bytes = float(np.mean(bytes_sent))
    return {"setup": setup.name, "codec": spec, "bytes_per_update": mean_bytes,
            "uncompressed_fp32_bytes": dense_bytes,
            "final_accuracy": accs[-1], "accuracy_per_round": accs, "rounds_to_90": reach,
            "encode_ms": 1e3 * float(np.mean(enc_t)), "decode_ms": 1e3 * float(np.mean(dec_t)),
            "train_ms": 1e3 * float(np.mean(train_t)),
            "encode_share_of_training": float(np.sum(enc_t) / np.sum(train_t))}


def table(results: list[dict]) -> list[str]:
    lines = ["| setup | codec | bytes/update | ratio vs dense fp32 (measured) | final acc | Δ vs dense (pt) | rounds to 90% "
             "| encode ms | decode ms | encode / training |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    dense_acc = {r["setup"]: r["final_accuracy"] for r in results if r["codec"] == DENSE}
    for r in results:
        delta = 100 * (r["final_accuracy"] - dense_acc.get(r["setup"], r["final_accuracy"]))
        lines.append(f"| {r['setup']} | {r['label']} | {r['bytes_per_update']:,.0f} | {r['ratio_vs_dense_fp32']:.1f}x "
                     f"| {r['final_accuracy']:.3f} | {delta:+.1f} | {r['rounds_to_90'] or '-'} | {r['encode_ms']:.2f} "
                     f"| {r['decode_ms']:.2f} | {100 * r['encode_share_of_training']:.2f}% |")
    return lines


def add_ratios(results: list[dict]) -> None:
    """Ratios against the dense fp32 row of the same setup, as measured on the wire in this run."""
    dense = {r["setup"]: r["bytes_per_update"] for r in results if r["codec"] == DENSE}
    for r in results:
        r["ratio_vs_dense_fp32"] = dense[r["setup"]] / r["bytes_per_update"]


def best(results: list[dict]) -> str:
    dense_acc = {r["setup"]: r["final_accuracy"] for r in results if r["codec"] == DENSE}
    # a setup whose dense baseline did not learn says nothing about codecs
    ok = [r for r in results if r["ratio_vs_dense_fp32"] >= 100 and dense_acc.get(r["setup"], 0.0) >= 0.6
          and r["final_accuracy"] >= dense_acc.get(r["setup"], 1.0) - 0.01]
    if not ok:
        return "No configuration reached >= 100x with accuracy within 1 point of dense in this run."
    top = max(ok, key=lambda r: r["ratio_vs_dense_fp32"])
    return (f"Best configuration meeting the target (>= 100x, within 1.0 pt of dense): **{top['label']}** on "
            f"{top['setup']}: {top['ratio_vs_dense_fp32']:.0f}x fewer uplink bytes, accuracy "
            f"{top['final_accuracy']:.3f} vs dense {dense_acc[top['setup']]:.3f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="digits rounds")
    parser.add_argument("--large-rounds", type=int, default=20, help="MobileNetV3 rounds (0 skips that run)")
    parser.add_argument("--quick", action="store_true", help="three rows, fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rounds = 5 if args.quick else args.rounds
    setups = [digits_setup(0.5, rounds), digits_setup("iid", rounds)]
    large_rows = {"dense fp32", "top-k 1.0% int8 +EF", "top-k 0.1% fp16 +EF", "top-k 1.0% fp16 no EF",
                  "top-k 0.5% int8 +EF"}
    results = []
    for setup in setups:
        for label, spec in rows(args.quick):
            results.append({"label": label, **simulate(setup, spec, progress=f"{label} | {setup.name}")})
    if args.large_rounds and not args.quick:
        large = synthetic_setup(args.large_rounds)
        for label, spec in rows(False):
            if label in large_rows:
                results.append({"label": label, **simulate(large, spec, progress=f"{label} | MobileNetV3")})
    add_ratios(results)
    out = ROOT / "benchmarks" / "results" / "compression.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    command = "python benchmarks/compression.py" + (" --quick" if args.quick else
                                                     f" --rounds {args.rounds} --large-rounds {args.large_rounds}")
    lines = table(results) + ["", best(results)]
    write_section("compression", "Uplink compression vs accuracy", command, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
