"""What a job's round loop needs from the coordinator, as one explicit object.

The :class:`~coordinator.rounds.engine.RoundEngine` builds a :class:`RunnerContext` and hands it to each
:class:`~coordinator.rounds.runner.JobRunner`; the runner never sees the engine, so the two modules do not
import each other and a runner can be driven by a test with a hand-made context.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.mqtt.presence import Presence
from coordinator.rounds.jobspec import HARD_MAX_UPDATE_BYTES
from coordinator.rounds.journal import RoundJournal
from coordinator.storage.exports import OnnxExports
from coordinator.storage.model_store import ModelStore
from coordinator.storage.store import Store


@dataclass
class EngineConfig:
    public_url: str = "http://127.0.0.1:8080"  # the HTTP origin advertised to devices (GET /health)
    max_message_bytes: int = HARD_MAX_UPDATE_BYTES  # hard cap checked before any parsing
    max_attempts: int = 5  # consecutive failed attempts of one round before the job fails (0 = never)
    selection_grace_s: float = 5.0  # with >= min_clients but < K online, wait this long for more
    wait_log_s: float = 30.0
    poll_s: float = 0.25
    export_onnx: bool = True
    # per device (topic client id) token bucket for update messages (0 = off): a device sends one update per job
    # and round, so this only bites a flood; generous enough for sub-second rounds of tiny models
    update_rate_per_s: float = 5.0
    update_burst: int = 50  # messages a device may send back to back before the rate applies
    stall_timeout_s: float = 300.0  # default for a job's "stall_timeout_s": no progress this long is reported
    resume_hold_s: float = 60.0  # at most this long, updates wait for a restart to re-open their rounds
    storage_retry_s: float = 2.0  # a round that cannot be committed (disk full) is retried this often


class Evaluates(Protocol):
    def evaluate(self, model_bytes: bytes, cfg: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class RunnerContext:
    """Shared services plus the engine's outbound calls, passed to every job runner."""

    store: Store
    models: ModelStore
    config: EngineConfig
    presence: Presence
    evaluator: Evaluates | None
    exports: OnnxExports | None
    send_task: Callable[[str, dict[str, Any]], None]
    send_event: Callable[[str, dict[str, Any]], None]
    eligible_clients: Callable[[str], list[str]]
    model_path: Callable[[str, str], str]  # (job_id, version) -> '/api/v1/jobs/<id>/models/<v>'
    journal: RoundJournal | None = None  # durable spool + strategy state; None: rounds restart after a crash
    send_relay: Callable[[str, bytes], None] | None = None  # secure aggregation: a frame to one device's relay
