"""Robustness of aggregation to malicious devices: final test accuracy under attack, per defence.

In-process simulation (no broker, no coordinator process): the edge SDK's digits data and LocalTrainer
train the honest devices, and the coordinator's own strategy classes (with the job's ``limits`` exactly as
``normalize_job`` fills them in) aggregate. 20 % of the devices are malicious; attacks:

* ``inflate``: claims ``num_samples = 1e6`` and sends ``target - global`` for a random target model
  (the finding that motivated the limits: one device moved the global model to its own values);
* ``signflip``: trains honestly, then sends ``-10 x`` its update;
* ``garbage``: NaN-free Gaussian noise (std 1 per value), finite and well-formed, so it passes validation;
* ``combined``: ``signflip`` with ``num_samples = 1e6``.

Defences: ``undefended`` (FedAvg by claimed num_samples, no cap, no clipping), ``default`` (what a job
gets when its body says nothing: see ``coordinator/rounds/limits.py``), ``trimmed_mean`` and ``median``
(default limits plus the robust strategy).

    nice -n 10 python benchmarks/robustness.py                 # 10 devices, 20 rounds, seeds 0 1
    python benchmarks/robustness.py --rounds 5 --seeds 0       # quick look

Writes benchmarks/results/robustness.json and the ``robustness`` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from benchmarks.report import write_section  # noqa: E402
from coordinator.rounds.jobspec import normalize_job  # noqa: E402
from coordinator.rounds.limits import UpdateLimits  # noqa: E402
from coordinator.rounds.strategy import make_strategy  # noqa: E402
from converters.spec_text import parse_codec  # noqa: E402
from edge_sdk.data import dirichlet_partition, load_digits_split  # noqa: E402
from edge_sdk.error_feedback import ResidualStore  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.params import load_arrays, state_to_arrays  # noqa: E402
from edge_sdk.protocol import codecs  # noqa: E402
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402
from edge_sdk.update import encode_delta, statistics_mask  # noqa: E402

log = logging.getLogger("benchmarks.robustness")
RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
ATTACKS = ("clean", "inflate", "signflip", "garbage", "combined")
UNDEFENDED = {"weighting": "num_samples", "max_num_samples": 2**53, "clip": {"mode": "none"}}
DEFENCES: dict[str, dict[str, Any]] = {
    "undefended": {"limits": UNDEFENDED},
    "default": {},
    "trimmed_mean": {"strategy": {"name": "trimmed_mean"}},
    "median": {"strategy": {"name": "median"}},
}


class Dense:
    """What the strategies accept (``Decoded``-like): a dense float32 update."""

    def __init__(self, values: np.ndarray) -> None:
        self.indices = None
        self.values = values.astype(np.float32)


def job_config(defence: str, clients: int, rounds: int) -> dict[str, Any]:
    body = {"name": "robustness", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
            "rounds": rounds, "clients_per_round": clients, "eval": {"dataset": "digits"}, **DEFENCES[defence]}
    return normalize_job(body)


def accuracy(model: torch.nn.Module, test: Any) -> float:
    x, y = test.tensors
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return float((pred == y).float().mean())


def malicious_update(attack: str, honest: np.ndarray, global_vec: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, int]:
    if attack == "inflate":
        return rng.normal(size=global_vec.size).astype(np.float32) - global_vec, 1_000_000
    if attack == "signflip":
        return -10.0 * honest, None  # type: ignore[return-value]
    if attack == "garbage":
        return rng.normal(size=global_vec.size).astype(np.float32), None  # type: ignore[return-value]
    if attack == "combined":
        return -10.0 * honest, 1_000_000
    raise ValueError(attack)


def simulate(defence: str, attack: str, seed: int, clients: int, rounds: int, alpha: float,
             malicious_fraction: float, codec: str = "dense") -> dict[str, Any]:
    cfg = job_config(defence, clients, rounds)
    spec = codecs.validate_spec(parse_codec(codec)) if codec != "dense" else None
    strategy = make_strategy(cfg["strategy"], UpdateLimits.from_config(cfg["limits"]))
    train, test = load_digits_split(seed=0)
    parts = dirichlet_partition(train.tensors[1].numpy(), clients, alpha, seed=seed)
    bad = set(range(clients)[: round(clients * malicious_fraction)]) if attack != "clean" else set()
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, in_channels=1)
    arrays = state_to_arrays(model)
    global_vec = flatten(arrays)
    trainer = LocalTrainer("cpu", cpu_threads=1)
    rng = np.random.default_rng(seed + 1000)
    sizes, stats = layout_sizes(arrays), statistics_mask(arrays)
    scratch = tempfile.TemporaryDirectory(prefix="robustness-")
    residuals = [ResidualStore(Path(scratch.name) / str(c)) for c in range(clients)]
    curve = []
    for r in range(1, rounds + 1):
        acc = strategy.begin(global_vec)
        for c in range(clients):
            load_arrays(model, unflatten(global_vec, arrays))
            result = trainer.train(model, Subset(train, parts[c].tolist()), {**cfg["train"], "seed": seed * 997 + r})
            delta = flatten(state_to_arrays(model)) - global_vec
            n = result.num_samples
            if c in bad:
                delta, claimed = malicious_update(attack, delta, global_vec, rng)
                n = claimed or n
                acc.add(Dense(delta), n)  # an attacker skips the codec: any finite vector passes validation
            elif spec is not None:  # what a device does: error feedback, then the codec (edge_sdk.update)
                _, sent = encode_delta(spec, delta, sizes, residuals[c], "robustness", stats)
                acc.add(sent, n)
            else:
                acc.add(Dense(delta), n)
        new_vec = acc.finalize()
        if not np.isfinite(new_vec).all():  # the engine refuses to publish this; the round is lost
            curve.append(curve[-1] if curve else 0.0)
            continue
        global_vec = new_vec
        load_arrays(model, unflatten(global_vec, arrays))
        curve.append(accuracy(model, test))
    scratch.cleanup()
    return {"defence": defence, "attack": attack, "seed": seed, "final_accuracy": curve[-1], "curve": curve,
            "clip_bound": strategy.limits.bound.state()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for defence in DEFENCES:
        for attack in ATTACKS:
            vals = [r["final_accuracy"] for r in runs if r["defence"] == defence and r["attack"] == attack]
            if vals:
                table.setdefault(defence, {})[attack] = statistics.fmean(vals)
    return table


def report_lines(table: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    clean = table["default"]["clean"]
    worst = min(v for k, v in table["default"].items())
    lines = [f"{args.clients} devices ({round(args.clients * args.malicious)} malicious in attack columns), "
             f"non-IID digits (Dirichlet alpha={args.alpha}), {args.rounds} rounds, every device in every round, "
             f"small_cnn, job-default training, honest codec {args.codec}; final test accuracy on the 360 held-out "
             f"digits, mean over seeds {args.seeds}.", "",
             "| defence | " + " | ".join(ATTACKS) + " |", "| --- |" + " ---: |" * len(ATTACKS)]
    for defence, row in table.items():
        lines.append(f"| {defence} | " + " | ".join(f"{row[a] * 100:.1f}%" for a in ATTACKS) + " |")
    over = [a for a, v in table["default"].items() if clean - v > 0.02]
    lines += ["", f"Default job configuration: worst case {worst * 100:.1f}% vs {clean * 100:.1f}% clean "
              f"({(clean - worst) * 100:.1f} points); "
              + (f"more than 2 points behind under: {', '.join(over)}." if over else "within 2 points under every attack."),
              "", "Attacks: `inflate` claims 1e6 samples and pulls towards a random model; `signflip` sends -10x its "
              "honest update; `garbage` sends N(0, 1) noise; `combined` = signflip + 1e6 samples. Defaults: uniform "
              "weighting, num_samples cap 10000, adaptive L2 clipping at the median norm (see docs/rest.md, `limits`). "
              "Clipping bounds each attacker to the honest norm scale, so a 20 % sign-flipping minority still costs "
              "a mean-based aggregate some progress; the coordinate-wise robust strategies discard it, but need "
              "dense updates (a sparse codec's zeros look like agreement to them)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--malicious", type=float, default=0.2)
    ap.add_argument("--codec", default="dense", help="honest devices' codec, e.g. topk:0.01:int8 (default dense)")
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    ap.add_argument("--no-write", action="store_true", help="print only; leave results and BENCHMARKS.md alone")
    ap.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        saved = json.loads(RESULTS.read_text())
        cfg = argparse.Namespace(**{"codec": "dense", **saved["config"]})
        write_section("robustness", "Robustness to malicious devices", saved.get("command", "python benchmarks/"
                      "robustness.py"), report_lines(saved["table"], cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("edge_sdk").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    runs = []
    for defence in args.defences:
        for attack in ATTACKS:
            for seed in args.seeds:
                t0 = time.perf_counter()
                run = simulate(defence, attack, seed, args.clients, args.rounds, args.alpha, args.malicious,
                               args.codec)
                run["wall_s"] = round(time.perf_counter() - t0, 2)
                runs.append(run)
                log.info("%-12s %-9s seed %d: %.3f (%.1fs, clip %s)", defence, attack, seed, run["final_accuracy"],
                         run["wall_s"], run["clip_bound"])
    table = summarize(runs)
    command = "python benchmarks/robustness.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not args.no_write and set(args.defences) == set(DEFENCES):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"command": command.strip(), "config": vars(args), "table": table,
                                       "runs": runs}, indent=2) + "\n")
        write_section("robustness", "Robustness to malicious devices", command.strip(), report_lines(table, args))
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
