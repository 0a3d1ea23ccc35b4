"""Picking a job up again after the coordinator died: re-open its interrupted round from durable state.

Choice (docs/DESIGN.md, "Crash recovery"): an interrupted round is **re-aggregated**, not restarted. The
store still says the round attempt is ``open``; its accepted updates are in the journal's spool (each was
written there before it was acked). The attempt is rebuilt with the same selection, base version and codec,
the spooled updates are validated and folded in again, and the round carries on under a fresh deadline:
clients that had not been accepted get their task again (a device that already sent for this attempt
re-sends the same bytes instead of training twice). Any other open attempt is marked aborted.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from edge_sdk.protocol.modelfile import flatten, layout_sizes, load_model
from edge_sdk.update import statistics_mask

from coordinator.rounds import validation
from coordinator.rounds.context import RunnerContext
from coordinator.rounds.jobspec import holdout_fraction
from coordinator.rounds.open_round import OpenRound
from coordinator.rounds.strategy import Strategy

log = logging.getLogger(__name__)


def load_strategy_state(ctx: RunnerContext, job: dict[str, Any], strategy: Strategy) -> None:
    """FedAdam/FedYogi moments as they were after the job's last committed round."""
    if ctx.journal is None or job["current_round"] == 0:
        return
    state = ctx.journal.load_strategy(job["id"], job["current_round"])
    if state is not None:
        strategy.load_state(state)
        log.info("job %s: restored %s state of round %d", job["id"], strategy.name, job["current_round"])
    elif "m" not in strategy.state() and strategy.name in ("fedadam", "fedyogi"):
        log.warning("job %s: no saved %s state for round %d; moments start from zero", job["id"], strategy.name,
                    job["current_round"])


def restore_open_round(ctx: RunnerContext, job: dict[str, Any], strategy: Strategy
                       ) -> tuple[OpenRound, dict[str, Any]] | None:
    """The interrupted attempt of the job's next round, rebuilt with its spooled updates; None if none."""
    job_id, next_round = job["id"], job["current_round"] + 1
    open_rows = [r for r in ctx.store.get_rounds(job_id) if r["status"] == "open"]
    target = max((r for r in open_rows if r["round"] == next_round and r["base_version"] == job["current_version"]),
                 key=lambda r: r["attempt"], default=None)
    for row in open_rows:
        if row is not target:
            ctx.store.update_round(job_id, row["round"], row["attempt"], status="aborted",
                                   reason="coordinator restarted", closed_at=time.time())
            if ctx.journal is not None:
                ctx.journal.drop_round(job_id, row["round"], row["attempt"])
    secure = bool(job["config"].get("secure_aggregation"))  # the devices' round secrets died with the attempt
    if target is None or ctx.journal is None or secure:
        if target is not None:
            ctx.store.update_round(job_id, target["round"], target["attempt"], status="aborted",
                                   reason="coordinator restarted" + (" (a secure-aggregation round cannot be resumed; "
                                                                     "it is retried)" if secure else ""),
                                   closed_at=time.time())
        return None
    cfg, attempt = job["config"], target["attempt"]
    arrays, _ = load_model(ctx.models.get(target["base_version"]))
    vec = flatten(arrays)
    strategy.observe_layout(stats := statistics_mask(arrays))
    selected = list(target["selected"])
    task_cfg = strategy.configure_round(job, next_round, selected, attempt=attempt)
    task_cfg["holdout_fraction"] = holdout_fraction(cfg)  # as _run_round: devices score the base model
    rnd = OpenRound(job_id=job_id, round=next_round, attempt=attempt, base_version=target["base_version"],
                    codec=target["codec"], numel=int(vec.size), layout_sizes=layout_sizes(arrays),
                    selected=frozenset(selected), statistics=stats, max_update_bytes=cfg["max_update_bytes"],
                    accumulator=strategy.begin(vec), deadline=time.time() + cfg["round_timeout_s"],
                    started_at=float(target["started_at"]))
    rnd.task = {"type": "train", "job_id": job_id, "round": next_round, "attempt": attempt,
                "base_version": target["base_version"], "model_path": ctx.model_path(job_id, target["base_version"]),
                "config": task_cfg, "deadline_s": cfg["round_timeout_s"]}
    restored = 0
    for client_id, raw in ctx.journal.load_updates(job_id, next_round, attempt):
        try:
            header, payload = validation.parse_message(raw, ctx.config.max_message_bytes)
            if header.client_id != client_id:
                raise validation.Rejected(validation.CLIENT_MISMATCH, "spool file name and header differ")
            validation.check_round(header, len(raw), rnd)
            decoded = validation.decode_payload(header, payload, rnd)
        except validation.Rejected as exc:  # cannot happen for bytes we accepted; never fold in doubt
            log.error("job %s round %d: spooled update of %s unusable (%s); dropped", job_id, next_round,
                      client_id, exc.reason)
            continue
        with rnd.cond:
            rnd.add(client_id, decoded, header.num_samples, len(raw), header.metrics)
        restored += 1
    log.info("job %s round %d attempt %d re-opened after a restart with %d spooled update(s) of %d selected",
             job_id, next_round, attempt, restored, len(selected))
    return rnd, arrays
