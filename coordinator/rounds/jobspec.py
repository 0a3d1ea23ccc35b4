"""The job body accepted by ``POST /api/v1/jobs``: strict validation, defaults, and the initial model.

Strict on purpose: an unknown field or a wrong type is almost always a typo in an operator's script
(``client_per_round``), and silently ignoring it would run a different experiment than intended.

Defaults follow one rule: a job is a *digits* job only when it says so with ``"eval": {"dataset": "digits"}``
(1 channel, 8x8, mean/std 0.5, ``input_scale`` 16); every other job gets photo defaults (3 channels, 32x32,
ImageNet mean/std, ``input_scale`` 255). These preprocessing fields travel in every model version's
metadata, so devices, evaluation and ONNX exports prepare images the same way.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edge_sdk.protocol import byte_planes, codecs, stats_block
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.preprocess import DIGITS_INPUT_SCALE, DIGITS_NORMALIZATION, IMAGENET_NORMALIZATION
from edge_sdk.protocol.modelfile import dump_model

from coordinator.privacy.spec import normalize_privacy
from coordinator.rounds.direction import normalize_direction
from coordinator.rounds.limits import normalize_limits
from coordinator.rounds.strategy import make_strategy
from coordinator.secagg.config import normalize_secure_aggregation

DEFAULT_MAX_UPDATE_BYTES = 64 << 20
HARD_MAX_UPDATE_BYTES = 256 << 20
EVAL_DATASETS = ("digits", "imagefolder")
DEFAULT_HOLDOUT_FRACTION = 0.1  # federated evaluation when the job names no server-side set
MAX_HOLDOUT_FRACTION = 0.5
# devices train on logits + this * log(local label shares): measured to cut client drift on label skew
# (BENCHMARKS.md, "Logit adjustment"); a constant on balanced devices. Jobs stored without it keep 0.
LOGIT_ADJUST_DEFAULT = 1.0
ON_STALL = ("pause", "fail")  # what a job does once no progress was possible for stall_timeout_s


class JobSpecError(ValueError):
    """The job body is invalid; the message names the field and what is expected."""


def _type_name(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "an object"}
    return names.get(kind, str(kind))


def _get(body: dict[str, Any], key: str, kind: type, default: Any, path: str, *, lo: float | None = None,
         hi: float | None = None, nullable: bool = False) -> Any:
    value = body.get(key, default)
    where = f"{path}{key}"
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise JobSpecError(f"'{where}' must be {_type_name(kind)}{' or null' if nullable else ''}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise JobSpecError(f"'{where}' must be finite")
    if lo is not None and value < lo:
        raise JobSpecError(f"'{where}' must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise JobSpecError(f"'{where}' must be <= {hi}, got {value}")
    return value


def _object(body: Any, allowed: set[str], path: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise JobSpecError(f"'{path.rstrip('.') or 'body'}' must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise JobSpecError(f"unknown field(s) {', '.join(repr(path + k) for k in unknown)}; "
                           f"allowed: {', '.join(sorted(allowed))}")
    return body


def _default_normalization(channels: int, digits: bool) -> dict[str, list[float]]:
    if digits or channels == 1:
        return {"mean": DIGITS_NORMALIZATION["mean"] * channels, "std": DIGITS_NORMALIZATION["std"] * channels}
    if channels == 3:
        return {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}
    return {"mean": [0.0] * channels, "std": [1.0] * channels}


def folder_classes(root: Path) -> list[str]:
    """Class names of an ImageFolder layout: its sorted sub-folder names (torchvision's rule)."""
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def _eval_config(eval_in: Any) -> dict[str, Any] | None:
    """``null``: no evaluation; omitted: federated only; else a server-side set and/or a device hold-out."""
    if eval_in is None:
        return None
    eval_in = _object(eval_in, {"dataset", "path", "holdout_fraction"}, "eval.")
    dataset = _get(eval_in, "dataset", str, None, "eval.", nullable=True)
    if dataset is not None and dataset not in EVAL_DATASETS:
        raise JobSpecError(f"unknown eval.dataset {dataset!r}; valid: {', '.join(EVAL_DATASETS)} or null")
    path = _get(eval_in, "path", str, None, "eval.", nullable=True)
    if (dataset == "imagefolder") != (path is not None):
        raise JobSpecError("'eval.path' is required with eval.dataset 'imagefolder' and only allowed with it")
    holdout = _get(eval_in, "holdout_fraction", float, 0.0 if dataset else DEFAULT_HOLDOUT_FRACTION, "eval.",
                   lo=0.0, hi=MAX_HOLDOUT_FRACTION)
    cfg: dict[str, Any] = {"dataset": dataset, "holdout_fraction": holdout}
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise JobSpecError(f"'eval.path' {path!r} is not a folder on the coordinator; lay it out as "
                               "PATH/<class name>/<image files>")
        cfg["path"] = str(root.resolve())
    return cfg


def _class_names(body: dict[str, Any], num_classes: int | None, eval_cfg: dict[str, Any] | None) -> list[str]:
    folder = (eval_cfg or {}).get("path")
    found = folder_classes(Path(folder)) if folder else None
    if folder and not found:
        raise JobSpecError(f"evaluation folder {folder} has no class sub-folders; lay it out as "
                           "PATH/<class name>/<image files>")
    default = found or [str(i) for i in range(num_classes if num_classes is not None else 10)]
    names = body.get("class_names", default)
    if not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names):
        raise JobSpecError("'class_names' must be a non-empty list of non-empty strings")
    if len(set(names)) != len(names):
        raise JobSpecError("'class_names' must not repeat a name")
    if found is not None and names != found:
        raise JobSpecError(f"evaluation folder {folder} has classes {found} but the job's class_names are "
                           f"{names}; they must be the same names in the same (sorted) order, because a "
                           "label's index is its folder's position")
    return names


def _normalization(body: dict[str, Any], channels: int, digits: bool) -> dict[str, list[float]]:
    norm = _object(body.get("normalization") or _default_normalization(channels, digits), {"mean", "std"},
                   "normalization.")
    for key in ("mean", "std"):
        vals = norm.get(key)
        if (not isinstance(vals, list) or len(vals) not in (1, channels)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)):
            raise JobSpecError(f"'normalization.{key}' must be a list of 1 or {channels} numbers")
    if any(v <= 0 for v in norm["std"]):
        raise JobSpecError("'normalization.std' values must be positive")
    return {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}


def normalize_job(body: Any, known_archs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Validate a job body and return the full config with every default filled in."""
    top = {"name", "model", "rounds", "clients_per_round", "min_clients", "round_timeout_s", "train", "codec",
           "eval", "seed", "class_names", "normalization", "input_scale", "max_update_bytes", "strategy",
           "limits", "stall_timeout_s", "on_stall", "privacy", "secure_aggregation"}
    body = _object(body, top, "")
    name = _get(body, "name", str, "job", "")
    if not 1 <= len(name) <= 200:
        raise JobSpecError("'name' must be 1-200 characters")
    model = _object(body.get("model"), {"arch", "num_classes", "in_channels", "image_size", "weights"}, "model.")
    arch = _get(model, "arch", str, None, "model.")
    if known_archs is not None and arch not in known_archs:
        raise JobSpecError(f"unknown model.arch {arch!r}; valid: {', '.join(known_archs)}")
    eval_cfg = _eval_config(body["eval"] if "eval" in body else {})
    digits = bool(eval_cfg and eval_cfg["dataset"] == "digits")
    num_in = _get(model, "num_classes", int, None, "model.", lo=2, hi=100_000, nullable=True)
    class_names = _class_names(body, num_in, eval_cfg)
    num_classes = len(class_names) if num_in is None else num_in
    if len(class_names) != num_classes:
        raise JobSpecError(f"'class_names' has {len(class_names)} names for num_classes={num_classes}")
    if digits and num_classes != 10:
        raise JobSpecError(f"eval.dataset 'digits' scores the 10 digit classes but this job has {num_classes}; "
                           "use eval.dataset 'imagefolder' with a folder of your classes, or null")
    channels = _get(model, "in_channels", int, 1 if digits else 3, "model.", lo=1, hi=16)
    image_size = _get(model, "image_size", int, 8 if digits else 32, "model.", lo=2, hi=4096)
    weights = _get(model, "weights", str, None, "model.", nullable=True)  # a server path; the API confines it
    rounds = _get(body, "rounds", int, 10, "", lo=1, hi=100_000)
    k = _get(body, "clients_per_round", int, 5, "", lo=1, hi=100_000)
    min_clients = _get(body, "min_clients", int, min(3, k), "", lo=1, hi=k)
    timeout = _get(body, "round_timeout_s", float, 60.0, "", lo=0.1, hi=7 * 24 * 3600)
    train = _object(body.get("train", {}), {"epochs", "batch_size", "lr", "mu", "freeze_backbone",
                                            "backbone_lr_mult", "bn_recalibrate", "logit_adjust", "max_steps"},
                    "train.")
    train_cfg = {"epochs": _get(train, "epochs", int, 1, "train.", lo=1, hi=1000),
                 "batch_size": _get(train, "batch_size", int, 32, "train.", lo=1, hi=65536),
                 "lr": _get(train, "lr", float, 0.05, "train.", lo=0.0, hi=100.0),
                 "mu": _get(train, "mu", float, 0.0, "train.", lo=0.0, hi=1e6),
                 "freeze_backbone": _get(train, "freeze_backbone", bool, False, "train."),
                 "backbone_lr_mult": _get(train, "backbone_lr_mult", float, 1.0, "train.", lo=0.0, hi=1000.0),
                 "bn_recalibrate": _get(train, "bn_recalibrate", bool, True, "train."),
                 "logit_adjust": _get(train, "logit_adjust", float, LOGIT_ADJUST_DEFAULT, "train.", lo=0.0, hi=10.0),
                 "max_steps": _get(train, "max_steps", int, 0, "train.", lo=0, hi=10_000_000)}
    codec_in = body.get("codec", {"name": "dense", "dtype": "float32"})
    if isinstance(codec_in, dict) and codec_in.get("name") == "randk" and "seed" not in codec_in:
        codec_in = {**codec_in, "seed": 0}  # placeholder: the coordinator announces a fresh seed per round
    try:
        codec = byte_planes.with_new_job_default(
            stats_block.with_new_job_default(codecs.validate_spec(codec_in), body.get("secure_aggregation")))
    except ProtocolError as exc:
        raise JobSpecError(f"'codec': {exc.reason}") from None
    seed = _get(body, "seed", int, 0, "", lo=0, hi=2**63 - 1)
    input_scale = _get(body, "input_scale", float, DIGITS_INPUT_SCALE if digits else 255.0, "",
                       lo=1e-6, hi=65535.0)
    if input_scale <= 0:
        raise JobSpecError(f"'input_scale' must be > 0, got {input_scale}")
    max_bytes = _get(body, "max_update_bytes", int, DEFAULT_MAX_UPDATE_BYTES, "", lo=1024, hi=HARD_MAX_UPDATE_BYTES)
    stall = _get(body, "stall_timeout_s", float, None, "", lo=1.0, hi=7 * 24 * 3600, nullable=True)
    on_stall = _get(body, "on_stall", str, "pause", "")
    if on_stall not in ON_STALL:
        raise JobSpecError(f"'on_stall' must be one of {', '.join(ON_STALL)}, got {on_stall!r}")
    try:
        strategy = make_strategy(body.get("strategy")).spec()
    except ValueError as exc:
        raise JobSpecError(f"'strategy': {exc}") from None
    try:
        limits = normalize_limits(body.get("limits"))
        privacy = normalize_privacy(body.get("privacy"), rounds, k, distributed=body.get("secure_aggregation")
                                    is not None)
        secure = normalize_secure_aggregation(body.get("secure_aggregation"), codec, strategy, min_clients,
                                              privacy)
    except ValueError as exc:
        raise JobSpecError(str(exc)) from None
    if privacy is not None:
        limits = _private_limits(body, strategy, eval_cfg, limits)
    return {"name": name, "model": {"arch": arch, "num_classes": num_classes, "in_channels": channels,
                                    "image_size": image_size, "weights": weights},
            "rounds": rounds, "clients_per_round": k, "min_clients": min_clients, "round_timeout_s": timeout,
            "train": train_cfg, "codec": codec, "eval": eval_cfg, "seed": seed, "class_names": class_names,
            "normalization": _normalization(body, channels, digits), "input_scale": input_scale,
            "max_update_bytes": max_bytes, "strategy": strategy, "limits": limits,
            "stall_timeout_s": stall, "on_stall": on_stall, "privacy": privacy, "secure_aggregation": secure}


def _private_limits(body: dict[str, Any], strategy: dict[str, Any], eval_cfg: dict[str, Any] | None,
                    limits: dict[str, Any]) -> dict[str, Any]:
    """A DP job: refuse what DP-FedAvg cannot honour; weighting is uniform and clipping is privacy.clip."""
    if strategy["name"] in ("trimmed_mean", "median"):
        raise JobSpecError(f"'strategy' {strategy['name']!r} cannot be combined with 'privacy': the Gaussian noise is "
                           "calibrated to a sum of clipped updates; use fedavg, fedavgm, fedprox, fedadam or fedyogi")
    given = body.get("limits") or {}
    if isinstance(given, dict) and ("clip" in given or "direction" in given
                                    or given.get("weighting") not in (None, "uniform")):
        raise JobSpecError("'limits.clip', 'limits.direction' and 'limits.weighting' cannot be set with 'privacy': "
                           "DP-FedAvg weighs every update the same, clips to 'privacy.clip' and folds in every "
                           "clipped update (no direction screen)")
    if eval_cfg and eval_cfg["holdout_fraction"] > 0:
        if "holdout_fraction" in (body.get("eval") or {}):
            raise JobSpecError("'eval.holdout_fraction' must be 0 with 'privacy': device-reported scores are not "
                               "noised, so a DP job does not collect them; score it server-side (eval.dataset)")
        eval_cfg["holdout_fraction"] = 0.0
    return {**limits, "weighting": "uniform", "clip": {"mode": "none"}, "direction": normalize_direction({"mode": "none"})}


def job_input_scale(config: dict[str, Any]) -> float:
    """The job's raw-pixel divisor; jobs stored before it was a field keep what their devices used then."""
    if config.get("input_scale") is not None:
        return float(config["input_scale"])
    return DIGITS_INPUT_SCALE if (config.get("eval") or {}).get("dataset") == "digits" else 255.0


def holdout_fraction(config: dict[str, Any]) -> float:
    """Share of each device's data held out for federated evaluation (0: none)."""
    return float((config.get("eval") or {}).get("holdout_fraction") or 0.0)


def model_meta(job_id: str, config: dict[str, Any], round_: int, **extra: Any) -> dict[str, Any]:
    """FSM1 meta for a version of this job: everything a device or the ONNX exporter needs."""
    m = config["model"]
    meta = {"job_id": job_id, "round": round_, "arch": m["arch"], "num_classes": m["num_classes"],
            "in_channels": m["in_channels"], "image_size": m["image_size"],
            "normalization": config["normalization"], "class_names": config["class_names"],
            "input_scale": job_input_scale(config)}
    if (config.get("eval") or {}).get("dataset"):
        meta["dataset"] = config["eval"]["dataset"]
    meta.update(extra)
    return meta


def weights_record(data: bytes, filename: str) -> dict[str, Any]:
    """What the job config keeps about uploaded weights (the file itself lives on only in version 0)."""
    from edge_sdk.protocol.modelfile import sha256_hex

    return {"sha256": sha256_hex(data), "bytes": len(data), "filename": filename[:200]}


def initial_model(job_id: str, config: dict[str, Any], weights: bytes | None = None) -> bytes:
    """Version 0: ``build_model`` seeded by the job seed (same seed, same bytes), from uploaded ``weights``.

    A weights file that does not fit ``model.arch`` raises :class:`JobSpecError` naming what mismatched."""
    import torch

    from edge_sdk.models import build_model
    from edge_sdk.params import state_to_arrays

    m = config["model"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        try:
            model = build_model(m["arch"], m["num_classes"], in_channels=m["in_channels"],
                                weights=weights if weights is not None else m["weights"])
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            raise JobSpecError(f"cannot build model {m['arch']!r}: {exc}") from None
    return dump_model(state_to_arrays(model), model_meta(job_id, config, 0))
