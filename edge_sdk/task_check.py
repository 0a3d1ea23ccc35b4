"""What a device checks in a task before acting on it: a forged or malformed task is refused, never followed.

Why its own module: a task arrives over MQTT from whoever could publish on the device's task topic, so every field
the device acts on (file names, the model URL it sends its token to) is validated here, in one place.
"""
from __future__ import annotations

from typing import Any

from .coordinator_origin import CoordinatorOrigin, UnsafeUrlError, check_version
from .protocol import topics
from .protocol.errors import ProtocolError


def check_task(task: Any, origin: CoordinatorOrigin) -> tuple[str, str]:
    """The model URL and delta (patch) URL of a task, refused (ProtocolError) unless every field the device
    acts on is well formed.

    ``base_version`` names a cache file and ``job_id`` a residual file, so both are checked before use;
    ``model_path`` (or a legacy ``model_url``) must be a plain path, resolved on the configured coordinator
    only, so a forged task never makes the device send its token elsewhere."""
    if not isinstance(task, dict) or task.get("type", "train") != "train":
        raise ProtocolError("task is not a JSON object of type 'train'")
    job_id = task.get("job_id")
    if not isinstance(job_id, str) or not topics.valid_id(job_id):
        raise ProtocolError(f"task has an invalid job_id {str(job_id)[:80]!r}")
    for key, low in (("round", 0), ("attempt", 1)):
        value = task.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ProtocolError(f"task field {key!r} must be an integer >= {low}")
    if not isinstance(task.get("config", {}), dict):
        raise ProtocolError("task config must be an object")
    try:
        version = check_version(task.get("base_version"))
        path = task.get("model_path") or task.get("model_url") or f"/api/v1/jobs/{job_id}/models/{version}"
        return origin.url(path), origin.url(f"/api/v1/jobs/{job_id}/models/{version}/delta")
    except UnsafeUrlError as exc:
        raise ProtocolError(str(exc)) from None
