"""Local training for one federated round (torch).

The hot loop is kept as lean as a hand-written PyTorch loop (benchmarked in ``benchmarks/training.py``):
in-memory datasets are batched by indexing resident tensors (no DataLoader/collate per step), metrics are
accumulated on the device during the last epoch only and read back once, and the FedProx term is applied
directly to the gradients with foreach ops instead of building an autograd graph over every weight.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from edge_sdk.bn_stats import recalibrate_batchnorm, training_batchnorms
from edge_sdk.label_prior import label_counts, logit_offset
from edge_sdk.models import backbone_and_head, head_module

log = logging.getLogger(__name__)

RECALIBRATION_BATCH = 256       # batch statistics are averaged over batches; larger batches are just faster
RECALIBRATION_SAMPLES = 4096    # one no-grad pass over at most this many local samples


@dataclass
class TrainConfig:
    """Per-round training settings (the ``config`` of a task; unknown keys such as ``codec`` are ignored)."""

    epochs: int = 1
    max_steps: int = 0              # stop after this many SGD steps (0: whole epochs); shorter rounds drift less
    batch_size: int = 32
    lr: float = 0.05
    mu: float = 0.0                 # FedProx proximal strength; 0 disables it
    freeze_backbone: bool = False
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone_lr_mult: float = 1.0   # backbone lr = lr * this (head keeps lr); 0 freezes the backbone weights
    bn_recalibrate: bool = True     # re-estimate BatchNorm running statistics after training (see bn_stats)
    logit_adjust: float = 0.0       # train on logits + this * log(local label prior); 0 disables (label_prior)

    @classmethod
    def coerce(cls, config: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names and v is not None})
        if (cfg.epochs < 1 or cfg.max_steps < 0 or cfg.batch_size < 1 or not cfg.lr > 0 or cfg.mu < 0
                or not cfg.backbone_lr_mult >= 0 or not 0 <= cfg.logit_adjust <= 10):
            raise ValueError(f"invalid train config: {asdict(cfg)}")
        return cfg


@dataclass
class TrainResult:
    num_samples: int        # dataset size (the FedAvg weight)
    loss: float             # mean cross-entropy (no proximal term) over the last epoch; all steps if max_steps is set
    accuracy: float         # training accuracy over the same samples as ``loss``
    wall_time_s: float
    device: str
    steps: int = 0
    samples_per_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "wall_time_s": self.wall_time_s}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """cuda -> mps -> cpu unless ``device`` names one."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) when the dataset is in memory, so batches can be cut by indexing."""
    if hasattr(dataset, "snapshot"):  # SampleBuffer: train on a consistent copy
        dataset = dataset.snapshot()
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = _as_tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


def _num_outputs(model: nn.Module) -> int:
    """Classes the model predicts: its last Linear layer's width (every architecture the SDK builds ends in one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("logit_adjust needs a model that ends in a Linear classifier")
    return linears[-1].out_features


class LocalTrainer:
    """SGD-with-momentum trainer for one round: device pick, bf16 autocast (CUDA), FedProx, frozen backbone.

    ``train`` moves ``model`` to the trainer's device and leaves it there; parameter ``requires_grad`` flags,
    train/eval mode and memory format are restored afterwards. The model's weights at entry are the
    FedProx anchor ``w_global``.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        mixed_precision: bool = True,
        channels_last: bool = False,
        num_workers: int = 0,
        max_device_bytes: int = 512 << 20,
        cpu_threads: int | None = None,
    ) -> None:
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None:  # explicit index so device comparisons are exact
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.amp = mixed_precision and self.device.type == "cuda"
        self.channels_last = channels_last and self.device.type == "cuda"
        self.num_workers = num_workers
        self.max_device_bytes = max_device_bytes  # in-memory datasets up to this size live on the device
        # torch intra-op threads while training on CPU (process-wide, restored afterwards). Set 1 when several
        # clients share a machine: oversubscribed OpenMP threads spin and can run 10-50x slower.
        self.cpu_threads = cpu_threads

    # ------------------------------------------------------------------------------------------ batches
    def _batches(self, dataset: Dataset, batch_size: int, gen: torch.Generator, train: bool
                 ) -> tuple[int, Any]:
        """(dataset size, factory of one epoch's iterator of device (x, y) batches).

        Training shuffles and skips a trailing batch of one sample (BatchNorm cannot train on it)."""
        dev = self.device
        tensors = _as_tensors(dataset)
        if tensors is not None:
            x_all, y_all = tensors
            if x_all.numel() * x_all.element_size() <= self.max_device_bytes:
                x_all, y_all = x_all.to(dev), y_all.to(dev)
            n = len(y_all)
            index_dev = x_all.device
            resident = index_dev == dev and y_all.device == dev

            def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                order = torch.randperm(n, generator=gen) if train else torch.arange(n)
                order = order.to(index_dev)
                stop = n - 1 if (train and n > 1 and n % batch_size == 1) else n
                for i in range(0, stop, batch_size):
                    idx = order[i:i + batch_size]
                    if resident:
                        yield x_all[idx], y_all[idx]
                    else:
                        yield x_all[idx].to(dev, non_blocking=True), y_all[idx].to(dev, non_blocking=True)

            return n, epoch

        n = len(dataset)  # type: ignore[arg-type]
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=gen,
                            num_workers=self.num_workers, pin_memory=dev.type == "cuda",
                            drop_last=train and n > 1 and n % batch_size == 1)

        def epoch_loader() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in loader:
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

        return n, epoch_loader

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        if not self.cpu_threads or self.device.type != "cpu":
            yield
            return
        prev = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(prev)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------- train
    def train(self, model: nn.Module, dataset: Dataset, config: TrainConfig | Mapping[str, Any] | None = None,
              progress: bool = False) -> TrainResult:
        """Train ``model`` in place on ``dataset`` with the round's ``config``."""
        with self._threads():
            return self._train(model, dataset, TrainConfig.coerce(config), progress)

    def _train(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, progress: bool) -> TrainResult:

        dev = self.device
        t0 = time.perf_counter()
        model.to(dev)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        was_training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        trainable, groups = self._param_groups(model, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        n, epoch_iter = self._batches(dataset, cfg.batch_size, gen, train=True)
        if n == 0:
            raise ValueError("cannot train on an empty dataset")
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        anchor = [p.detach().clone() for p in trainable] if cfg.mu > 0 else None
        offset = None
        if cfg.logit_adjust > 0:
            offset = logit_offset(label_counts(dataset, _num_outputs(model)), cfg.logit_adjust).to(dev)
        rng_devices = [dev.index] if dev.type == "cuda" else []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = cfg.epochs * math.ceil(n / cfg.batch_size)
            bar = tqdm(total=min(total, cfg.max_steps) if cfg.max_steps else total, desc="train", unit="step")
        steps = processed = 0
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(cfg.seed)
                model.train()
                if cfg.freeze_backbone:  # frozen BN running stats: backbone in eval, head trains
                    model.eval()
                    head_module(model).train()
                loss_sum = torch.zeros((), device=dev)
                correct = torch.zeros((), dtype=torch.int64, device=dev)
                seen = 0
                for ep in range(cfg.epochs):
                    last = ep == cfg.epochs - 1 or cfg.max_steps > 0  # capped rounds report every step
                    for x, y in epoch_iter():
                        if self.channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with self._autocast():
                            out = model(x)
                            loss = F.cross_entropy(out if offset is None else out + offset, y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if anchor is not None:
                            self._prox(trainable, anchor, cfg.mu)
                        opt.step()
                        if last:
                            loss_sum.add_(loss.detach(), alpha=len(y))
                            correct.add_((out.argmax(1) == y).sum())
                            seen += len(y)
                        steps += 1
                        processed += len(y)
                        if bar is not None:
                            bar.update()
                        if 0 < cfg.max_steps <= steps:
                            break
                    if 0 < cfg.max_steps <= steps:
                        break
                loss_v, correct_v = float(loss_sum), int(correct)  # the one sync
                if cfg.bn_recalibrate:
                    self._recalibrate(model, dataset)
        finally:
            if bar is not None:
                bar.close()
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)
            if self.channels_last:
                model.to(memory_format=torch.contiguous_format)
        wall = time.perf_counter() - t0
        seen = max(seen, 1)
        result = TrainResult(num_samples=n, loss=loss_v / seen, accuracy=correct_v / seen, wall_time_s=wall,
                             device=str(dev), steps=steps, samples_per_s=processed / wall if wall > 0 else 0.0)
        log.info("trained %d samples x %d epochs on %s in %.2fs: loss %.4f acc %.3f", n, cfg.epochs, dev,
                 wall, result.loss, result.accuracy)
        return result

    @staticmethod
    def _param_groups(model: nn.Module, cfg: TrainConfig) -> tuple[list[nn.Parameter], list[dict[str, Any]]]:
        """(trainable params, SGD groups): frozen backbone, or a backbone lr of ``lr * backbone_lr_mult``."""
        if cfg.freeze_backbone or cfg.backbone_lr_mult == 0:
            backbone, _head = backbone_and_head(model)
            for p in backbone:
                p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters")
        if cfg.backbone_lr_mult in (0.0, 1.0) or cfg.freeze_backbone:
            return trainable, [{"params": trainable}]
        backbone, head = backbone_and_head(model)
        groups = [{"params": [p for p in backbone if p.requires_grad], "lr": cfg.lr * cfg.backbone_lr_mult},
                  {"params": [p for p in head if p.requires_grad]}]
        return trainable, [g for g in groups if g["params"]]

    def _recalibrate(self, model: nn.Module, dataset: Dataset) -> None:
        """Recompute the running statistics of the BatchNorm layers that trained (frozen ones keep theirs)."""
        norms = training_batchnorms(model)
        if not norms:
            return
        _n, epoch_iter = self._batches(dataset, RECALIBRATION_BATCH, torch.Generator(), train=False)
        batches = ((x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
                   for x, _y in epoch_iter())
        with self._autocast():
            recalibrate_batchnorm(model, norms, batches, max_samples=RECALIBRATION_SAMPLES)

    @staticmethod
    def _prox(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> None:
        """grad += mu * (w - w_global): the gradient of mu/2 * ||w - w_global||^2."""
        pairs = [(p, a) for p, a in zip(params, anchor) if p.grad is not None]
        if not pairs:
            return
        ps = [p.detach() for p, _ in pairs]
        diff = torch._foreach_sub(ps, [a for _, a in pairs])
        torch._foreach_add_([p.grad for p, _ in pairs], diff, alpha=mu)

    # ----------------------------------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
        """Mean cross-entropy and accuracy of ``model`` on ``dataset`` (eval mode, no grad)."""
        with self._threads():
            return self._evaluate(model, dataset, batch_size)

    def _evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int) -> dict[str, float]:
        dev = self.device
        model.to(dev)
        was_training = model.training
        model.eval()
        n, epoch_iter = self._batches(dataset, batch_size, torch.Generator(), train=False)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        try:
            with torch.inference_mode():
                for x, y in epoch_iter():
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self._autocast():
                        out = model(x)
                    loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
                    correct += (out.argmax(1) == y).sum()
                    seen += len(y)
        finally:
            model.train(was_training)
        seen = max(seen, 1)
        return {"loss": float(loss_sum) / seen, "accuracy": int(correct) / seen, "num_samples": float(n)}
