"""Uplink compression vs accuracy on label-skewed data, measured the way a sceptic would.

* Every ratio is against the *measured* dense float32 messages of the same setup and seed (whole MQTT
  messages: header, codec payload, MAC, CRC); a payload-only ratio is shown next to it.
* Final accuracy after a fixed number of rounds, and the uplink bytes needed to first reach 95 % of dense's
  final accuracy (same seed).
* Mean and spread (sample standard deviation) over seeds 0, 1, 2: the seed draws the Dirichlet split, the
  initial weights, the devices selected per round and the local shuffling.
* Product settings only: LocalTrainer as devices run it (BatchNorm statistics re-estimated on device), the
  job's codec and strategy as a job would set them (see compression_sim.py).

    nice -n 10 python benchmarks/compression.py --setups digits-a0.5        # one setup (results are merged)
    nice -n 10 python benchmarks/compression.py                             # every setup
"""
from __future__ import annotations

import argparse
import fcntl
import json
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.rounds.jobspec import LOGIT_ADJUST_DEFAULT  # noqa: E402
from benchmarks.compression_sim import Setup, bytes_to_target, run  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from edge_sdk.data import dirichlet_partition, load_digits_split  # noqa: E402
from edge_sdk.protocol.wire import VERSION as WIRE_VERSION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compression.json"
RUN_CACHE = ROOT / "benchmarks" / "results" / "compression-runs.jsonl"
SEEDS = (0, 1, 2)
# the baseline is what a dense job created now sends (byte planes, the jobspec default); rows measured before
# that compare against plain-zlib dense messages and are marked in the table
DENSE = {"name": "dense", "dtype": "float32", "planes": True}
MOMENTUM = {"name": "fedavgm", "beta": 0.7, "eta": 0.7}
WARMUP = {"warmup_rounds": 6, "warmup_density": 0.25}
# label -> (codec, strategy); "dense fp32" is the baseline every ratio is measured against
ROWS: dict[str, tuple[dict, dict | None]] = {
    "dense fp32": (DENSE, None),
    "top-k 0.3% sign+rice, warm-up, server momentum": (
        {"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice", **WARMUP}, MOMENTUM),
    "top-k 1% sign+rice, warm-up, server momentum": (
        {"name": "topk", "density": 0.01, "values": "sign", "index_coding": "rice", **WARMUP}, MOMENTUM),
    "top-k 1% int8 +EF (previous default)": ({"name": "topk", "density": 0.01, "values": "int8"}, None),
    "top-k 0.3% int8 +EF": ({"name": "topk", "density": 0.003, "values": "int8"}, None),
    # 1-bit values at 1 % without warm-up or server momentum: about the bytes of 0.3 % int8 with 3x the positions
    "top-k 1% sign+rice +EF": ({"name": "topk", "density": 0.01, "values": "sign", "index_coding": "rice"}, None),
}
# a shorter or lower warm-up: what the warm-up's bytes buy (statistics block as for new jobs)
_WARMUP_ROWS = {
    f"top-k 0.3% sign+rice, warm-up {rounds} from {int(100 * start)}%, server momentum, stats int8": (
        {"name": "topk", "density": 0.003, "values": "sign", "index_coding": "rice", "warmup_rounds": rounds,
         "warmup_density": start, "stats": "int8"}, MOMENTUM)
    for rounds, start in ((6, 0.2), (5, 0.25), (5, 0.2), (4, 0.25), (4, 0.2))}
ROWS.update(_WARMUP_ROWS)
WARMUP_VARIANTS = tuple(_WARMUP_ROWS)
# the same rows with BatchNorm statistics in a dense block outside the sparse budget (codec key "stats")
ROWS.update({f"{label}, stats {short}": ({**codec, "stats": kind}, strategy)
             for label, (codec, strategy) in list(ROWS.items()) if codec["name"] != "dense" and "stats" not in codec
             for kind, short in (("float16", "fp16"), ("int8", "int8"))})
DIGITS_TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.05}
# the same with the job default of new jobs since logit adjustment exists (coordinator/rounds/jobspec.py); setups
# without it keep their names, so their cached runs stay valid and read as "before logit adjustment"
LA_TRAIN = {**DIGITS_TRAIN, "logit_adjust": LOGIT_ADJUST_DEFAULT}
LA_NOTE = f", logit adjustment {LOGIT_ADJUST_DEFAULT:g} (job default)"


@lru_cache(maxsize=1)
def _digits() -> tuple[TensorDataset, TensorDataset]:
    return load_digits_split()


def digits(alpha: float, devices: int, per_round: int, rounds: int, limits: dict | None = None,
           note: str = "", train_cfg: dict | None = None) -> Setup:
    train, test = _digits()
    labels = train.tensors[1].numpy()
    part = "all" if per_round == devices else f"{per_round}"
    return Setup(f"digits, Dirichlet {alpha}, {devices} devices ({part} per round), {rounds} rounds{note}",
                 "small_cnn", 1, train, test, lambda seed: dirichlet_partition(labels, devices, alpha, seed=seed),
                 per_round, rounds, train_cfg or DIGITS_TRAIN, limits)


def colour(arch: str, rounds: int, size: int = 16, train_per_class: int = 200, test_per_class: int = 50,
           devices: int = 10, train_cfg: dict | None = None) -> Setup:
    """The generated 10-class colour shapes of ``shapes_dataset.py`` (shape + overlapping hue, noise,
    distractors), rendered at 32 px and average-pooled to ``size`` px; Dirichlet 0.5 over ``devices``."""
    from benchmarks.shapes_dataset import TARGET, render

    def make(per_class: int, seed: int) -> TensorDataset:
        rng = np.random.default_rng(seed)
        imgs, labels = [], []
        for k, name in enumerate(TARGET):
            for _ in range(per_class):
                imgs.append(render(name, rng, hue=k / len(TARGET)))
                labels.append(k)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.adaptive_avg_pool2d(x, size)
        return TensorDataset(x, torch.tensor(labels))

    train, test = make(train_per_class, 11), make(test_per_class, 1_000_014)
    mean, std = train.tensors[0].mean((0, 2, 3), keepdim=True), train.tensors[0].std((0, 2, 3), keepdim=True)
    train, test = (TensorDataset((d.tensors[0] - mean) / std, d.tensors[1]) for d in (train, test))
    labels = train.tensors[1].numpy()
    cfg = train_cfg or {"epochs": 2, "batch_size": 16, "lr": 0.05}
    extra = "" if train_cfg is None else f", {cfg['epochs']} epoch(s), batch {cfg['batch_size']}"
    if cfg.get("logit_adjust"):
        extra += f", logit adjustment {cfg['logit_adjust']:g}"
    return Setup(f"colour shapes {size}px ({10 * train_per_class} images), 10 classes, {arch}, Dirichlet 0.5, "
                 f"{devices} devices, {rounds} rounds{extra}", arch, 3,
                 train, test, lambda seed: dirichlet_partition(labels, devices, 0.5, seed=seed), devices, rounds, cfg)


BEST = "top-k 0.3% sign+rice, warm-up, server momentum"
PREVIOUS = "top-k 1% int8 +EF (previous default)"
STATS = (f"{BEST}, stats fp16", f"{BEST}, stats int8", f"{PREVIOUS}, stats fp16", f"{PREVIOUS}, stats int8")
SETUPS: dict[str, tuple[Callable[[], Setup], tuple[str, ...]]] = {
    "digits-a0.5": (lambda: digits(0.5, 10, 10, 20), ("dense fp32", BEST, PREVIOUS, *STATS)),
    "digits-a0.1": (lambda: digits(0.1, 10, 10, 20), ("dense fp32", BEST, PREVIOUS, STATS[1])),
    # the same with the direction screen off: what the robustness default costs on extreme label skew
    "digits-a0.1-noscreen": (lambda: digits(0.1, 10, 10, 20, {"direction": {"mode": "none"}},
                                            ", direction screen off"), ("dense fp32", STATS[1], *WARMUP_VARIANTS)),
    # a device is picked every ~3 rounds: the statistics block keeps its BatchNorm statistics from going stale
    "digits-50dev": (lambda: digits(0.5, 50, 15, 30), ("dense fp32", BEST, STATS[1],
                                                       "top-k 1% sign+rice, warm-up, server momentum, stats int8")),
    # job defaults since logit adjustment: direction screen on, devices adjust logits by their label shares
    "digits-a0.5-la": (lambda: digits(0.5, 10, 10, 20, note=LA_NOTE, train_cfg=LA_TRAIN),
                       ("dense fp32", STATS[1], STATS[3])),
    "digits-a0.1-la": (lambda: digits(0.1, 10, 10, 20, note=LA_NOTE, train_cfg=LA_TRAIN),
                       ("dense fp32", STATS[1], STATS[3])),
    # 12 rounds and 100 training images per class: what the shared 2 cores allowed for 3 seeds
    "colour-small_cnn": (lambda: colour("small_cnn", 12, train_per_class=100), ("dense fp32", BEST, *STATS[:2])),
    # MobileNetV3 / ResNet-18 on the same task: one seed, what the shared cores allowed (BENCHMARKS.md notes)
    "colour-mobilenet_v3_small": (lambda: colour("mobilenet_v3_small", 12, train_per_class=100),
                                  ("dense fp32", BEST)),
    "colour-resnet18": (lambda: colour("resnet18", 12, train_per_class=100), ("dense fp32", BEST)),
    # the deployment benchmark's setting (32 px, 3,000 images, 5 devices, 5 rounds x 1 epoch, batch 32), where
    # top-k 1 % int8 stayed at chance through the CLI
    "deploy-small_cnn": (lambda: colour("small_cnn", 5, size=32, train_per_class=300, test_per_class=50, devices=5,
                                        train_cfg={"epochs": 1, "batch_size": 32, "lr": 0.05}),
                         ("dense fp32", PREVIOUS, f"{PREVIOUS}, stats fp16", f"{PREVIOUS}, stats int8", BEST,
                          f"{BEST}, stats int8")),
    # the same setting at the deployment benchmark's 20 rounds with MobileNetV3 (1.5 M values, so the per-message
    # framing and statistics are a small share) under the job defaults of new jobs (logit adjustment 1)
    "deploy-mobilenet_v3_small": (lambda: colour("mobilenet_v3_small", 20, size=32, train_per_class=300,
                                                 test_per_class=50, devices=5,
                                                 train_cfg={"epochs": 1, "batch_size": 32, "lr": 0.05,
                                                            "logit_adjust": LOGIT_ADJUST_DEFAULT}),
                                  ("dense fp32", STATS[1], STATS[3], "top-k 0.3% int8 +EF, stats int8",
                                   "top-k 1% sign+rice +EF, stats int8")),
}


def _stats(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarise(setup: str, label: str, runs: list[dict], dense: dict[int, dict]) -> dict:
    """Per-row aggregate over seeds; every ratio uses the dense run of the same seed."""
    msg_ratio, pay_ratio, to_target = [], [], []
    for r in runs:
        d = dense[r["seed"]]
        msg_ratio.append(sum(d["message_bytes_per_round"]) / sum(r["message_bytes_per_round"]))
        pay_ratio.append(sum(d["payload_bytes_per_round"]) / sum(r["payload_bytes_per_round"]))
        to_target.append(bytes_to_target(r, 0.95 * d["final_accuracy"]))
    acc_mean, acc_std = _stats([r["final_accuracy"] for r in runs])
    reached = [b for b in to_target if b is not None]
    return {"setup": setup, "label": label, "codec": runs[0]["codec"], "strategy": runs[0]["strategy"],
            "seeds": [r["seed"] for r in runs], "final_accuracy_mean": acc_mean, "final_accuracy_std": acc_std,
            "ratio_vs_dense_messages": _stats(msg_ratio), "ratio_vs_dense_payload": _stats(pay_ratio),
            "message_bytes_per_update": float(np.mean([sum(r["message_bytes_per_round"]) / r["updates"]
                                                       for r in runs])),
            "bytes_to_target": to_target,
            "bytes_to_target_mean": float(np.mean(reached)) if reached else None,  # over the seeds that reached it
            "encode_share_of_training": float(np.mean([r["encode_share_of_training"] for r in runs])),
            "clamped_variances": [r.get("clamped_variances") for r in runs],  # None: run predates the count
            "wire_version": min(r.get("wire_version", 2) for r in runs),  # absent: measured before wire v3
            "runs": runs}


def table(rows: list[dict]) -> list[str]:
    lines = ["| setup | configuration | bytes/update | ratio vs dense fp32 messages | payload ratio | final acc "
             "(mean ± sd) | Δ vs dense (pt) | uplink to 95 % of dense | reached |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    dense = {r["setup"]: r["final_accuracy_mean"] for r in rows if r["label"] == "dense fp32"}
    plain = plain_dense_setups(rows)
    for r in rows:
        m, s = r["ratio_vs_dense_messages"]
        p, _ = r["ratio_vs_dense_payload"]
        btt = r["bytes_to_target_mean"]
        reached = sum(b is not None for b in r["bytes_to_target"])
        mark = f" (wire v{r.get('wire_version', 2)})" if r.get("wire_version", 2) < WIRE_VERSION else ""
        mark += " (plain dense)" if r["setup"] in plain else ""
        lines.append(f"| {r['setup']}{mark} | {r['label']} | {r['message_bytes_per_update']:,.0f} | {m:.1f}x ± {s:.1f} "
                     f"| {p:.0f}x | {100 * r['final_accuracy_mean']:.2f} ± {100 * r['final_accuracy_std']:.2f} "
                     f"| {100 * (r['final_accuracy_mean'] - dense[r['setup']]):+.2f} "
                     f"| {f'{btt / 1e3:,.0f} kB' if btt else '-'} | {reached}/{len(r['bytes_to_target'])} |")
    return lines


def plain_dense_setups(rows: list[dict]) -> set[str]:
    """Setups whose dense baseline was measured without byte planes (before they were the dense default)."""
    return {r["setup"] for r in rows if r["label"] == "dense fp32" and not r["codec"].get("planes")}


def verdicts(rows: list[dict]) -> list[str]:
    dense = {r["setup"]: r["final_accuracy_mean"] for r in rows if r["label"] == "dense fp32"}
    out = []
    for setup in dense:
        ok = [r for r in rows if r["setup"] == setup and r["label"] != "dense fp32"
              and r["final_accuracy_mean"] >= dense[setup] - 0.01]
        if ok:
            top = max(ok, key=lambda r: r["ratio_vs_dense_messages"][0])
            out.append(f"- {setup}: best within 1 pt of dense (mean of {len(top['seeds'])} seeds): **{top['label']}**, "
                       f"{top['ratio_vs_dense_messages'][0]:.0f}x vs dense fp32 messages "
                       f"({top['ratio_vs_dense_payload'][0]:.0f}x on payload).")
        else:
            rest = [r for r in rows if r["setup"] == setup and r["label"] != "dense fp32"]
            top = max(rest, key=lambda r: r["final_accuracy_mean"])
            out.append(f"- {setup}: target missed, no configuration within 1 pt of dense. Best reached: "
                       f"**{top['label']}**, {100 * (top['final_accuracy_mean'] - dense[setup]):+.1f} pt at "
                       f"{top['ratio_vs_dense_messages'][0]:.0f}x vs dense fp32 messages "
                       f"({top['ratio_vs_dense_payload'][0]:.0f}x on payload); why: the section below.")
    return out


def _cached_runs() -> dict[str, dict]:
    """Finished runs by (setup, codec, strategy, seed, wire version): an interrupted benchmark resumes where it
    stopped; a run framed by an older wire version is not reused (its byte counts are the old header's).
    Delete the file (or pass --fresh) after changing code that affects results."""
    if not RUN_CACHE.exists():
        return {}
    rows = (json.loads(line) for line in RUN_CACHE.read_text().splitlines() if line.strip())
    return {row["key"]: row["run"] for row in rows}


def _merge(setup: str, fresh: list[dict]) -> list[dict]:
    """Replace ``setup``'s rows in the results file (locked: several setups may run in parallel)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        rows = [r for r in old if isinstance(r, dict) and "ratio_vs_dense_messages" in r and r["setup"] != setup]
        # a re-run setup keeps its place in the table
        order = {name: i for i, name in enumerate(dict.fromkeys(r["setup"] for r in old + fresh
                                                                if isinstance(r, dict) and "setup" in r))}
        rows = sorted(rows + fresh, key=lambda r: order[r["setup"]])
        RESULTS.write_text(json.dumps(rows, indent=1))
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--smoke", action="store_true", help="2 rounds, results to /tmp, BENCHMARKS.md untouched")
    parser.add_argument("--fresh", action="store_true", help="ignore runs cached in compression-runs.jsonl")
    args = parser.parse_args()
    global RESULTS, RUN_CACHE
    if args.smoke:
        RESULTS, RUN_CACHE = Path("/tmp/compression-smoke.json"), Path("/tmp/compression-smoke-runs.jsonl")
    torch.set_num_threads(1)
    old: list[dict] = []
    cache = _cached_runs()
    done: list[str] = []  # names of the setups this invocation ran
    for key in args.setups:
        make, labels = SETUPS[key]
        setup = make()
        done.append(setup.name)
        if args.smoke:
            setup.rounds = 2
        runs: dict[str, list[dict]] = {}
        for label in labels:
            codec, strategy = ROWS[label]
            for seed in args.seeds:
                key = json.dumps([setup.name, codec, strategy, seed, f"wire-v{WIRE_VERSION}"], sort_keys=True)
                result = cache.get(key) if not args.fresh else None
                if result is None:
                    result = {**run(setup, codec, strategy, seed), "codec": codec, "strategy": strategy,
                              "wire_version": WIRE_VERSION}
                    with open(RUN_CACHE, "a") as fh:
                        fh.write(json.dumps({"key": key, "run": result}) + "\n")
                runs.setdefault(label, []).append(result)
                print(f"{setup.name} | {label} | seed {seed}: acc {result['final_accuracy']:.4f}, "
                      f"{sum(result['message_bytes_per_round']):,} B", flush=True)
        dense = {r["seed"]: r for r in runs["dense fp32"]}
        fresh = [summarise(setup.name, label, rs, dense) for label, rs in runs.items()]
        old = _merge(setup.name, fresh)
    lines = table(old) + ["", *verdicts(old)]
    if args.smoke:
        print("\n".join(lines))
        return
    seeds = sorted({s for r in old for s in r["seeds"]})
    command = f"nice -n 10 python benchmarks/compression.py --setups {' '.join(args.setups)}"
    others = {r["setup"] for r in old} - set(done)
    earlier = ([f"This command ran {len(done)} setup(s); the rows of the other {len(others)} come from earlier runs "
                "of the same script with their own `--setups` (kept in benchmarks/results/compression.json, dated "
                "in the notes below).", ""] if others else [])
    stale = sorted({r["setup"] for r in old if r.get("wire_version", 2) < WIRE_VERSION})
    if stale:
        earlier += [f"Rows marked (wire v2) ({len(stale)} of {len({r['setup'] for r in old})} setups) predate wire "
                    f"v{WIRE_VERSION}: their messages carry wire v2's JSON header (its size: the notes below), so their "
                    "message ratios understate what devices get today; their payload ratios and accuracies stand. "
                    "Re-run those setups to update them.", ""]
    plain = plain_dense_setups(old)
    if plain:
        earlier += [f"Rows marked (plain dense) ({len(plain)} of {len({r['setup'] for r in old})} setups) compare "
                    "against dense messages without byte planes, measured before they became the dense default; "
                    "a dense job created now sends ~0.81x those bytes (section \"Dense payloads: byte planes vs "
                    "plain zlib\"), so their ratios are ~1.2x what they are against today's dense. Re-run those "
                    "setups to update them.", ""]
    write_section("compression", "Uplink compression vs accuracy (label-skewed)", command,
                  [*earlier, f"Seeds {seeds}; ratios are total uplink of dense fp32 over total uplink of the row, same setup "
                   "and seed, whole messages (header, payload, MAC, CRC); payload ratio counts codec bytes only. "
                   "'uplink to 95 % of dense': bytes sent until the first round at 95 % of dense's final accuracy "
                   "(mean over seeds that reached it; 'reached' says how many).", "", *lines])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
