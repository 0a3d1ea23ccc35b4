"""A secure-aggregation round over MQTT: the runner's hook (``collect_secure``) and the engine's intake
(``file_message``) around one :class:`~coordinator.secagg.server.SecAggServer` per open round.

Devices train first, then run the protocol: keys (until the round deadline, so slow trainers still make
it), roster, shares, masked input, unmasking; each phase after the first waits at most
``phase_timeout_s`` and closes early once every expected device has answered. Downlink messages go to each
device's ``relay`` topic; uplink arrives signed on its ``secagg`` topic. A round the protocol cannot finish
is recorded as failed with the protocol's reason, and retried like any failed round.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.secagg.update import round_indices

from coordinator.rounds.open_round import OpenRound
from coordinator.secagg.config import min_survivors
from coordinator.secagg.server import SecAggAbort, SecAggParams, SecAggServer

if TYPE_CHECKING:
    from coordinator.rounds.engine import RoundEngine
    from coordinator.rounds.runner import JobRunner

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20


def run_secure(runner: JobRunner, job: dict[str, Any], rnd: OpenRound) -> None:
    """Announce ``rnd`` and run the protocol; on success the unmasked sum is folded into the round's accumulator
    and the survivors count as accepted, otherwise ``rnd.failure`` says why. The runner then closes the round."""
    eng, cfg = runner.ctx, job["config"]
    sa = cfg["secure_aggregation"]
    idx = round_indices(rnd.codec, rnd.numel)
    params = round_params(cfg, int(idx.size))
    server = SecAggServer(rnd.job_id, rnd.round, rnd.attempt, sorted(rnd.selected), params,
                          graph_seed=int((rnd.task or {}).get("config", {}).get("seed", 0)))
    rnd.secagg = server
    runner.current = rnd
    for cid in sorted(rnd.selected):
        eng.send_task(cid, rnd.task or {})
    eng.send_event(rnd.job_id, {"type": "round_started", "job_id": rnd.job_id, "round": rnd.round,
                                "attempt": rnd.attempt, "selected": sorted(rnd.selected),
                                "base_version": rnd.base_version, "secure_aggregation": True})
    log.info("job %s round %d attempt %d: secure aggregation over %d device(s), k=%d", rnd.job_id, rnd.round,
             rnd.attempt, len(rnd.selected), idx.size)
    stop, phase_s = runner.stop_event, float(sa["phase_timeout_s"])
    try:
        _wait(rnd, server, stop, rnd.deadline)
        _relay(eng, rnd, server.close_keys)
        for close in (server.close_shares, server.close_masked):
            _wait(rnd, server, stop, time.time() + phase_s)
            _relay(eng, rnd, close)
        _wait(rnd, server, stop, time.time() + phase_s)
        with rnd.cond:
            if stop.is_set():
                raise SecAggAbort("job stopped")
            result = server.finish()
    except SecAggAbort as exc:
        rnd.failure = f"secure aggregation: {exc}"
        for cid in sorted(server.keys):
            eng.send_relay(cid, sw.encode(server.abort_message(cid)))
        result = None
    rnd.close()
    runner.current = None
    if result is not None:
        with rnd.cond:
            rnd.accumulator.add_secure_sum(idx, result.sum, len(result.survivors))
            for cid in result.survivors:
                rnd.accepted_clients[cid] = sum(n for key, n in server.bytes_up.items() if key.startswith(f"{cid}:"))
            rnd.uplink_bytes = sum(server.bytes_up.values())
            # what a DP accountant needs of the round (with the job's clip bound): the noise the sum carries
            rnd.protocol_metrics = {"secagg_survivors": float(len(result.survivors)),
                                    "secagg_dropped": float(len(result.dropped)),
                                    "secagg_left_out": float(len(result.left_out)),
                                    "secagg_noise_multiplier": float(result.effective_noise_multiplier),
                                    "secagg_coordinator_s": float(sum(result.timings.values()))}
        log.info("job %s round %d: unmasked the sum of %d device(s) (%d dropped after sharing, %d left out), "
                 "coordinator crypto %.2f s", rnd.job_id, rnd.round, len(result.survivors), len(result.dropped),
                 len(result.left_out), sum(result.timings.values()))


def round_params(cfg: dict[str, Any], k: int) -> SecAggParams:
    """A round's protocol parameters from the job config (with ``privacy``, clip and noise come from it; see
    ``coordinator/secagg/config.py``)."""
    sa = cfg["secure_aggregation"]
    return SecAggParams(k=k, clip=sa["clip"], degree=sa["neighbours"], noise_multiplier=sa["noise_multiplier"],
                        min_survivors=min_survivors(cfg))


def _wait(rnd: OpenRound, server: SecAggServer, stop: Any, deadline: float) -> None:
    with rnd.cond:
        while server.expecting() and not stop.is_set():
            left = deadline - time.time()
            if left <= 0:
                break
            rnd.cond.wait(min(left, 0.25))
    if stop.is_set():
        raise SecAggAbort("job stopped")


def _relay(eng: Any, rnd: OpenRound, close: Any) -> None:
    with rnd.cond:
        out = close()
    for cid, msg in out.items():
        eng.send_relay(cid, sw.encode(msg))


def file_message(engine: RoundEngine, topic_client_id: str, raw: bytes) -> tuple[str | None, str | None, int | None]:
    """Authenticate one ``secagg`` message and hand it to its round: ``(None, job, round)`` if filed, else
    ``(reason, job, round)``, the rejection logged and recorded as a rejected update. Never raises."""
    try:
        reason, job_id, round_ = _file(engine, topic_client_id, raw)
    except Exception as exc:  # noqa: BLE001 - the network thread must survive anything a device sends
        log.exception("secure-aggregation message from %s", topic_client_id)
        reason, job_id, round_ = f"internal error ({type(exc).__name__})", None, None
    if reason is not None:
        log.warning("secure-aggregation message from %s rejected: %s", topic_client_id, reason)
        try:
            engine.store.add_update(client_id=topic_client_id, status="rejected", reason=reason, bytes_=len(raw),
                                    job_id=job_id, round_=round_)
        except Exception:  # noqa: BLE001 - bookkeeping must not fail the intake
            log.exception("could not record a rejected secure-aggregation message")
    return reason, job_id, round_


def _file(engine: RoundEngine, cid: str, raw: bytes) -> tuple[str | None, str | None, int | None]:
    if len(raw) > MAX_FRAME_BYTES:
        return f"message too large ({len(raw)} bytes)", None, None
    try:
        msg = sw.decode(raw, MAX_FRAME_BYTES)
    except ProtocolError as exc:
        return exc.reason, None, None
    if msg.kind not in sw.UPLINK:
        return f"a device may not send {msg.name} messages", msg.job_id, msg.round
    if msg.client_id != cid:
        return f"message names device {msg.client_id} but came from {cid}", msg.job_id, msg.round
    key = engine.device_key(cid) if engine.store.get_client(cid) is not None else None
    if key is None or not sw.verify(raw, key):
        return "bad signature (not signed with this device's key)", None, None
    rnd = engine.current_round(msg.job_id)
    server = getattr(rnd, "secagg", None)
    if rnd is None or server is None:
        return f"no secure-aggregation round is open for job {msg.job_id}", msg.job_id, msg.round
    with rnd.cond:
        reason = server.receive(cid, msg, len(raw))
        if reason is not None:
            rnd.rejected += 1
            rnd.rejected_bytes += len(raw)
        rnd.cond.notify_all()
    return reason, msg.job_id, msg.round
