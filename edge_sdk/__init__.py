"""FedSight edge SDK: fine-tune a vision model on-device and send only a compressed update.

Exports are lazy so that ``from edge_sdk import OnnxClassifier`` on a device without torch works: only the
modules a caller touches are imported.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EdgeClient": "edge_sdk.client",
    "ClientCallbacks": "edge_sdk.client",
    "SampleBuffer": "edge_sdk.data",
    "LocalTrainer": "edge_sdk.trainer",
    "build_model": "edge_sdk.models",
    "OnnxClassifier": "edge_sdk.inference",
    "LiveModel": "edge_sdk.live_model",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
