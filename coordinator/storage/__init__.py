"""Durable state: the SQLite store, content-addressed model versions and ONNX exports."""
