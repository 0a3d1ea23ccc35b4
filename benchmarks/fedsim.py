"""In-process FedAvg over device shards with the real device code paths (no MQTT, no processes).

Each round every shard trains with ``LocalTrainer`` from the global model, its delta goes through
``encode_delta`` (error feedback + codec) and the wire framing, and the coordinator's streaming ``FedAvg``
accumulator aggregates what ``codecs.decode`` reads back. Used by ``bn_stats.py`` and ``finetune.py``, which
compare starting points or BatchNorm handling under identical rounds and bytes.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from coordinator.rounds.strategy import FedAvg
from edge_sdk import params
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.wire import UpdateHeader, decode_update, encode_update
from edge_sdk.trainer import LocalTrainer
from edge_sdk.update import encode_delta, statistics_mask

DENSE = {"name": "dense", "dtype": "float32"}
DEVICE_KEY = b"k" * 32  # the simulated devices' HMAC key (frames are MAC-signed as on the wire)


@dataclass
class FedResult:
    accuracy_per_round: list[float] = field(default_factory=list)
    uplink_bytes: int = 0

    @property
    def final_accuracy(self) -> float:
        return self.accuracy_per_round[-1] if self.accuracy_per_round else 0.0


def load_tensors(root: Path, image_size: int = 32) -> TensorDataset:
    """An ImageFolder tree as one in-memory TensorDataset (SDK preprocessing, ImageNet normalisation)."""
    from edge_sdk import data

    ds = data.image_folder(root, image_size, channels=3)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return TensorDataset(x, torch.as_tensor(ds.targets, dtype=torch.long))


def federate(model: nn.Module, train: TensorDataset, test: TensorDataset, shards: list[np.ndarray], rounds: int,
             train_cfg: dict[str, Any], codec: dict[str, Any] = DENSE,
             evaluate: Callable[[nn.Module], float] | None = None) -> FedResult:
    """FedAvg ``model`` (its current weights are round 0) for ``rounds``; every shard takes part each round."""
    template = params.state_to_arrays(model)
    sizes = layout_sizes(template)
    global_vec = flatten(template)
    stats = statistics_mask(template)
    trainer = LocalTrainer(device="cpu")
    strategy = FedAvg()
    out = FedResult()
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[int, ResidualStore] = {}
        for rnd in range(1, rounds + 1):
            spec = strategy.configure_round({"id": "sim", "config": {"codec": codec, "seed": 0}}, rnd, [])["codec"]
            acc = strategy.begin(global_vec)
            for cid, shard in enumerate(shards):
                params.load_arrays(model, unflatten(global_vec, template))
                res = trainer.train(model, Subset(train, shard.tolist()), {**train_cfg, "seed": rnd * 1000 + cid})
                delta = flatten(params.state_to_arrays(model)) - global_vec
                store = stores.setdefault(cid, ResidualStore(Path(tmp) / str(cid)))
                payload, _ = encode_delta(spec, delta, sizes, store, "sim", stats)
                header = UpdateHeader("sim-job", rnd, f"client-{cid}", "f" * 64, codec_digest(spec), res.num_samples,
                                      int(global_vec.size), res.metrics())
                message = encode_update(header, payload, DEVICE_KEY)
                out.uplink_bytes += len(message)
                head, body = decode_update(message)
                acc.add(codecs.decode(spec, body, head.numel, sizes, stats), head.num_samples)
            global_vec = acc.finalize()
            params.load_arrays(model, unflatten(global_vec, template))
            score = evaluate(model) if evaluate else trainer.evaluate(model, test)["accuracy"]
            out.accuracy_per_round.append(score)
    return out
