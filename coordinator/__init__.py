"""FedSight coordinator: REST API, MQTT bridge, round engine and state for federated fine-tuning.

Entry points: :func:`coordinator.server.serve` (blocking, as the CLI runs it), :func:`coordinator.server.start`
(in-process, returns a handle with ``.stop()``), and :func:`coordinator.api.app.create_app` (the Flask app).
Imports are lazy so that ``import coordinator`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "coordinator.api.app",
    "serve": "coordinator.server",
    "start": "coordinator.server",
    "CoordinatorHandle": "coordinator.server",
    "RoundEngine": "coordinator.rounds.engine",
    "EmbeddedBroker": "coordinator.mqtt.broker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
