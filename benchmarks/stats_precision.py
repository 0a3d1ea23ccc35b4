"""Precision of the codec's BatchNorm-statistics block (``stats``) on real statistics deltas.

One local epoch from random init on the generated colour shapes (32 px, 200 images, the trainer as devices
run it), then each statistics tensor's relative L2 error after the float16 and int8 blocks: the check behind
the int8 per-tensor scales in docs/codecs.md ("Statistics block"). Prints only; single seed.

    nice -n 10 python benchmarks/stats_precision.py mobilenet_v3_small resnet18
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compression import colour  # noqa: E402
from edge_sdk import params  # noqa: E402
from edge_sdk.models import build_model  # noqa: E402
from edge_sdk.protocol import stats_block  # noqa: E402
from edge_sdk.protocol.modelfile import flatten, layout_sizes  # noqa: E402
from edge_sdk.trainer import LocalTrainer  # noqa: E402
from edge_sdk.update import statistics_mask  # noqa: E402


def main(archs: list[str]) -> None:
    torch.set_num_threads(1)
    for arch in archs:
        torch.manual_seed(0)
        setup = colour(arch, 1, size=32, train_per_class=20, test_per_class=1)
        model = build_model(arch, 10, 3)
        arrays = params.state_to_arrays(model)
        base, mask = flatten(arrays), statistics_mask(arrays)
        LocalTrainer(device="cpu").train(model, setup.train, {"epochs": 1, "batch_size": 16, "lr": 0.05, "seed": 1})
        delta = (flatten(params.state_to_arrays(model)) - base)[mask]
        tensors = stats_block.stats_layout(mask, layout_sizes(arrays))
        for kind in ("float16", "int8"):
            raw, sent = stats_block.encode_block(kind, delta, tensors)
            errs, zeroed, pos = [], 0, 0
            for n in tensors:
                x, s = delta[pos:pos + n], sent[pos:pos + n]
                pos += n
                errs.append(float(np.linalg.norm(x - s) / max(float(np.linalg.norm(x)), 1e-30)))
                zeroed += int(((s == 0) & (x != 0)).sum())
            print(f"{arch} {kind}: {len(raw):,} B; per-tensor relative error median {np.median(errs):.4f}, "
                  f"max {max(errs):.3f}; tensors above 10 %: {sum(e > 0.1 for e in errs)}/{len(errs)}; "
                  f"non-zero deltas sent as 0: {zeroed}/{delta.size}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["mobilenet_v3_small", "resnet18"])
