"""Export an FSM1 global-model file to one self-contained ONNX file, parity-checked against PyTorch.

Devices get a single ``.onnx`` file (weights embedded, dynamic batch axis) whose ``metadata_props`` carry
everything ``edge_sdk.inference.OnnxClassifier`` needs to preprocess raw images: input size, channels,
normalisation, the raw-pixel divisor and class names, plus provenance (job, round, version).

Exporter choice (measured with torch 2.14.1 on a 2-core CPU, mobilenet_v3_small at 32x32):
the TorchScript exporter (``dynamo=False``) takes ~0.15-0.2 s and honours opset 17; the default dynamo
exporter takes ~5 s, cannot down-convert MobileNetV3 to opset 17 (it stays at 18), and writes weights to
a side file unless told otherwise. The coordinator exports on demand inside a request, so we use the
TorchScript path (its deprecation warning silenced) and fall back to dynamo with embedded weights only if
the TorchScript path fails (e.g. after it is removed from torch).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_BATCHES: tuple[int, ...] = (1, 3)  # neither equals the tracing batch (2): proves the dynamic axis
REL_TOLERANCE = 1e-4  # max |onnx - torch| allowed, relative to max(1, max |logit|)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_PREFIX = "fedsight."
# torch.onnx keeps exporter settings in module globals and warnings.catch_warnings is process-wide: the
# coordinator exports from request threads, so exports are serialised (each takes well under a second).
_EXPORT_LOCK = threading.Lock()


class ExportError(ValueError):
    """The model file or job cannot be turned into a trustworthy ONNX file; the message says why."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree on the exported model beyond the tolerance."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _job_config(job: dict | None) -> dict:
    """Accept either a job record (``{"id":..., "config": {...}}``) or the bare job body."""
    if not job:
        return {}
    cfg = job.get("config")
    return cfg if isinstance(cfg, dict) else job


def _pick(key: str, *sources: dict) -> Any:
    for src in sources:
        if isinstance(src, dict) and src.get(key) is not None:
            return src[key]
    return None


def resolve_metadata(meta: dict, job: dict | None, version: str) -> dict[str, Any]:
    """Merge FSM1 meta (authoritative) with the job config into the fields the exporter needs."""
    cfg = _job_config(job)
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    out: dict[str, Any] = {}
    for key in ("arch", "num_classes", "in_channels", "image_size"):
        value = _pick(key, meta, model_cfg, cfg)
        if value is None:
            raise ExportError(f"model file and job both lack {key!r}; cannot rebuild the network")
        out[key] = value
    try:
        out["num_classes"], out["in_channels"], out["image_size"] = (
            int(out["num_classes"]), int(out["in_channels"]), int(out["image_size"]))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"model meta has a non-integer shape field: {exc}") from None
    channels = out["in_channels"]
    norm = _pick("normalization", meta, cfg) or {}
    mean = [float(v) for v in norm.get("mean", [0.0] * channels)]
    std = [float(v) for v in norm.get("std", [1.0] * channels)]
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ExportError(f"normalization needs {channels} mean and {channels} positive std values, "
                          f"got mean={mean} std={std}")
    names = _pick("class_names", meta, cfg) or [str(i) for i in range(out["num_classes"])]
    if len(names) != out["num_classes"]:
        raise ExportError(f"{len(names)} class_names for a {out['num_classes']}-class model")
    # the job's own field, carried in every model version; never inferred from the evaluation set
    scale = _pick("input_scale", meta, cfg)
    if scale is None:
        log.warning("model file and job lack input_scale (made by an older coordinator); assuming 255")
        scale = 255
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ExportError(f"input_scale must be a number, got {scale!r}") from None
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ExportError(f"input_scale must be a positive finite number, got {scale}")
    job_id = _pick("job_id", meta) or (job or {}).get("id") or (job or {}).get("job_id") or ""
    out.update(mean=mean, std=std, class_names=[str(n) for n in names], input_scale=float(scale),
               job_id=str(job_id), round=int(meta.get("round") or 0), version=version)
    return out


def _metadata_props(info: dict[str, Any], exported_at: str, max_abs_diff: float | None) -> dict[str, str]:
    scale = info["input_scale"]
    props = {
        "input_size": str(info["image_size"]),
        "in_channels": str(info["in_channels"]),
        "num_classes": str(info["num_classes"]),
        "arch": str(info["arch"]),
        "mean": json.dumps(info["mean"]),
        "std": json.dumps(info["std"]),
        "class_names": json.dumps(info["class_names"]),
        "input_scale": str(int(scale)) if float(scale).is_integer() else repr(scale),
        "version": info["version"],
        "job_id": info["job_id"],
        "round": str(info["round"]),
        "exported_at": exported_at,
    }
    if max_abs_diff is not None:
        props["max_abs_diff"] = f"{max_abs_diff:.3e}"
    return {META_PREFIX + k: v for k, v in props.items()}


def _rebuild(model_bytes: bytes, job: dict | None) -> tuple[Any, dict[str, Any]]:
    from edge_sdk.models import build_model
    from edge_sdk.params import load_arrays
    from edge_sdk.protocol.errors import ProtocolError
    from edge_sdk.protocol.modelfile import load_model

    if not model_bytes:
        raise ExportError("model file is empty")
    try:
        arrays, meta = load_model(model_bytes)
    except ProtocolError as exc:
        raise ExportError(f"not a valid FSM1 model file: {exc.reason}") from None
    info = resolve_metadata(meta, job, _sha256(model_bytes))
    try:
        model = build_model(info["arch"], info["num_classes"], in_channels=info["in_channels"], weights=None)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"cannot build architecture {info['arch']!r}: {exc}") from None
    try:
        load_arrays(model, arrays)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ExportError(f"model file weights do not fit {info['arch']!r}: {exc}") from None
    return model.eval(), info


def _torch_export(model: Any, dummy: Any, opset: int) -> tuple[bytes, str, int]:
    """Returns (onnx bytes with embedded weights, exporter name, opset actually used)."""
    with _EXPORT_LOCK:
        return _torch_export_locked(model, dummy, opset)


def _torch_export_locked(model: Any, dummy: Any, opset: int) -> tuple[bytes, str, int]:
    import torch

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation notice and tracer chatter
            torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
        return buf.getvalue(), "torchscript", opset
    except Exception as exc:  # noqa: BLE001 - any failure: try the other exporter, report both
        legacy_error = exc
    log.warning("TorchScript ONNX export failed (%s); falling back to the dynamo exporter", legacy_error)
    dyn_opset = max(opset, 18)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # and its "[torch.onnx] ..." progress prints go nowhere
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(model, (dummy,), None, dynamo=True, opset_version=dyn_opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), verbose=False)
        return program.model_proto.SerializeToString(), "dynamo", dyn_opset
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX export failed: torchscript: {legacy_error}; dynamo: {exc}") from None


def _ort_session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(model: Any, onnx_bytes: bytes, input_shape: Sequence[int],
                 batches: Sequence[int] = PARITY_BATCHES, seed: int = 0,
                 rel_tolerance: float = REL_TOLERANCE) -> dict[str, Any]:
    """Run random inputs through PyTorch and onnxruntime; raise ParityError above the tolerance."""
    import torch

    session = _ort_session(onnx_bytes)
    rng = np.random.default_rng(seed)
    max_diff, scale = 0.0, 0.0
    for batch in batches:
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if got.shape != expected.shape:
            raise ParityError(f"onnxruntime output shape {got.shape} != PyTorch {expected.shape} "
                              f"for batch {batch}")
        if not np.all(np.isfinite(got)):
            raise ParityError(f"onnxruntime produced non-finite logits for batch {batch}")
        max_diff = max(max_diff, float(np.max(np.abs(got - expected))))
        scale = max(scale, float(np.max(np.abs(expected))))
    tolerance = rel_tolerance * max(1.0, scale)
    if max_diff > tolerance:
        raise ParityError(f"ONNX and PyTorch logits differ by {max_diff:.3e} (> {tolerance:.3e}, "
                          f"logit scale {scale:.3g}); refusing to publish this export")
    return {"batches": list(batches), "max_abs_diff": max_diff, "logit_scale": scale,
            "tolerance": tolerance, "passed": True}


def export_onnx_bytes(model_bytes: bytes, job: dict | None = None, opset: int = DEFAULT_OPSET,
                      parity_batches: Sequence[int] = PARITY_BATCHES) -> tuple[bytes, dict[str, Any]]:
    """FSM1 bytes -> (checked, parity-verified ONNX bytes with metadata, report). Nothing is written."""
    import onnx
    import torch

    started = time.perf_counter()
    model, info = _rebuild(model_bytes, job)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    raw, exporter, used_opset = _torch_export(model, torch.zeros((2, *shape)), opset)
    proto = onnx.load_from_string(raw)
    exported_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX graph failed onnx.checker: {exc}") from None
    parity = check_parity(model, raw, shape, parity_batches)
    props = _metadata_props(info, exported_at, parity["max_abs_diff"])
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fedsight"
    proto.doc_string = f"FedSight {info['arch']} job {info['job_id']} round {info['round']} version {info['version']}"
    proto.graph.name = f"fedsight_{info['arch']}"
    data = proto.SerializeToString()
    onnx.checker.check_model(data)
    report = {
        "version": info["version"], "job_id": info["job_id"], "round": info["round"],
        "arch": info["arch"], "num_classes": info["num_classes"], "in_channels": info["in_channels"],
        "image_size": info["image_size"], "opset": used_opset, "exporter": exporter,
        "onnx_sha256": _sha256(data), "size_bytes": len(data), "exported_at": exported_at,
        "export_seconds": round(time.perf_counter() - started, 3), "max_abs_diff": parity["max_abs_diff"],
        "parity": parity, "metadata": props,
    }
    log.info("exported %s round %s to ONNX (%d bytes, max_abs_diff %.2e, %.2fs)", info["arch"],
             info["round"], len(data), parity["max_abs_diff"], report["export_seconds"])
    return data, report


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; exports are served and copied to devices
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(out_dir: Path, version: str) -> tuple[Path, Path]:
    """Content-addressed names: the same model version always maps to the same file."""
    return out_dir / f"{version}.onnx", out_dir / f"{version}.onnx.json"


def read_report(onnx_path: Path, report_path: Path) -> dict[str, Any] | None:
    """The JSON report of an export whose two files both exist, or None (missing or unreadable)."""
    if not (onnx_path.is_file() and report_path.is_file()):
        return None
    try:
        return json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None


def _cached(onnx_path: Path, report_path: Path, opset: int) -> dict[str, Any] | None:
    report = read_report(onnx_path, report_path)
    if report is None or report.get("requested_opset") != opset or report.get("onnx_sha256") != _sha256(onnx_path.read_bytes()):
        return None
    return report


def export_model_file(model_bytes: bytes, job: dict | None, out_dir: Path,
                      opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export FSM1 bytes to ``out_dir/<version>.onnx`` (+ ``.onnx.json`` report); returns the report.

    Idempotent: an existing, intact export of the same version and opset is returned as is.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, report_path = output_paths(out_dir, _sha256(model_bytes))
    cached = _cached(onnx_path, report_path, opset)
    if cached is not None:
        return cached
    data, report = export_onnx_bytes(model_bytes, job, opset)
    report.update(path=str(onnx_path), report_path=str(report_path), requested_opset=opset)
    _atomic_write(onnx_path, data)
    _atomic_write(report_path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report
