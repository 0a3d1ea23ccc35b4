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


def secure_job(epsilon: float, args: argparse.Namespace, clip: float, density: float, min_clients: int
               ) -> dict[str, Any]:
    body = {"name": "privacy-secagg", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
            "rounds": args.rounds, "clients_per_round": args.clients, "min_clients": min(min_clients, args.clients),
            "eval": {"dataset": "digits"},
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


def simulate_secure(epsilon: float, seed: int, args: argparse.Namespace, clip: float, density: float,
                    min_clients: int = 3) -> dict[str, Any]:
    """One job; ``epsilon = inf``: the same pipeline (clip, rand-k, ring, fixed denominator) with no noise.
    ``min_clients``: the job's minimum, which with the protocol's strict majority sets the survivors t that
    the devices size their noise for."""
    cfg = secure_job(epsilon, args, clip, density, min_clients)
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
    return {"epsilon_target": epsilon, "clip": clip, "density": density, "seed": seed, "min_clients": min_clients,
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


def secure_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (clip, density, target epsilon), mean over seeds."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault((r["clip"], r["density"], str(r["epsilon_target"]), r["min_survivors"]), {
            "clip": r["clip"], "density": r["density"], "epsilon": str(r["epsilon_target"]), "accuracy_per_seed": [],
            "epsilon_spent": [], "rounds_run": r["rounds_run"], "noise_multiplier": r["noise_multiplier"],
            "effective_noise_multiplier": r["effective_noise_multiplier"], "min_survivors": r["min_survivors"],
            "uplink": [], "coordinator_s": [], "seeds": []})
        row["seeds"].append(r["seed"])
        row["accuracy_per_seed"].append(r["final_accuracy"])
        row["epsilon_spent"].append(r["epsilon_spent"])
        row["uplink"].append(r["uplink_bytes_per_device"])
        row["coordinator_s"].append(r["coordinator_s_per_round"])
    for row in rows.values():
        row["accuracy_mean"] = float(np.mean(row["accuracy_per_seed"]))
        spent = [e for e in row["epsilon_spent"] if e is not None]
        row["epsilon_spent"] = max(spent) if spent else None
        row["uplink"], row["coordinator_s"] = float(np.mean(row["uplink"])), float(np.mean(row["coordinator_s"]))
    return list(rows.values())


def secure_report_lines(runs: list[dict[str, Any]], cfg: dict[str, Any], central: dict[str, Any] | None,
                        reference: dict[str, Any] | None = None) -> list[str]:
    """The BENCHMARKS.md section for the secure rows (``central``: the saved central-DP table; ``reference``:
    central-DP runs on the same seeds, from ``--central-reference``)."""
    table = secure_table(runs)
    numel = runs[0]["numel"]
    lines = [f"{cfg['clients']} simulated devices in-process, non-IID digits (Dirichlet alpha={cfg['alpha']}), every "
             f"device in every round, {cfg['rounds']} rounds, small_cnn ({numel:,} values), {cfg['epochs']} local "
             f"epochs at lr {cfg['lr']}. Every round is a full secure-aggregation round in-process (real "
             "cryptography and wire framing, no broker) over the round's shared random-k coordinates (error feedback "
             "on; density 100 %: the whole vector in the ring). Each device clips its k values to C and adds its "
             "share of Skellam noise in the ring, sized so that any t survivors carry the calibrated noise; the "
             f"coordinator adds none and divides by the fixed {cfg['clients']} devices per round. delta = "
             f"{cfg['delta']:g}, no sampling amplification; epsilon is what the job's accountant reports (a Gaussian "
             "of the guaranteed multiplier z, integer RDP orders, zero-out adjacency; docs/privacy.md). Final test "
             f"accuracy on the 360 held-out digits, mean over the seeds listed per row (partition and initial "
             "model; the noise comes from the OS CSPRNG, so a rerun of one seed differs).", "",
             "| C | density | target epsilon | epsilon spent (accountant) | z charged | z in the sum (all survive; "
             "sized for t) | uplink per device per round | coordinator CPU s per round | final accuracy |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in table:
        target = "inf (clipped, no noise)" if row["epsilon"] == "inf" else row["epsilon"]
        z_sum = (f"{row['effective_noise_multiplier']:.3g} (t = {row['min_survivors']} of {cfg['clients']})"
                 if row["noise_multiplier"] else "0")
        seeds = " / ".join(f"{a * 100:.1f}" for a in row["accuracy_per_seed"])
        target += f" (seeds {', '.join(str(x) for x in row['seeds'])})"
        lines.append(f"| {row['clip']:g} | {row['density']:.0%} | {target} | {_eps(row['epsilon_spent'])} | "
                     f"{row['noise_multiplier']:.3g} | {z_sum} | {row['uplink']:,.0f} B | {row['coordinator_s']:.2f} | "
                     f"{row['accuracy_mean'] * 100:.1f}%" + (f" ({seeds})" if len(row["accuracy_per_seed"]) > 1 else "")
                     + " |")
    within = all(r["epsilon_spent"] is None or r["epsilon_spent"] <= float(r["epsilon"]) for r in table)
    lines += ["", ("Every job stayed within its target and ran all its rounds."
                   if within and all(r["rounds_run"] == cfg["rounds"] for r in table)
                   else "SOME JOB EXCEEDED ITS TARGET OR STOPPED EARLY."),
              f"Dense fp32 for comparison: {4 * numel:,} B of values per device per round."]
    if central:
        ref = ", ".join(f"epsilon {row['epsilon']}: {row['accuracy_mean'] * 100:.1f}%" for row in central.values()
                        if row.get("clip") == 1.0)
        lines += ["", f"Central DP, same devices and training (section above; dense fp32, C = 1, seed 0): {ref}."]
    if reference and reference.get("runs"):
        ref = reference["runs"]
        by_eps: dict[str, list[float]] = {}
        for r in ref:
            by_eps.setdefault(str(r["epsilon_target"]), []).append(r["final_accuracy"])
        lines += ["", "Central DP on the same seeds (dense fp32, C = 1, noise added by the coordinator; "
                  f"`{reference['command']}`): " + ", ".join(
                      f"epsilon {e}: {np.mean(a) * 100:.1f}% ({' / '.join(f'{x * 100:.1f}' for x in a)})"
                      for e, a in by_eps.items()) + "."]
    lines += findings(table, central, reference)
    return lines


def _pct(rows: list[dict[str, Any]]) -> str:
    return " / ".join(f"{r['accuracy_mean'] * 100:.1f}%" for r in rows)


def findings(table: list[dict[str, Any]], central: dict[str, Any] | None, reference: dict[str, Any] | None = None
             ) -> list[str]:
    """What the rows show, computed from them (no fixed claims)."""
    out: list[str] = []
    central_8 = next((r for r in (central or {}).values() if r.get("clip") == 1.0 and r["epsilon"] == "8"), None)
    same_seeds = [r for r in (reference or {}).get("runs", []) if str(r["epsilon_target"]) == "8" and r["clip"] == 1.0]
    if central_8 is not None and same_seeds:
        central_8 = {**central_8, "accuracy_mean": float(np.mean([r["final_accuracy"] for r in same_seeds])),
                     "seeds": "seeds " + ", ".join(str(r["seed"]) for r in same_seeds)}
    for density in sorted({r["density"] for r in table}, reverse=True):
        rows = [r for r in table if r["density"] == density]
        noisy = sorted((r for r in rows if r["noise_multiplier"]), key=lambda r: r["min_survivors"])
        clean = [r for r in rows if not r["noise_multiplier"]]
        if not noisy or not clean:
            continue
        spread = [a * 100 for a in clean[0]["accuracy_per_seed"]]
        sized = ", ".join(f"{r['accuracy_mean'] * 100:.1f}% with noise sized for t = {r['min_survivors']} "
                          f"(the sum carries z = {r['effective_noise_multiplier']:.2f})" for r in noisy)
        head = (f"**Density {density:.0%}.** Epsilon {noisy[0]['epsilon']}: {sized}; without noise "
                f"{clean[0]['accuracy_mean'] * 100:.1f}% ({min(spread):.0f}-{max(spread):.0f}% across seeds)")
        if density >= 1.0 and central_8 is not None:
            head += (f"; central DP at the same epsilon, noise z = {central_8['noise_multiplier']:.2f} added by the "
                     f"coordinator: {central_8['accuracy_mean'] * 100:.1f}% ({central_8.get('seeds', 'seed 0')})")
        ordered = all(a["accuracy_mean"] <= b["accuracy_mean"] for a, b in zip(noisy, noisy[1:]))
        if density >= 1.0 and ordered:
            head += (". Less noise in the sum, more accuracy: each device adds 1/t of the variance and the "
                     "protocol needs a strict majority to unmask, so with everyone surviving the sum carries "
                     f"sqrt(n/t) times the charged z. Setting min_clients near the survivors you expect brings the "
                     f"noise in the sum close to central DP's (z {noisy[-1]['effective_noise_multiplier']:.2f} at "
                     f"t = {noisy[-1]['min_survivors']}), at the cost of dropout tolerance.")
        elif min(spread) < 60:
            head += (". Without noise this codec has not converged in these rounds, so its noised rows move "
                     "more with the seed than with the noise and say little; random-k under secure aggregation "
                     "needs more rounds, which at a fixed epsilon means more noise per round.")
        else:
            head += "."
        out += ["", head]
    return out
