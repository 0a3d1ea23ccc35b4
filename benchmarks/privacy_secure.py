"""DP with secure aggregation: the rows of ``benchmarks/privacy.py --secure``.

The same devices, data split, model and local training as the central-DP rows, but every round is a full
secure-aggregation round in-process (``coordinator/secagg/local.py``: real X25519, ChaCha20 masks, Shamir,
AES-GCM, wire framing) with the parameters the coordinator derives from the job (``normalize_job`` with
``privacy`` + ``secure_aggregation``, then ``round_params``): each device clips its random-k vector to
``privacy.clip`` and adds its share of Skellam noise in the ring; the coordinator unmasks the sum, adds
nothing, divides by the fixed ``clients_per_round`` (``DistributedDPMechanism``), and the job's own
``JobPrivacy`` checks the budget before each round and charges it after (what the runner does).
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from coordinator.privacy.budget import JobPrivacy
from coordinator.rounds.jobspec import normalize_job
from coordinator.rounds.limits import UpdateLimits
from coordinator.rounds.strategy import make_strategy
from coordinator.secagg.flow import round_params
from coordinator.secagg.local import run_round
from edge_sdk.data import dirichlet_partition, load_digits_split
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.models import build_model
from edge_sdk.params import load_arrays, state_to_arrays
from edge_sdk.protocol import codecs
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
from edge_sdk.secagg.update import encode_secure
from edge_sdk.trainer import LocalTrainer
from edge_sdk.update import statistics_mask


def secure_job(epsilon: float, args: argparse.Namespace, clip: float, density: float) -> dict[str, Any]:
    body = {"name": "privacy-secagg", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
            "rounds": args.rounds, "clients_per_round": args.clients, "eval": {"dataset": "digits"},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
            "codec": {"name": "randk", "density": density, "error_feedback": True},
            "privacy": {"epsilon": epsilon if math.isfinite(epsilon) else 1e4, "delta": args.delta,
                        "clip": {"mode": "fixed", "bound": clip}},
            "secure_aggregation": {}}
    return normalize_job(body)


def accuracy(model: torch.nn.Module, test: Any) -> float:
    x, y = test.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def simulate_secure(epsilon: float, seed: int, args: argparse.Namespace, clip: float, density: float
                    ) -> dict[str, Any]:
    """One job; ``epsilon = inf``: the same pipeline (clip, rand-k, ring, fixed denominator) with no noise."""
    cfg = secure_job(epsilon, args, clip, density)
    noisy = math.isfinite(epsilon)
    if not noisy:
        cfg["secure_aggregation"]["noise_multiplier"] = 0.0
    strategy = make_strategy(cfg["strategy"], UpdateLimits.from_config(cfg["limits"]))
    job_privacy = JobPrivacy(cfg["privacy"], cfg["clients_per_round"])
    strategy.privacy = job_privacy.mechanism
    train, test = load_digits_split(seed=0)
    parts = dirichlet_partition(train.tensors[1].numpy(), args.clients, args.alpha, seed=seed)
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, in_channels=1)
    arrays = state_to_arrays(model)
    global_vec, sizes, stats = flatten(arrays), layout_sizes(arrays), statistics_mask(arrays)
    trainer = LocalTrainer("cpu", cpu_threads=1)
    job = {"id": "bench", "config": cfg}
    curve, eps_curve, rounds_info = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        stores = {c: ResidualStore(Path(tmp) / str(c)) for c in range(args.clients)}
        for r in range(1, args.rounds + 1):
            if noisy and job_privacy.refusal(r) is not None:  # the runner's budget gate
                break
            spec = strategy.configure_round(job, r, [])["codec"]
            k = codecs.expected_counts(spec, sizes)[0]
            acc = strategy.begin(global_vec)
            deltas = {}
            for c in range(args.clients):
                load_arrays(model, unflatten(global_vec, arrays))
                trainer.train(model, Subset(train, parts[c].tolist()), {**cfg["train"], "seed": seed * 997 + r})
                deltas[f"d-{c:04d}"] = flatten(state_to_arrays(model)) - global_vec
            sent: dict[str, Any] = {}

            def enc(device: str, fixed: Any, spec: dict = spec, sent: dict = sent) -> np.ndarray:
                ring, decoded = encode_secure(spec, deltas[device], fixed, stores[int(device[2:])], "bench", stats,
                                              dp=True)  # what the device's SecureRounds does under DP
                sent[device] = decoded
                return ring

            lr = run_round({d: np.zeros(k) for d in deltas}, round_params(cfg, k), encode=enc, round_=r, seed=r)
            assert lr.result is not None, lr.error
            acc.add_secure_sum(next(iter(sent.values())).indices, lr.result.sum, len(lr.result.survivors))
            global_vec = acc.finalize()
            if noisy:
                record = job_privacy.round_record(acc.release)
                job_privacy.charge(record)
                eps_curve.append(record["epsilon"])
            rounds_info.append({"k": int(k), "survivors": len(lr.result.survivors),
                                "min_survivors": lr.server.min_devices, "scale": lr.server.fixed.scale,
                                "effective_noise_multiplier": lr.result.effective_noise_multiplier,
                                "coordinator_s": lr.coordinator_s,
                                "uplink_bytes_per_device": float(np.mean([sum(v.values())
                                                                          for v in lr.traffic.up.values()]))})
            load_arrays(model, unflatten(global_vec, arrays))
            curve.append(accuracy(model, test))
    first = rounds_info[0]
    return {"epsilon_target": epsilon, "clip": clip, "density": density, "seed": seed,
            "final_accuracy": curve[-1], "curve": curve, "rounds_run": len(curve),
            "epsilon_spent": eps_curve[-1] if eps_curve else None, "epsilon_curve": eps_curve,
            "noise_multiplier": cfg["privacy"]["noise_multiplier"] if noisy else 0.0,
            "device_noise_multiplier": cfg["secure_aggregation"]["noise_multiplier"],
            "effective_noise_multiplier": first["effective_noise_multiplier"],
            "min_survivors": first["min_survivors"], "k": first["k"],
            "uplink_bytes_per_device": float(np.mean([x["uplink_bytes_per_device"] for x in rounds_info])),
            "coordinator_s_per_round": float(np.mean([x["coordinator_s"] for x in rounds_info])),
            "numel": int(global_vec.size)}


def _eps(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def secure_report_lines(runs: list[dict[str, Any]], cfg: dict[str, Any], central: dict[str, Any] | None
                        ) -> list[str]:
    """The BENCHMARKS.md section for the secure rows (``central``: the saved central-DP table, for reference)."""
    lines = [f"{cfg['clients']} simulated devices in-process, non-IID digits (Dirichlet alpha={cfg['alpha']}), every "
             f"device in every round, {cfg['rounds']} rounds, small_cnn, {cfg['epochs']} local epochs at lr "
             f"{cfg['lr']}; rand-k with error feedback under secure aggregation (real cryptography, in-process); "
             f"each device clips its k values to C and adds its share of Skellam noise in the ring, sized so that "
             f"any t survivors carry the calibrated noise; the coordinator adds none. delta = {cfg['delta']:g}, "
             "no sampling amplification, epsilon as the job's accountant reports it (Gaussian of the guaranteed "
             "multiplier z, integer RDP orders, zero-out adjacency; docs/privacy.md). Seeds: "
             f"{sorted({r['seed'] for r in runs})}.", "",
             "| C | density | target epsilon | epsilon spent | rounds | z charged | z in the sum (all survive, "
             "t of n) | uplink per device per round | coordinator s per round | final accuracy |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        target = "inf (clipped, no noise)" if not math.isfinite(float(r["epsilon_target"])) else str(r["epsilon_target"])
        z_eff = (f"{r['effective_noise_multiplier']:.3g} (t = {r['min_survivors']} of {cfg['clients']})"
                 if r["noise_multiplier"] else "0")
        lines.append(f"| {r['clip']:g} | {r['density']:.0%} | {target} (seed {r['seed']}) | {_eps(r['epsilon_spent'])} | "
                     f"{r['rounds_run']} | {r['noise_multiplier']:.3g} | {z_eff} | "
                     f"{r['uplink_bytes_per_device']:,.0f} B | {r['coordinator_s_per_round']:.2f} | "
                     f"{r['final_accuracy'] * 100:.1f}% |")
    within = all(r["epsilon_spent"] is None or r["epsilon_spent"] <= float(r["epsilon_target"]) for r in runs)
    lines += ["", "Every job stayed within its target." if within else "SOME JOB EXCEEDED ITS TARGET."]
    if central:
        ref = ", ".join(f"{row['epsilon']}: {row['accuracy_mean'] * 100:.1f}%" for row in central.values()
                        if row.get("clip") == 1.0)
        lines += ["", f"Central DP for reference (section above, dense fp32, C = 1, noise on every coordinate): {ref}. "
                  "Under secure aggregation the noise lies only on the round's k shared coordinates (the others "
                  "are public zeros), and devices size it for the worst case of t survivors, so with everyone "
                  "surviving the sum carries more than the charged z."]
    return lines
