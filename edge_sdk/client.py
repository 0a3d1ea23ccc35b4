"""EdgeClient: what a camera app embeds to take part in federated jobs.

The client enrolls with the coordinator once, showing the fleet's enrollment secret (credentials, kept
0600 in its cache directory: id, REST token, device key, MQTT account), stays connected to the MQTT broker,
and for every training task it is given: fetches the global model (cached, sha256-verified, only from the
configured coordinator), fine-tunes on local data, and publishes only the encoded model delta, signed
with its device key. Images never leave the device; neither does any secret after enrollment.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from torch import nn
from torch.utils.data import Dataset

from . import params
from .coordinator_origin import CoordinatorOrigin
from .enrollment import Enrollment
from .error_feedback import ResidualStore
from .job_data import fit_to_job, preprocessing_from_job, split_for_job
from .model_cache import ModelCache
from .models import build_model
from .preprocess import Preprocessing
from .protocol import codecs, topics
from .protocol.codec_digest import codec_digest
from .protocol.errors import ProtocolError
from .protocol.modelfile import flatten, layout_sizes, load_model
from .protocol.wire import UpdateHeader, encode_update
from .secagg.session import SecAggAborted, SecureRounds
from .sent_journal import SentJournal
from .task_check import check_task
from .tls import PinnedSession
from .trainer import LocalTrainer
from .update import encode_delta, statistics_mask, wire_metrics
from .transport import BrokerAddress, BrokerRefused, MqttTransport

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATE_BYTES = 64 << 20


RETRY_LATER_CODE = "unavailable"  # ack code: the coordinator could not store the update; send it again later
RETRY_LATER_S = 5.0


@dataclass
class ClientCallbacks:
    """Optional hooks a host app can use to follow what the client does (called from worker threads)."""

    on_round_start: Callable[[dict[str, Any]], None] | None = None
    on_update_sent: Callable[[dict[str, Any]], None] | None = None
    on_update_accepted: Callable[[dict[str, Any]], None] | None = None
    on_update_rejected: Callable[[dict[str, Any]], None] | None = None
    on_model_updated: Callable[[str, str], None] | None = None  # (job_id, version)
    on_job_finished: Callable[[str], None] | None = None


@dataclass
class RoundReport:
    """What the client did in one round (kept in ``EdgeClient.history``)."""

    job_id: str
    round: int
    num_samples: int
    update_bytes: int
    download_bytes: int
    train_time_s: float
    encode_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)


class EdgeClient:
    """A device in a federation.

    ``model`` may be ``None`` (built from the job's architecture), an architecture name (checked against the
    job), or an ``nn.Module`` whose state matches the job's model. ``dataset`` is any torch ``Dataset`` of
    ``(image_tensor, label)``, e.g. a ``SampleBuffer`` the camera app fills frame by frame.
    ``ca_file``: the coordinator's CA (``ca.pem``) that both its HTTPS API and its mqtts broker are verified
    against; None trusts the system's CAs (a publicly trusted certificate).
    """

    def __init__(self, coordinator_url: str, dataset: Dataset, model: str | nn.Module | None = None, *,
                 client_id: str | None = None, token: str | None = None, device_key: str | None = None,
                 enroll_secret: str | None = None, name: str | None = None,
                 broker_url: str | None = None, cache_dir: str | Path = "~/.cache/fedsight",
                 jobs: list[str] | None = None, trainer: LocalTrainer | None = None,
                 callbacks: ClientCallbacks | None = None, request_timeout: float = 30.0,
                 mqtt_username: str | None = None, mqtt_password: str | None = None,
                 ca_file: str | Path | None = None) -> None:
        self.origin = CoordinatorOrigin(coordinator_url)  # every URL this device requests is built from it
        self.base_url = self.origin.base_url
        self.api = self.origin.api
        self.dataset = dataset
        self._model_arg = model
        self._model: nn.Module | None = None
        self.jobs = jobs
        self.trainer = trainer or LocalTrainer()
        self.callbacks = callbacks or ClientCallbacks()
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._timeout = request_timeout
        self.ca_file = ca_file
        self._http = requests.Session() if ca_file is None else PinnedSession(ca_file)
        self._mqtt_login: dict[str, str | None] = {"username": mqtt_username, "password": mqtt_password}
        self._enrollment = Enrollment(self._http, self.base_url, self.api, self.cache_dir, self._timeout)
        creds = self._credentials(client_id, token, device_key, enroll_secret, name)
        self.client_id, self.token = str(creds["client_id"]), str(creds["token"])
        self._device_key = bytes.fromhex(str(creds["device_key"]))
        if self._mqtt_login["username"] is None and creds.get("mqtt_username"):
            self._mqtt_login = {"username": creds["mqtt_username"], "password": creds.get("mqtt_password")}
        self._http.headers["Authorization"] = f"Bearer {self.token}"
        if self._mqtt_login["username"] is None:
            self._mqtt_login = self._broker_login()
        self.models = ModelCache(self.cache_dir / "models", self._http, origin=self.origin)
        self.residuals = ResidualStore(self.cache_dir / "residual", write_behind=True)  # written off the round
        self.journal = SentJournal(self.cache_dir / "outbox")
        self.broker_url = broker_url or self._discover_broker()
        self.history: list[RoundReport] = []
        self._tasks: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._finished_jobs: list[str] = []
        self._worker: threading.Thread | None = None
        self._transport = self._make_transport()
        self._secure = SecureRounds(self.client_id, self._device_key,
                                    lambda topic, frame: self._transport.publish(topic, frame, wait=30))

    def _make_transport(self) -> MqttTransport:
        return MqttTransport(
            self.broker_url, topics.device_mqtt_id(self.client_id), self._on_message,
            subscriptions=[topics.task_topic(self.client_id), topics.ack_topic(self.client_id),
                           topics.relay_topic(self.client_id), topics.JOB_EVENTS_WILDCARD, topics.PRESENCE_QUERY],
            will=(topics.status_topic(self.client_id), self._status("offline")), on_connect=self._on_connected,
            **self._mqtt_login, tls_ca=self.ca_file if BrokerAddress.parse(self.broker_url).tls else None)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Connect and announce this device as online; tasks are handled on a background thread."""
        self._stopped.clear()
        self._configure_data_early()
        try:
            self._transport.start()
        except BrokerRefused as exc:  # e.g. the coordinator lost or rotated our broker account: renew once
            log.warning("%s; asking the coordinator for a new broker secret", exc)
            self._mqtt_login = self._broker_login()
            self._transport = self._make_transport()
            self._transport.start()
        self._worker = threading.Thread(target=self._work, name=f"fedsight-{self.client_id}", daemon=True)
        self._worker.start()
        self._transport.publish(topics.status_topic(self.client_id), self._status("online"), retain=True, wait=10)
        log.info("client %s online via %s", self.client_id, self.broker_url)

    def stop(self) -> None:
        """Announce offline, finish the current task's bookkeeping and disconnect."""
        if self._stopped.is_set() or self._worker is None:
            return
        self._stopped.set()
        self._tasks.put(None)
        try:
            self._transport.publish(topics.status_topic(self.client_id), self._status("offline"), retain=True,
                                    wait=5)
        finally:
            self._transport.stop()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.residuals.close(timeout=30)  # the last round's residual reaches disk before we go

    def run(self, max_jobs: int | None = None, timeout: float | None = None) -> None:
        """Blocking: serve tasks until ``stop()``, Ctrl-C, ``max_jobs`` jobs finished or ``timeout`` seconds."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stopped.is_set():
                if max_jobs is not None and len(self._finished_jobs) >= max_jobs:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                self._stopped.wait(0.2)
        except KeyboardInterrupt:
            log.info("interrupted; going offline")
        finally:
            self.stop()

    # ----------------------------------------------------------------- setup helpers
    def _credentials(self, client_id: str | None, token: str | None, device_key: str | None,
                     enroll_secret: str | None, name: str | None) -> dict[str, Any]:
        return self._enrollment.credentials(client_id, token, device_key, enroll_secret, name)

    def _broker_login(self) -> dict[str, str | None]:
        return self._enrollment.broker_login(self.client_id)

    def _discover_broker(self) -> str:
        try:
            health = self._http.get(f"{self.api}/health", timeout=self._timeout).json()
        except (requests.RequestException, ValueError) as exc:
            raise ConnectionError(f"coordinator at {self.base_url} unreachable ({exc}); pass broker_url or "
                                  "check that `fedsight coordinator` is running") from exc
        url = health.get("broker_url")
        if not url:
            raise ValueError("coordinator did not advertise a broker; pass broker_url='mqtt://HOST:PORT'")
        return str(url)

    def _configure_data_early(self) -> None:
        """Set a SampleBuffer up for the job(s) it will serve before the first task, so frames are shrunk on
        ``add`` instead of kept raw; only when that is unambiguous (one preprocessing among the jobs)."""
        if not hasattr(self.dataset, "configure"):
            return
        try:
            if self.jobs is not None:  # a device token may read each of its jobs' preprocessing
                configs = []
                for job_id in self.jobs:
                    resp = self._http.get(f"{self.api}/jobs/{job_id}/preprocessing", timeout=self._timeout)
                    if resp.ok:
                        configs.append(resp.json())
            else:  # listing the running jobs needs the operator token; a device learns at its first task
                resp = self._http.get(f"{self.api}/jobs", timeout=self._timeout)
                jobs = resp.json().get("jobs", []) if resp.ok else []
                configs = [j["config"] for j in jobs if j.get("status") == "running"]
            specs = {preprocessing_from_job(c) for c in configs}
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            log.debug("could not read the jobs' preprocessing ahead of time: %s", exc)
            return
        if len(specs) == 1:
            try:
                self.dataset.configure(specs.pop())  # type: ignore[attr-defined]
            except ValueError as exc:  # refused again, with the same message, when a task arrives
                log.warning("local data does not fit the job: %s", exc)

    def _has_data(self) -> bool:
        return len(self.dataset) > 0  # type: ignore[arg-type]

    def _status(self, state: str) -> bytes:
        """Presence message; ``ready`` is false until there is local data, so the device is not selected."""
        return json.dumps({"state": state, "jobs": self.jobs, "ready": self._has_data(), "ts": time.time()}).encode()

    def _on_connected(self) -> None:
        """Every (re)connect: announce presence again (a restarted broker may have lost it, or hold our will's
        'offline') and re-send updates that were never acked. Runs on the network thread: no waiting."""
        if self._stopped.is_set():
            return
        self._transport.publish(topics.status_topic(self.client_id), self._status("online"), retain=True)
        self._resend_pending()

    def _resend_pending(self) -> None:
        if self._stopped.is_set():
            return
        for item in self.journal.pending():
            log.info("re-sending unacknowledged update for job %s round %d", item.job_id, item.round)
            self._transport.publish(topics.update_topic(self.client_id), item.message)

    # ----------------------------------------------------------------- messages
    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == topics.PRESENCE_QUERY:
            if not self._stopped.is_set():
                self._transport.publish(topics.status_topic(self.client_id), self._status("online"), retain=True)
            return
        if topic.startswith(f"{topics.PREFIX}/jobs/"):
            self._on_job_event(topics.parse_job_topic(topic), payload)
            return
        _, kind = topics.parse_client_topic(topic)
        if kind == topics.RELAY:  # secure-aggregation messages are binary frames
            self._secure.on_relay(payload)
            return
        message = json.loads(payload)
        if kind == topics.TASK:
            try:
                check_task(message, self.origin)
            except ProtocolError as exc:
                log.warning("ignoring a task that fails validation: %s", exc)
                return
            if self.jobs is None or message.get("job_id") in self.jobs:
                self._tasks.put(message)
        elif kind == topics.ACK:
            accepted = message.get("status") == "accepted"
            if message.get("code") == RETRY_LATER_CODE:  # coordinator could not store it yet: keep and re-send
                threading.Timer(RETRY_LATER_S, self._resend_pending).start()
            elif isinstance(message.get("job"), str) and isinstance(message.get("round"), int):
                self.journal.acked(message["job"], message["round"])
            if not accepted:
                log.warning("update for job %s round %s rejected: %s", message.get("job"), message.get("round"),
                            message.get("reason"))
            hook = self.callbacks.on_update_accepted if accepted else self.callbacks.on_update_rejected
            if hook:
                hook(message)

    def _on_job_event(self, job_id: str, payload: bytes) -> None:
        event = json.loads(payload)
        if event.get("type") == "model_updated" and self.callbacks.on_model_updated:
            self.callbacks.on_model_updated(job_id, str(event.get("version")))
        elif event.get("type") == "job_finished" and job_id not in self._finished_jobs:
            if any(r.job_id == job_id for r in self.history):
                self._finished_jobs.append(job_id)
            if self.callbacks.on_job_finished:
                self.callbacks.on_job_finished(job_id)

    def _work(self) -> None:
        ready = self._has_data()
        while not self._stopped.is_set():
            try:
                task = self._tasks.get(timeout=2.0)
            except queue.Empty:
                if self._has_data() != ready:  # e.g. a SampleBuffer got its first frames: tell the coordinator
                    ready = not ready
                    self._transport.publish(topics.status_topic(self.client_id), self._status("online"), retain=True)
                continue
            if task is None:
                return
            # A backlog means we fell behind: only the newest task per job is still worth doing.
            newer = []
            while not self._tasks.empty():
                item = self._tasks.get_nowait()
                if item is None:
                    return
                newer.append(item)
            for t in newer:
                if t.get("job_id") == task.get("job_id"):
                    older, task = (task, t) if t.get("round", 0) >= task.get("round", 0) else (t, task)
                    log.info("skipping task for job %s round %s: a newer one (round %s) is queued",
                             older.get("job_id"), older.get("round"), task.get("round"))
            try:
                self.handle_task(task)
            except Exception as exc:  # one bad task must not end the device's participation
                log.exception("task for job %s round %s failed: %s", task.get("job_id"), task.get("round"), exc)

    # ----------------------------------------------------------------- the round
    def _model_for(self, meta: dict[str, Any]) -> nn.Module:
        arch = meta.get("arch")
        if isinstance(self._model_arg, nn.Module):
            return self._model_arg
        if isinstance(self._model_arg, str) and self._model_arg != arch:
            raise ValueError(f"this device was set up for {self._model_arg!r} but the job trains {arch!r}")
        if self._model is None or getattr(self._model, "_fedsight_arch", None) != (arch, meta.get("num_classes")):
            self._model = build_model(str(arch), int(meta["num_classes"]), int(meta.get("in_channels", 3)))
            self._model._fedsight_arch = (arch, meta.get("num_classes"))  # type: ignore[attr-defined]
        return self._model

    def _score(self, model: nn.Module, held_out: Dataset | None) -> dict[str, float]:
        """``eval_loss``/``eval_accuracy``/``eval_samples`` of the round's base (global) model on the held-out
        share; the coordinator averages them, weighted by ``eval_samples``, into that version's score."""
        if held_out is None or len(held_out) == 0:  # type: ignore[arg-type]
            return {}
        out = self.trainer.evaluate(model, held_out)
        scored = {"eval_loss": float(out["loss"]), "eval_accuracy": float(out["accuracy"]),
                  "eval_samples": float(len(held_out))}  # type: ignore[arg-type]
        return scored if all(math.isfinite(v) for v in scored.values()) else {}  # a diverged model: no score

    def handle_task(self, task: dict[str, Any]) -> RoundReport | None:
        """Run one training task end to end and publish the update (also callable directly in tests)."""
        try:  # tasks carry paths on the configured coordinator; anything else never gets our token
            url, patch_url = check_task(task, self.origin)
        except ProtocolError as exc:
            job = task.get("job_id") if isinstance(task, dict) else None
            log.error("refusing task for job %s: %s", str(job)[:80], exc)
            return None
        job_id, rnd, version = str(task["job_id"]), int(task["round"]), str(task["base_version"])
        attempt = int(task.get("attempt", 1))
        if self.journal.already_sent(job_id, rnd, attempt):  # e.g. a task re-sent after a restart
            log.info("already sent an update for job %s round %d attempt %d (or a later one); not training again",
                     job_id, rnd, attempt)
            for item in self.journal.pending():
                if item.job_id == job_id and item.round == rnd:
                    self._transport.publish(topics.update_topic(self.client_id), item.message)
            return None
        if self.callbacks.on_round_start:
            self.callbacks.on_round_start(task)
        config = dict(task.get("config") or {})
        if not self._has_data():
            log.warning("no local samples yet; skipping job %s round %d", job_id, rnd)
            return None
        fetched = self.models.get(url, version, patch_url=patch_url)
        arrays, meta = load_model(fetched.data)
        model = self._model_for(meta)
        params.load_arrays(model, arrays)
        global_vec = flatten(arrays)

        # the job's model decides preprocessing; a dataset that disagrees is refused (PreprocessingMismatch)
        fit_to_job(self.dataset, Preprocessing.from_meta(meta))
        dataset, held_out = split_for_job(self.dataset, float(config.get("holdout_fraction") or 0.0))
        scored = self._score(model, held_out)  # federated evaluation of the global model, before training
        result = self.trainer.train(model, dataset, config)
        local_vec = flatten(params.state_to_arrays(model))

        t0 = time.perf_counter()
        spec = codecs.validate_spec(config.get("codec") or {"name": "dense", "dtype": "float32"})
        if config.get("secure_aggregation"):  # only masked shares of the sum leave the device, no metrics
            try:
                sent = self._secure.run(task, spec, local_vec - global_vec, self.residuals, statistics_mask(arrays))
            except (SecAggAborted, ProtocolError) as exc:
                log.warning("job %s round %d: secure aggregation did not complete: %s", job_id, rnd, exc)
                return None
            report = RoundReport(job_id, rnd, int(result.num_samples), sent, fetched.transferred,
                                 float(result.wall_time_s), time.perf_counter() - t0, {})
            self.history.append(report)
            return report
        dp = config.get("dp")  # differential privacy: clip what is sent; no metrics, no sample count (1)
        payload, _ = encode_delta(spec, local_vec - global_vec, layout_sizes(arrays), self.residuals, job_id,
                                  statistics_mask(arrays), clip_bound=float(dp["clip_bound"]) if dp else None)
        metrics = {} if dp else wire_metrics({"loss": float(result.loss), "accuracy": float(result.accuracy),
                                              "train_time_s": float(result.wall_time_s), **scored})  # as sent
        header = UpdateHeader(job_id=job_id, round=rnd, client_id=self.client_id,
                              base_version=str(task["base_version"]), codec_digest=codec_digest(spec),
                              num_samples=1 if dp else int(result.num_samples), numel=int(global_vec.size),
                              metrics=metrics, attempt=int(task.get("attempt", 1)))
        message = encode_update(header, payload, self._device_key)
        encode_time = time.perf_counter() - t0
        limit = int(config.get("max_update_bytes", DEFAULT_MAX_UPDATE_BYTES))
        if len(message) > limit:  # brokers drop oversize packets silently; say so here instead
            raise ProtocolError(f"update is {len(message)} bytes, over the job's limit of {limit}; "
                                "use a sparser codec")
        self.journal.record(job_id, rnd, attempt, message)
        if not self._transport.publish(topics.update_topic(self.client_id), message, wait=60):
            log.warning("update for job %s round %d was not confirmed by the broker", job_id, rnd)
        self.residuals.flush(timeout=30)  # written while the update went out; on disk before the next task
        report = RoundReport(job_id, rnd, int(result.num_samples), len(message), fetched.transferred,
                             float(result.wall_time_s), encode_time, metrics)
        self.history.append(report)
        log.info("job %s round %d attempt %d: %d samples, loss %.4f, acc %.3f, sent %d bytes (train %.2fs, "
                 "encode %.3fs)", job_id, rnd, attempt, result.num_samples, result.loss, result.accuracy, len(message),
                 result.wall_time_s, encode_time)
        if self.callbacks.on_update_sent:
            self.callbacks.on_update_sent({"job_id": job_id, "round": rnd, "bytes": len(message)})
        return report
