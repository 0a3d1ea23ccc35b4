"""Aggregation strategies: Flower's configure/aggregate split, made streaming.

Flower's ``aggregate_fit`` receives every client result at once, so server memory grows with the number of
participants. Here a strategy hands out an :class:`Accumulator` at the start of a round and each accepted
update is folded into it the moment it arrives (``add``) and then dropped; ``finalize`` produces the new
global vector. Memory is O(model) whatever the number of clients, and a sparse update costs O(k), not
O(model), because it is scattered straight into the running sum (indices are unique, so plain fancy-index
``+=`` is exact; no ``np.add.at`` needed).

Server-side optimisers (FedAdam, FedYogi; Reddi et al. 2021, "Adaptive Federated Optimization") treat the
weighted mean delta as a pseudo-gradient; their moment state lives in the strategy object, one per job.

Every strategy applies the job's :class:`~coordinator.rounds.limits.UpdateLimits` as an update is folded in
(capped or uniform weight, L2 clipping). The Byzantine-robust strategies (``trimmed_mean``, ``median``) need
every coordinate's values at once, so they hold a bounded buffer of updates instead (see ``robust.py``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np

from coordinator.rounds.clipping import AdaptiveBound
from edge_sdk.protocol import codecs
from coordinator.rounds.limits import UpdateLimits


class DecodedLike(Protocol):
    """What ``edge_sdk.protocol.codecs.Decoded`` provides: dense values, or sorted unique indices + values."""

    indices: np.ndarray | None
    values: np.ndarray


class _Sum:
    def __init__(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.indices, self.values = indices, values


class Accumulator:
    """Running ``sum_i n_i * delta_i`` and ``sum_i n_i`` for one round; holds no reference to any update."""

    keeps_client_metrics: ClassVar[bool] = True  # False under DP: device-reported metrics are not released

    def __init__(self, global_vec: np.ndarray, finish: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 limits: UpdateLimits | None = None) -> None:
        self.global_vec = global_vec
        self.numel = int(global_vec.size)
        self._sum = np.zeros(self.numel, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0
        self._finish = finish
        self.limits = limits or UpdateLimits()
        self.clipper = self.limits.clipper()
        self.screen = self.limits.direction.screen(self.numel)

    def _check(self, decoded: DecodedLike) -> None:
        """Shape checks, before anything is changed, so a bad update leaves the round untouched."""
        values = np.asarray(decoded.values)
        if decoded.indices is None:
            if values.shape != (self.numel,):
                raise ValueError(f"dense update has {values.size} values, model has {self.numel}")
            return
        idx = np.asarray(decoded.indices)
        if idx.shape != values.shape or idx.ndim != 1:
            raise ValueError("sparse update: indices and values differ in length")
        if idx.size and (idx[0] < 0 or idx[-1] >= self.numel or (idx.size > 1 and not np.all(idx[1:] > idx[:-1]))):
            raise ValueError("sparse update: indices must be sorted, unique and within the model")

    def add(self, decoded: DecodedLike, num_samples: int) -> float:
        """Fold one update in (weighted, clipped and direction-screened per the job's limits); returns its weight."""
        w = self.limits.weight(num_samples)
        self._check(decoded)
        clipped = self.clipper.clip(decoded)
        if self.screen.admits(clipped):
            self._fold(clipped, w)
            self.total_weight += w
        else:  # held back; used only if the round falls back (stale reference, see direction.py)
            self.screen.hold(clipped, w)
        self.count += 1
        return w

    def add_secure_sum(self, indices: np.ndarray, values_sum: np.ndarray, count: int) -> None:
        """Fold in the sum of ``count`` updates over shared ``indices`` (secure aggregation: the coordinator
        never sees one update, so each counts with weight 1 and was clipped on its device)."""
        self._check(_Sum(np.asarray(indices), np.asarray(values_sum)))
        self._sum[np.asarray(indices)] += np.asarray(values_sum, dtype=np.float64)
        self.total_weight += float(count)
        self.count += int(count)

    def _fold(self, decoded: DecodedLike, weight: float) -> None:
        values = np.asarray(decoded.values)
        w = np.float64(weight)  # a float64 scalar promotes the product: no float32 overflow
        if decoded.indices is None:
            self._sum += values * w
        elif values.size:
            self._sum[np.asarray(decoded.indices)] += values * w

    def mean_delta(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no update was accumulated in this round")
        total, weight = self.screen.merge(self._sum, self.total_weight)
        return total / weight

    def finalize(self) -> np.ndarray:
        """The new global vector (float32); adapts the clip bound to this round's update norms and makes the
        round's mean delta the next direction reference."""
        delta = self.mean_delta()
        self.clipper.end_round()
        self.limits.direction.set(delta)
        if self._finish is not None:
            return self._finish(self.global_vec, delta)
        return to_float32(self.global_vec.astype(np.float64) + delta)


def to_float32(vec: np.ndarray) -> np.ndarray:
    """Cast the float64 result; overflow becomes inf, which the engine refuses to publish."""
    with np.errstate(over="ignore"):
        return vec.astype(np.float32)


class Strategy:
    """Base class: FedAvg semantics; subclasses override ``params`` and ``_step``."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {}
    statistics: np.ndarray | None = None  # set by observe_layout

    def __init__(self, limits: UpdateLimits | None = None, **params: Any) -> None:
        self.limits = limits or UpdateLimits()
        self.privacy: Any = None  # a coordinator.privacy DPMechanism: DP-FedAvg aggregation replaces the limits
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"strategy {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"valid: {sorted(self.defaults) or 'none'}")
        self.params: dict[str, float] = dict(self.defaults)
        for key, value in params.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise ValueError(f"strategy parameter {key!r} must be a non-negative number")
            self.params[key] = float(value)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def configure_round(self, job: dict[str, Any], round_: int, clients: list[str], attempt: int = 1) -> dict:
        """Task config sent to every selected client (DESIGN.md task JSON ``config``)."""
        cfg = job["config"] if "config" in job else job
        train = cfg.get("train", {})
        seed = round_seed(int(cfg.get("seed", 0)), round_, attempt)
        codec = dict(cfg["codec"])
        if codec.get("name") == "randk":  # one fresh shared mask per round, announced to everyone
            codec["seed"] = seed
        codec = codecs.round_spec(codec, round_)  # a density warm-up resolves to this round's density
        return {"epochs": train.get("epochs", 1), "batch_size": train.get("batch_size", 32),
                "lr": train.get("lr", 0.05), "mu": self._mu(train),
                "freeze_backbone": train.get("freeze_backbone", False),
                "backbone_lr_mult": train.get("backbone_lr_mult", 1.0),
                "bn_recalibrate": train.get("bn_recalibrate", True),
                **({"logit_adjust": train["logit_adjust"]} if train.get("logit_adjust") else {}),
                **({"max_steps": train["max_steps"]} if train.get("max_steps") else {}),
                "codec": codec, "seed": seed, **({"dp": self.privacy.task_config()} if self.privacy else {})}

    def _mu(self, train: dict[str, Any]) -> float:
        return float(train.get("mu", 0.0))

    def begin(self, global_vec: np.ndarray) -> Accumulator:
        if self.privacy is not None:
            return self.privacy.accumulator(np.asarray(global_vec, dtype=np.float32), self._step)
        return Accumulator(np.asarray(global_vec, dtype=np.float32), self._step, self.limits)

    def observe_layout(self, statistics: np.ndarray) -> None:
        """Which coordinates are BatchNorm running statistics (called before ``begin``). Server optimisers
        must only average those: they are estimates, not parameters, and momentum makes them overshoot."""
        self.statistics = np.asarray(statistics, dtype=bool)

    def _step(self, global_vec: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Apply the round's weighted mean delta; server optimisers override this."""
        return to_float32(global_vec.astype(np.float64) + delta)

    def state(self) -> dict[str, np.ndarray]:
        """Server-side state to persist after each round: the adaptive clip bound (it moves with every update,
        so re-folding a round after a restart needs the bound it started from), the direction reference, plus
        a server optimiser's."""
        bound, ref = self.limits.bound, self.limits.direction.vector
        out = {"clip_bound": np.array([bound.bound])} if isinstance(bound, AdaptiveBound) else {}
        return out if ref is None else {**out, "direction_ref": ref}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (after a coordinator restart)."""
        bound = self.limits.bound
        if isinstance(bound, AdaptiveBound) and "clip_bound" in state and state["clip_bound"].size == 1:
            bound.bound = float(state["clip_bound"][0])
        ref = state.get("direction_ref")
        if self.limits.direction.active and ref is not None and ref.ndim == 1 and np.isfinite(ref).all():
            self.limits.direction.vector = np.array(ref, dtype=np.float32)


def round_seed(job_seed: int, round_: int, attempt: int) -> int:
    """Deterministic per (job seed, round, attempt) seed: fresh randomness each attempt, and two jobs with the same
    seed select, shuffle and mask alike, so a run can be repeated (the fault suite compares runs this way)."""
    digest = hashlib.sha256(f"{job_seed}/{round_}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class FedAvg(Strategy):
    """McMahan et al. 2017: new = global + sum(n_i * delta_i) / sum(n_i)."""

    name = "fedavg"


class FedProx(Strategy):
    """Li et al. 2020: FedAvg on the server; the proximal term ``mu`` is applied by clients."""

    name = "fedprox"
    defaults = {"mu": 0.01}

    def _mu(self, train: dict[str, Any]) -> float:
        return self.params["mu"]


class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): ``m = beta * m + mean_delta``, ``new = global + eta * m``.

    With sparse uplinks each round's aggregate touches few coordinates; the server momentum keeps moving the
    ones that were sent recently, which measurably helps top-k on label-skewed shards (BENCHMARKS.md)."""

    name = "fedavgm"
    defaults = {"beta": 0.7, "eta": 0.7}

    def __init__(self, limits: UpdateLimits | None = None, **params: Any) -> None:
        super().__init__(limits, **params)
        if self.params["beta"] >= 1.0:
            raise ValueError("strategy parameter 'beta' must be below 1")
        self.m: np.ndarray | None = None

    def _step(self, global_vec: np.ndarray, delta: np.ndarray) -> np.ndarray:
        if self.m is None or self.m.shape != delta.shape:
            self.m = np.zeros_like(delta)
        self.m = self.params["beta"] * self.m + delta
        step = self.params["eta"] * self.m
        stats = self.statistics
        if stats is not None and stats.shape == delta.shape:  # running statistics: plain average, no momentum
            self.m[stats] = 0.0
            step[stats] = delta[stats]
        return to_float32(global_vec.astype(np.float64) + step)

    def state(self) -> dict[str, np.ndarray]:
        return super().state() if self.m is None else {**super().state(), "m": self.m}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        if "m" in state:
            self.m = np.array(state["m"])


class FedAdam(Strategy):
    """Server Adam on the pseudo-gradient ``-mean_delta`` (no bias correction, as in Reddi et al.)."""

    name = "fedadam"
    defaults = {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def __init__(self, limits: UpdateLimits | None = None, **params: Any) -> None:
        super().__init__(limits, **params)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        b2 = self.params["beta2"]
        return b2 * v + (1.0 - b2) * d2

    def _step(self, global_vec: np.ndarray, delta: np.ndarray) -> np.ndarray:
        p = self.params
        if self.m is None or self.m.shape != delta.shape:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, p["tau"] ** 2)
        assert self.v is not None
        self.m = p["beta1"] * self.m + (1.0 - p["beta1"]) * delta
        self.v = self._second_moment(self.v, delta * delta)
        return to_float32(global_vec.astype(np.float64) + p["eta"] * self.m / (np.sqrt(self.v) + p["tau"]))

    def state(self) -> dict[str, np.ndarray]:
        return super().state() if self.m is None or self.v is None else {**super().state(), "m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        if "m" in state and "v" in state and state["m"].shape == state["v"].shape:
            self.m, self.v = np.array(state["m"]), np.array(state["v"])


class FedYogi(FedAdam):
    """Yogi's additive second-moment update: v grows or shrinks by at most (1-b2)*d^2 per round."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.params["beta2"]) * d2 * np.sign(v - d2)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi)}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator for third-party strategies."""
    if not cls.name:
        raise ValueError("a strategy needs a name")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(spec: dict[str, Any] | str | None, limits: UpdateLimits | None = None) -> Strategy:
    """``{"name": "fedadam", "eta": 0.01}`` / ``"fedavg"`` / None (FedAvg) -> Strategy; ValueError if bad.

    ``limits``: the job's weighting and clipping (none: plain FedAvg weighting, no clipping)."""
    _load_plugins()
    if spec is None:
        return FedAvg(limits)
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError('strategy must be an object like {"name": "fedavg"}')
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = STRATEGIES.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown strategy {spec['name']!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return cls(limits, **params)


def _load_plugins() -> None:
    """The robust strategies register themselves on import; robust.py imports this module, not vice versa."""
    import coordinator.rounds.robust  # noqa: F401
