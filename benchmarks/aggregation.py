"""Server aggregation cost: streaming accumulator vs "hold every update, then average".

For N = 10, 100, 1000 updates of a MobileNetV3-small-sized model (2,542,856 float32 = the float entries of
torchvision's mobilenet_v3_small with 1000 classes; no torch import, so RSS is not inflated by it), each run
in a fresh subprocess so ``ru_maxrss`` is that run's own peak. Updates are produced one at a time by a
generator (encoded with the real codecs and wire format) so the producer never holds them all; what is
timed is the coordinator's per-update work: wire parse + CRC, codec decode, finiteness check, and either
``Accumulator.add`` (streaming) or keeping the decoded update (baseline, which averages at the end).

    python benchmarks/aggregation.py            # full run, writes results/aggregation.json + BENCHMARKS.md
    python benchmarks/aggregation.py --quick    # N = 10, 100 only
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.rounds.strategy import FedAvg  # noqa: E402
from coordinator.rounds.validation import decode_payload, parse_message  # noqa: E402
from edge_sdk.protocol import codecs  # noqa: E402
from edge_sdk.protocol.codec_digest import codec_digest  # noqa: E402
from edge_sdk.protocol.wire import UpdateHeader, encode_update  # noqa: E402

NUMEL = 2_542_856
BENCH_KEY = b"k" * 32  # device key; the MAC check itself is measured in docs/security.md
CODECS = {"dense": {"name": "dense", "dtype": "float32"},
          "topk1%": {"name": "topk", "density": 0.01, "values": "float32"}}
RESULTS = ROOT / "benchmarks" / "results" / "aggregation.json"
POOL = 3  # distinct deltas cycled through; each message is still a fresh bytes object


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _layout(numel: int) -> list[int]:
    return [numel - 1000, 1000]


def updates(n: int, codec: dict, numel: int) -> Iterator[tuple[bytes, int]]:
    """Yield (wire message, num_samples) one at a time; only a small pool of payloads is ever held."""
    rng = np.random.default_rng(0)
    payloads = [codecs.encode(codec, (rng.standard_normal(numel, dtype=np.float32) * 0.01), _layout(numel))[0]
                for _ in range(POOL)]
    digest = codec_digest(codec)
    for i in range(n):
        samples = 10 + (i * 7) % 90
        header = UpdateHeader("job-bench", 1, f"c{i}", "0" * 64, digest, samples, numel, {"loss": 1.0})
        yield encode_update(header, payloads[i % POOL], BENCH_KEY), samples


def worker(mode: str, n: int, codec_name: str, numel: int) -> dict:
    codec = CODECS[codec_name]
    rnd = SimpleNamespace(codec=codec, numel=numel, layout_sizes=_layout(numel), statistics=None, secagg=None)
    global_vec = np.zeros(numel, np.float32)
    start_rss = _rss_mb()
    busy = 0.0
    acc = FedAvg().begin(global_vec)
    held: list[tuple[codecs.Decoded, int]] = []
    for raw, samples in updates(n, codec, numel):
        t0 = time.perf_counter()
        header, payload = parse_message(raw, 256 << 20)
        decoded = decode_payload(header, payload, rnd)  # type: ignore[arg-type]
        if mode == "streaming":
            acc.add(decoded, samples)
        else:
            held.append((decoded, samples))
        busy += time.perf_counter() - t0
        del raw, payload, decoded
    t0 = time.perf_counter()
    if mode == "streaming":
        new = acc.finalize()
    else:  # the textbook server: every update in memory, then one weighted average
        total = np.zeros(numel, np.float64)
        for d, w in held:
            total += d.to_dense(numel) * w
        new = global_vec + (total / sum(w for _, w in held)).astype(np.float32)
    busy += time.perf_counter() - t0
    assert new.shape == (numel,) and np.isfinite(new).all()
    return {"mode": mode, "codec": codec_name, "n": n, "numel": numel, "seconds": busy,
            "ms_per_update": 1000 * busy / n, "start_rss_mb": start_rss, "peak_rss_mb": _rss_mb()}


def run_one(mode: str, n: int, codec: str, numel: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(n), codec, "--numel", str(numel)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_gb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover
        return 8.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "N", "CODEC"), help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, default=NUMEL)
    ap.add_argument("--quick", action="store_true", help="N = 10 and 100 only")
    ap.add_argument("--max-baseline-gb", type=float, default=None,
                    help="skip baseline runs whose held updates would exceed this (default: 40%% of free RAM)")
    args = ap.parse_args()
    if args.worker:
        mode, n, codec = args.worker
        print(json.dumps(worker(mode, int(n), codec, args.numel)))
        return
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    budget = args.max_baseline_gb if args.max_baseline_gb is not None else 0.4 * _available_gb()
    rows, skipped = [], []
    for n in sizes:
        for mode in ("streaming", "hold_all"):
            need_gb = n * args.numel * 4 / 2**30
            if mode == "hold_all" and need_gb > budget:
                skipped.append({"mode": mode, "codec": "dense", "n": n, "reason":
                                f"would hold ~{need_gb:.1f} GiB of updates (budget {budget:.1f} GiB)"})
                print(f"skip hold_all N={n}: needs ~{need_gb:.1f} GiB", file=sys.stderr)
                continue
            rows.append(run_one(mode, n, "dense", args.numel))
            print(json.dumps(rows[-1]), file=sys.stderr)
    sparse_n = 100
    rows.append(run_one("streaming", sparse_n, "topk1%", args.numel))
    print(json.dumps(rows[-1]), file=sys.stderr)
    stream = {r["n"]: r for r in rows if r["mode"] == "streaming" and r["codec"] == "dense"}
    ratio = stream[sizes[-1]]["peak_rss_mb"] / stream[10]["peak_rss_mb"]
    dense100 = stream[100]["ms_per_update"]
    sparse100 = rows[-1]["ms_per_update"]
    command = "python benchmarks/aggregation.py" + (" --quick" if args.quick else "")
    result = {"numel": args.numel, "rows": rows, "skipped": skipped, "command": command,
              "streaming_peak_rss_ratio": {"n_hi": sizes[-1], "n_lo": 10, "ratio": ratio, "target": 1.3},
              "sparse_vs_dense_ms_per_update": {"n": sparse_n, "dense": dense100, "topk1%": sparse100}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, sizes)


def write_markdown(result: dict, sizes: list[int]) -> None:
    from benchmarks.report import write_section

    lines = [f"Model: {result['numel']:,} float32 parameters (MobileNetV3-small size, "
             f"{result['numel'] * 4 / 2**20:.1f} MiB dense). Per-update work timed: wire parse + CRC, codec "
             "decode, finiteness check, then accumulate (streaming) or keep (hold_all, averaged at the end; "
             "the final average is included in total s). Each row is a fresh process; peak RSS is its "
             "`ru_maxrss`.", "",
             "| mode | codec | N | total s | ms / update | start RSS MiB | peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['codec']} | {r['n']} | {r['seconds']:.2f} | {r['ms_per_update']:.2f} | "
                     f"{r['start_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    for s in result["skipped"]:
        lines.append(f"| {s['mode']} | {s['codec']} | {s['n']} | skipped | | | {s['reason']} |")
    held = {r["n"]: r["peak_rss_mb"] for r in result["rows"] if r["mode"] == "hold_all"}
    if 10 in held and 100 in held and result["skipped"]:
        slope = (held[100] - held[10]) / 90
        lines += ["", f"hold_all grows by {slope:.1f} MiB per held update (N=10 -> 100), i.e. "
                      f"~{(held[10] + slope * 990) / 1024:.1f} GiB at N=1000."]
    ratio = result["streaming_peak_rss_ratio"]
    sv = result["sparse_vs_dense_ms_per_update"]
    verdict = "meets" if ratio["ratio"] <= ratio["target"] else "MISSES"
    lines += ["", f"Streaming peak RSS at N={ratio['n_hi']} / N={ratio['n_lo']}: **{ratio['ratio']:.3f}x** "
              f"({verdict} the <= {ratio['target']}x target): memory does not grow with the number of clients.",
              f"Aggregation time per update at N={sv['n']}: dense fp32 {sv['dense']:.2f} ms vs top-k 1% "
              f"{sv['topk1%']:.2f} ms ({sv['dense'] / sv['topk1%']:.1f}x faster: a sparse update is scattered "
              "into the running sum in O(k), never densified)."]
    write_section("aggregation", "Server aggregation: streaming vs hold-all", result["command"], lines)


if __name__ == "__main__":
    main()
