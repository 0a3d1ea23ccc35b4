"""Wiring of the coordinator's long-lived objects over one data directory.

The REST app, the MQTT bridge and the server all share one Store, ModelStore, exports cache and
RoundEngine; building them in one place keeps the data-dir layout defined exactly once::

    <data_dir>/fedsight.db      SQLite (WAL) state
    <data_dir>/models/ab/<sha256>.fsm   global versions, write-once
    <data_dir>/onnx/<job_id>/<sha256>.onnx(.json)   ONNX exports
    <data_dir>/master.key  operator-token  enroll-secret   secrets, mode 0600 (coordinator/auth/credentials.py)
    <data_dir>/journal/         accepted updates of open rounds, strategy state (coordinator/rounds/journal.py)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.auth.credentials import Credentials
from coordinator.auth.rate_limit import RateLimiter
from coordinator.mqtt.accounts import BrokerAccounts
from coordinator.rounds.engine import EngineConfig, Publisher, RoundEngine
from coordinator.rounds.evaluation import Evaluator
from coordinator.rounds.journal import RoundJournal
from coordinator.storage.exports import OnnxExports
from coordinator.storage.model_store import ModelStore
from coordinator.mqtt.presence import Presence
from coordinator.storage.store import Store


@dataclass
class Services:
    data_dir: Path
    store: Store
    models: ModelStore
    exports: OnnxExports
    engine: RoundEngine
    credentials: Credentials
    broker_url: str | None = None
    broker_accounts: BrokerAccounts | None = None  # per-device broker identities; None: no managed broker
    extra: dict[str, object] = field(default_factory=dict)
    weights_dir: Path | None = None  # the only place job specs may load server-side weights from
    # registrations per remote address: a burst of 30 (a fleet booting), then one every 2 s
    enroll_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(30, 0.5))

    def close(self) -> None:
        self.engine.shutdown()
        self.store.close()


def build_services(data_dir: Path | str, *, public_url: str = "http://127.0.0.1:8080",
                   publisher: Publisher | None = None, engine_config: EngineConfig | None = None,
                   evaluate: bool = True, broker_url: str | None = None,
                   weights_dir: Path | str | None = None) -> Services:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # secrets and the database: nobody else's business
    store = Store(data_dir / "fedsight.db")
    credentials = Credentials(data_dir, store)
    models = ModelStore(data_dir / "models")
    exports = OnnxExports(data_dir / "onnx", models)
    cfg = engine_config or EngineConfig()
    cfg.public_url = public_url
    engine = RoundEngine(store, models, publisher, cfg, Presence(), Evaluator() if evaluate else None, exports,
                         device_key=credentials.device_key,
                         journal=RoundJournal(data_dir / "journal"))
    return Services(data_dir, store, models, exports, engine, credentials, broker_url,
                    weights_dir=Path(weights_dir).resolve() if weights_dir else None)
