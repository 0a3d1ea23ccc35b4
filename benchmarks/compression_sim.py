"""One federated run for the compression benchmark, through the code paths a job uses.

Per round: the strategy's ``configure_round`` (which resolves a density warm-up), ``LocalTrainer`` on each
selected device's shard (BatchNorm statistics re-estimated on device, as product code does), error feedback
through ``ResidualStore``, ``codecs.encode`` and the wire framing with the header a device sends
(wire v3: codec digest, ``wire_metrics``, a 64-hex base version, the MAC), then ``decode_update`` + ``codecs.decode``
into the strategy's accumulator (with a job's default limits: weighting and adaptive clipping),
``clamp_variances`` as the runner does, and a test-set evaluation. Only MQTT is left out; it moves exactly
the bytes counted here.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from coordinator.rounds.limits import UpdateLimits
from coordinator.rounds.strategy import make_strategy
from edge_sdk import params
from edge_sdk.error_feedback import ResidualStore
from edge_sdk.models import build_model
from edge_sdk.protocol import codecs
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
from edge_sdk.protocol.codec_digest import codec_digest
from edge_sdk.protocol.wire import UpdateHeader, decode_update, encode_update
from edge_sdk.trainer import LocalTrainer
from edge_sdk.update import clamp_variances, encode_delta, statistics_mask, wire_metrics

DEVICE_KEY = b"k" * 32


@dataclass
class Setup:
    """A data set, its label-skewed split and the job's settings (identical for every codec row)."""

    name: str
    arch: str
    in_channels: int
    train: TensorDataset
    test: TensorDataset
    shards_for_seed: Any          # seed -> list of index arrays (one per device)
    per_round: int
    rounds: int
    train_cfg: dict
    limits: dict | None = None    # the job's `limits` (None: a job's defaults, direction screen included)


def run(setup: Setup, codec: dict, strategy: dict | None, seed: int) -> dict:
    """One run; returns per-round accuracy, message/payload bytes and timings."""
    torch.manual_seed(seed)
    shards = setup.shards_for_seed(seed)
    n_classes = int(setup.train.tensors[1].max()) + 1
    model = build_model(setup.arch, n_classes, setup.in_channels)
    template = params.state_to_arrays(model)
    sizes = layout_sizes(template)
    global_vec = flatten(template)
    stats = statistics_mask(template)
    trainer = LocalTrainer(device="cpu")
    strat = make_strategy(strategy, UpdateLimits.from_config(setup.limits))  # job default limits unless set
    rng = np.random.default_rng(seed)
    job = {"id": "job-3f9a1c2e", "config": {"codec": codec, "seed": seed, "train": setup.train_cfg}}
    accs: list[float] = []
    msg_bytes: list[int] = []     # per round, summed over devices
    pay_bytes: list[int] = []
    enc_t = train_t = 0.0
    clamped = 0
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[int, ResidualStore] = {}
        for rnd in range(1, setup.rounds + 1):
            chosen = rng.choice(len(shards), setup.per_round, replace=False)
            cfg = strat.configure_round(job, rnd, [f"device-{c:03d}" for c in chosen])
            spec = cfg["codec"]
            version = hashlib.sha256(global_vec.tobytes()).hexdigest()
            strat.observe_layout(stats)
            acc = strat.begin(global_vec)
            round_msg = round_pay = 0
            for cid in chosen:
                params.load_arrays(model, unflatten(global_vec, template))
                res = trainer.train(model, Subset(setup.train, shards[cid].tolist()),
                                    {**cfg, "seed": seed * 100_003 + rnd * 1009 + int(cid)})
                train_t += res.wall_time_s
                delta = flatten(params.state_to_arrays(model)) - global_vec
                t0 = time.perf_counter()
                store = stores.setdefault(int(cid), ResidualStore(Path(tmp) / str(cid)))
                payload, _ = encode_delta(spec, delta, sizes, store, "job-3f9a1c2e", stats)
                metrics = {"loss": res.loss, "accuracy": res.accuracy, "train_time_s": res.wall_time_s}
                header = UpdateHeader("job-3f9a1c2e", rnd, f"device-{cid:03d}", version, codec_digest(spec),
                                      res.num_samples, int(global_vec.size), wire_metrics(metrics))
                message = encode_update(header, payload, DEVICE_KEY)
                enc_t += time.perf_counter() - t0
                round_msg += len(message)
                round_pay += len(payload)
                head, body = decode_update(message)
                acc.add(codecs.decode(spec, body, head.numel, sizes, stats), head.num_samples)
            arrays = unflatten(acc.finalize(), template)
            clamped += clamp_variances(arrays)  # variances the aggregate carried below 0 (then clamped)
            global_vec = flatten(arrays)
            params.load_arrays(model, arrays)
            accs.append(trainer.evaluate(model, setup.test)["accuracy"])
            msg_bytes.append(round_msg)
            pay_bytes.append(round_pay)
    return {"seed": seed, "accuracy_per_round": accs, "final_accuracy": accs[-1],
            "message_bytes_per_round": msg_bytes, "payload_bytes_per_round": pay_bytes,
            "updates": setup.rounds * setup.per_round, "encode_share_of_training": enc_t / max(train_t, 1e-9),
            "clamped_variances": clamped}


def bytes_to_target(run_: dict, target: float) -> int | None:
    """Uplink message bytes sent up to and including the first round whose accuracy reaches ``target``."""
    total = 0
    for acc, nbytes in zip(run_["accuracy_per_round"], run_["message_bytes_per_round"]):
        total += nbytes
        if acc >= target:
            return total
    return None
