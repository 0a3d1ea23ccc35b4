"""Converters from FedSight global-model files to on-device formats (ONNX today)."""
from __future__ import annotations

__all__ = ["ExportError", "ParityError", "export_model_file", "export_onnx_bytes"]


def __getattr__(name: str):
    # Lazy: importing ``converters`` must not pull in torch (the coordinator imports it at start-up).
    if name in __all__:
        from converters import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(name)
