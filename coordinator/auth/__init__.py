"""Coordinator credentials: operator token, enrollment secret, per-device MAC keys, rate limits."""
