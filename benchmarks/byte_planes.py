"""Dense payloads with and without byte planes (codec key ``planes``), on the deltas of real local training.

Each case trains a model from random init with ``LocalTrainer`` for a few rounds of job-default settings
(lr 0.05, batch 32, ``max_steps`` SGD steps per round) on real images (scikit-learn digits, or the generated
colour-shapes task at 32 px), and encodes every round's delta both ways in the same process:

* ``plain``: ``{"name": "dense"}``, zlib level 1-6 on the raw float32 bytes when a probe says it pays (what a
  dense job did before);
* ``planes``: ``{"name": "dense", "planes": true}``, the byte planes deflated with zlib's RLE strategy (what a
  dense job created now does).

Bytes are exact; encode and decode times are the best of 3 calls. Both decode to the same bits (checked).

    nice -n 10 python benchmarks/byte_planes.py            # 4 cases, ~1-2 min on 2 cores

Writes benchmarks/results/byte_planes.json and the ``byte_planes`` section of BENCHMARKS.md.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from benchmarks.fedsim import load_tensors  # noqa: E402
from benchmarks.report import write_section  # noqa: E402
from benchmarks.shapes_dataset import TARGET, write_task  # noqa: E402
from edge_sdk import params  # noqa: E402
from edge_sdk.data import load_digits_split  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.protocol import codecs  # noqa: E402
from edge_sdk.protocol.modelfile import flatten  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402

log = logging.getLogger("byte_planes")
RESULTS = Path(__file__).resolve().parent / "results" / "byte_planes.json"
SPECS = {"plain": {"name": "dense"}, "planes": {"name": "dense", "planes": True}}
DEFAULT_CASES = ("small_cnn:digits", "small_cnn:shapes", "mobilenet_v3_small:shapes", "resnet18:shapes")


def best_of(fn: Callable[[], Any], reps: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def dataset(name: str, work: Path) -> TensorDataset:
    if name == "digits":
        return load_digits_split()[0]
    train_dir, _ = write_task(work / "shapes", TARGET, 30, 1, seed=0)
    return load_tensors(train_dir)


def run_case(case: str, rounds: int, steps: int, work: Path) -> dict[str, Any]:
    arch, data_name = case.split(":")
    data = dataset(data_name, work)
    torch.manual_seed(0)
    model = build_model(arch, 10, int(data.tensors[0].shape[1]))
    trainer = LocalTrainer(device="cpu")
    rows = []
    for rnd in range(1, rounds + 1):
        before = flatten(params.state_to_arrays(model))
        trainer.train(model, data, {"epochs": 1, "batch_size": 32, "lr": 0.05, "seed": rnd, "max_steps": steps})
        delta = flatten(params.state_to_arrays(model)) - before
        row: dict[str, Any] = {"round": rnd, "numel": int(delta.size)}
        for name, spec in SPECS.items():
            enc_s, (payload, _) = best_of(lambda: codecs.encode(spec, delta, [delta.size]))
            dec_s, decoded = best_of(lambda: codecs.decode(spec, payload, delta.size, [delta.size]))
            if decoded.values.tobytes() != delta.tobytes():
                raise AssertionError(f"{case} {name}: decode is not bit-exact")
            row[name] = {"bytes": len(payload), "encode_s": enc_s, "decode_s": dec_s}
        rows.append(row)
        log.info("%s round %d: plain %d B %.1f ms, planes %d B %.1f ms", case, rnd, row["plain"]["bytes"],
                 1e3 * row["plain"]["encode_s"], row["planes"]["bytes"], 1e3 * row["planes"]["encode_s"])
    med = {f"{name}_{key}": statistics.median(r[name][key] for r in rows)
           for name in SPECS for key in ("bytes", "encode_s", "decode_s")}
    return {"case": case, "numel": rows[0]["numel"], "rounds": rows, **med,
            "fp32_bytes": 4 * rows[0]["numel"]}


def write_markdown(out: dict[str, Any]) -> None:
    lines = [f"Deltas of {out['rounds']} local rounds per case ({out['steps']} SGD steps of 32 images each, lr 0.05, "
             "from random init), each encoded both ways in one process; medians over the rounds. `plain`: a dense "
             "job before byte planes (zlib on the raw float32 bytes when a probe says it pays); `planes`: a dense "
             "job created now. Both decode to the same bits.", "",
             "| case | params | fp32 bytes | plain bytes (share) | planes bytes (share) | planes vs plain | "
             "encode plain (ms) | encode planes (ms) | decode plain (ms) | decode planes (ms) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in out["cases"]:
        fp32 = c["fp32_bytes"]
        lines.append(
            f"| {c['case']} | {c['numel']:,} | {fp32:,} | {c['plain_bytes']:,.0f} ({c['plain_bytes'] / fp32:.2f}) | "
            f"{c['planes_bytes']:,.0f} ({c['planes_bytes'] / fp32:.2f}) | "
            f"**{c['planes_bytes'] / c['plain_bytes']:.2f}x bytes** | {1e3 * c['plain_encode_s']:.1f} | "
            f"{1e3 * c['planes_encode_s']:.1f} | {1e3 * c['plain_decode_s']:.1f} | {1e3 * c['planes_decode_s']:.1f} |")
    lines += ["", "`benchmarks/compression.py` measures its dense baseline with `planes` since this section was added; "
              "its setups marked (plain dense) were measured with `plain`, and against a dense job created now their "
              "ratios are smaller by about the `planes vs plain` factor of the matching model.", ""]
    write_section("byte_planes", "Dense payloads: byte planes vs plain zlib", out["command"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="arch:data, data = digits|shapes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="SGD steps per round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(c, args.rounds, args.steps, Path(tmp)) for c in args.cases]
    command = "python benchmarks/byte_planes.py" + ("" if argv is None and sys.argv[1:] == [] else
                                                     " " + shlex.join(sys.argv[1:] if argv is None else argv))
    out = {"command": command.strip(), "rounds": args.rounds, "steps": args.steps, "cases": cases,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps([{k: v for k, v in c.items() if k != "rounds"} for c in cases], indent=1))
    if not args.no_write:
        RESULTS.write_text(json.dumps(out, indent=1))
        write_markdown(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
