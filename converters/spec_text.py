"""Short human-typed specs <-> the dicts and values the protocol uses (codec, partition, dataset, broker).

``topk:0.01:int8`` is what a person types on a command line or in a config file; the coordinator and the
wire format want ``{"name": "topk", "density": 0.01, "values": "int8", ...}``. Kept free of argparse so
scripts and notebooks can use the same grammar. Every parser raises ``ValueError`` with a message that
shows the accepted form.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_VALUE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "int8": "int8",
                  "sign": "sign"}
_STATS_LABELS = {"float16": "fp16", "float32": "fp32"}
CODEC_GRAMMAR = ("dense[:float16] | topk:DENSITY[:float32|float16|int8|sign][:rice][:warmup=ROUNDS/START_DENSITY]"
                 "[:stats=fp16|fp32|int8|sparse][:per_tensor][:noef][:stochastic] | "
                 "randk:DENSITY[:float32|float16|int8|sign][:stats=...] | a JSON object")


def parse_codec(text: str) -> dict[str, Any]:
    """Text -> validated, normalised codec spec. randk's seed is left out: the coordinator announces it."""
    from edge_sdk.protocol.codecs import validate_spec
    from edge_sdk.protocol.errors import ProtocolError

    text = text.strip()
    if text.startswith("{"):
        try:
            spec: dict[str, Any] = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"codec JSON is malformed: {exc}") from None
    else:
        name, *parts = text.split(":")
        spec = {"name": name}
        if name in ("topk", "randk"):
            if not parts:
                raise ValueError(f"{name} needs a density, e.g. {name}:0.01")
            try:
                spec["density"] = float(parts.pop(0))
            except ValueError:
                raise ValueError(f"{name} density must be a number like 0.01") from None
        elif name != "dense":
            raise ValueError(f"unknown codec {name!r}; use {CODEC_GRAMMAR}")
        for part in parts:
            key = part.lower()
            if key in _VALUE_ALIASES:
                spec["dtype" if name == "dense" else "values"] = _VALUE_ALIASES[key]
            elif key in ("per_tensor", "global") and name == "topk":
                spec["scope"] = key
            elif key in ("ef", "noef"):
                spec["error_feedback"] = key == "ef"
            elif key == "stochastic" and name != "dense":
                spec["stochastic"] = True
            elif key == "rice" and name == "topk":
                spec["index_coding"] = "rice"
            elif key.startswith("stats=") and name != "dense":
                kind = key[len("stats="):]
                spec["stats"] = "sparse" if kind == "sparse" else _VALUE_ALIASES.get(kind, kind)
            elif key.startswith("warmup=") and name != "dense":
                spec.update(_warmup(key[len("warmup="):], text))
            else:
                raise ValueError(f"unknown codec option {part!r} in {text!r}; use {CODEC_GRAMMAR}")
    probe = {**spec, "seed": 0} if spec.get("name") == "randk" and "seed" not in spec else spec
    try:
        normalised = validate_spec(probe)
    except ProtocolError as exc:
        raise ValueError(exc.reason) from None
    if probe is not spec:
        normalised.pop("seed", None)
    return normalised


def _warmup(value: str, text: str) -> dict[str, Any]:
    rounds, _, start = value.partition("/")
    try:
        return {"warmup_rounds": int(rounds), **({"warmup_density": float(start)} if start else {})}
    except ValueError:
        raise ValueError(f"warm-up must look like warmup=6/0.25 (rounds/start density), got {text!r}") from None


def codec_label(spec: dict[str, Any] | None) -> str:
    """Inverse of parse_codec for display: ``{"name": "topk", "density": 0.01, "values": "int8"}`` -> topk:0.01:int8."""
    if not spec:
        return "-"
    if spec.get("name") == "dense":
        return f"dense:{spec.get('dtype', 'float32')}"
    label = f"{spec.get('name')}:{spec.get('density')}:{spec.get('values', 'float32')}"
    label += ":rice" if spec.get("index_coding") == "rice" else ""
    if spec.get("warmup_rounds"):
        label += f":warmup={spec['warmup_rounds']}/{spec.get('warmup_density', 0.25)}"
    if spec.get("stats"):
        label += f":stats={_STATS_LABELS.get(spec['stats'], spec['stats'])}"
    return label + (":per_tensor" if spec.get("scope") == "per_tensor" else "")


def parse_partition(text: str) -> float | str:
    """``iid`` -> ``"iid"``; ``dirichlet:0.5`` -> ``0.5`` (label-skew alpha, as dirichlet_partition takes it)."""
    if text.lower() == "iid":
        return "iid"
    kind, _, alpha = text.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if kind != "dirichlet" or not value > 0:
        raise ValueError(f"partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {text!r}")
    return value


def parse_dataset(text: str) -> tuple[str, Path | None]:
    """``digits`` | ``imagefolder:PATH`` | ``cifar10:PATH`` -> (kind, path or None)."""
    kind, _, path = text.partition(":")
    if kind == "digits" and not path:
        return kind, None
    if kind in ("imagefolder", "cifar10") and path:
        return kind, Path(path).expanduser()
    raise ValueError(f"dataset must be digits, imagefolder:PATH or cifar10:PATH, got {text!r}")


def parse_broker(text: str) -> str:
    """``embedded``, ``mqtts://HOST:PORT`` (TLS) or ``mqtt://HOST:PORT`` (port required: no silent default)."""
    scheme, _, rest = text.partition("://")
    host, _, port = rest.rpartition(":")
    if text == "embedded" or (scheme in ("mqtt", "mqtts") and host and port.isdigit() and 0 < int(port) < 65536):
        return text
    raise ValueError(f"broker must be 'embedded', mqtts://HOST:PORT or mqtt://HOST:PORT, got {text!r}")


def parse_floats(text: str) -> list[float]:
    """``0.485,0.456,0.406`` -> [0.485, 0.456, 0.406]."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
