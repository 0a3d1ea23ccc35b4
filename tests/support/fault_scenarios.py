"""Fault scenarios over a real :class:`~tests.support.federation.Federation`, one job each.

Each function injects its fault into a running job, waits for the job to finish and returns one result row:
``scenario``, ``status``, ``rounds_lost`` (round attempts that did not commit), ``recover_s`` (where it
applies), ``final_accuracy`` and scenario-specific evidence the tests assert on.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
from typing import Any

import requests

from edge_sdk.protocol import topics
from tests.support.fault_procs import fill_disk
from tests.support.federation import STARTUP_S, Federation, job_body, wait_until
from tests.support.processes import ROOT, child_env, cli

ROUNDS = 6
FAULT_ROUND = 2


def _run(fed: Federation, name: str, inject: Any, rounds: int = ROUNDS, **job: Any) -> dict[str, Any]:
    job_id = fed.create_job(job_body(name, rounds, fed.n, **job))
    t0 = time.monotonic()
    try:
        evidence = inject(job_id) if inject else {}
        final = fed.wait_finished(job_id, timeout=240)
    except BaseException:  # a failed scenario must not leave its job running into the next one
        fed.hold_file.unlink(missing_ok=True)
        try:
            fed.http.post(f"{fed.coord.api}/jobs/{job_id}/stop", timeout=60)
        except requests.RequestException:
            pass
        raise
    return {"scenario": name, "job_id": job_id, "status": final["status"], "error": final.get("error"),
            "wall_s": round(time.monotonic() - t0, 1), **fed.summary(job_id), **(evidence or {})}


def _first_progress_after(fed: Federation, job_id: str, t_wall: float) -> float | None:
    """Seconds from ``t_wall`` to the first accepted update or newly started round after it."""
    times = [u["received_at"] for u in fed.updates(job_id) if u["status"] == "accepted" and u["received_at"] > t_wall]
    times += [r["started_at"] for r in fed.rounds(job_id) if r["started_at"] > t_wall]
    return round(min(times) - t_wall, 2) if times else None


def baseline(fed: Federation) -> dict[str, Any]:
    return _run(fed, "no faults", None)


def kill_devices(fed: Federation) -> dict[str, Any]:
    """SIGKILL 30 % of the devices (2 of 6) mid-round; they stay dead for the rest of the job."""
    victims = list(range(fed.n))[-max(1, round(0.3 * fed.n)):]

    def inject(job_id: str) -> dict[str, Any]:
        fed.open_round(job_id, FAULT_ROUND, min_accepted=1, later_ok=True)
        for i in victims:
            fed.kill_device(i)
        return {"killed": [fed.ids[i] for i in victims]}

    row = _run(fed, "kill 30% of devices mid-round", inject)
    for i in victims:  # back for the next scenario
        fed.start_device(i)
    wait_until(lambda: fed.online() >= fed.n, STARTUP_S, "killed devices back online")
    return row


def sigstop_device(fed: Federation) -> dict[str, Any]:
    """SIGSTOP a selected device as its round opens (mid-training), SIGCONT after the round's deadline."""
    timeout_s = 8.0

    def inject(job_id: str) -> dict[str, Any]:
        rnd = fed.open_round(job_id, FAULT_ROUND)
        victim = fed.ids[fed.n - 1]
        pid = fed.devices[fed.n - 1].pid
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            wait_until(lambda: any(r["round"] == FAULT_ROUND and r["status"] != "open" for r in fed.rounds(job_id)),
                       timeout_s + 30, "the round to close without the stopped device")
            closed_after = time.monotonic() - t_stop
        finally:
            time.sleep(1.0)
            os.kill(pid, signal.SIGCONT)
        return {"victim": victim, "round_closed_after_s": round(closed_after, 1), "deadline_s": timeout_s,
                "victim_selected": victim in rnd["selected"]}

    row = _run(fed, "SIGSTOP a device mid-training", inject, timeout_s=timeout_s)
    ups = fed.updates(row["job_id"])
    mine = [u for u in ups if u["client_id"] == row["victim"]]
    row["victim_accepted_in_fault_round"] = any(u["status"] == "accepted" and u["round"] == FAULT_ROUND for u in mine)
    row["victim_stale_reasons"] = [u["reason"] for u in mine if u["status"] == "rejected"]
    row["victim_accepted_later"] = any(u["status"] == "accepted" and u["round"] > FAULT_ROUND for u in mine)
    # Stopped before it took the task off its queue, the device wakes up with the next round's task queued as well
    # and does only the newest one: it never trains for the closed round, so there is no late update to refuse.
    row["victim_skipped_closed_round"] = (f"skipping task for job {row['job_id']} round {FAULT_ROUND}:"
                                          in fed.device_log(fed.n - 1))
    return row


def restart_broker(fed: Federation, persistence: bool, mid_upload: bool) -> dict[str, Any]:
    """Stop Mosquitto for 3 s mid-round (or right as uploads arrive) and start it again on the same port."""
    def inject(job_id: str) -> dict[str, Any]:
        fed.open_round(job_id, FAULT_ROUND, min_accepted=1 if mid_upload else 0, later_ok=True)
        if not mid_upload:
            time.sleep(0.3)
        fed.broker.write_config(persistence)
        fed.broker.restart(down_s=3.0)
        t_back = time.time()
        recover = wait_until(lambda: _first_progress_after(fed, job_id, t_back), 60, "progress after the restart")
        return {"recover_s": recover, "persistence": persistence}

    what = "mid-upload" if mid_upload else "mid-round"
    return _run(fed, f"restart broker {what} (persistence {'on' if persistence else 'off'})", inject)


def kill_coordinator(fed: Federation, during_aggregation: bool) -> dict[str, Any]:
    """SIGKILL the coordinator with accepted updates in an open round (or while it aggregates), restart it on
    the same data directory: the round must be re-aggregated from the journal."""
    def inject(job_id: str) -> dict[str, Any]:
        held_version = None
        if during_aggregation:
            fed.open_round(job_id, FAULT_ROUND, later_ok=True)
            fed.hold_file.touch()  # removed below, or by Federation.close if this fails
            pattern = re.compile(rf"holding commit of job {job_id} round (\d+) attempt (\d+) "
                                 r"\(version ([0-9a-f]{64}), (\d+) accepted\)")
            m = wait_until(lambda: pattern.search(fed.coord.log_text()), 120, "the held commit")
            fault_round, attempt, held_version = int(m.group(1)), int(m.group(2)), m.group(3)
        else:
            rnd = fed.open_round(job_id, FAULT_ROUND, min_accepted=2, later_ok=True)
            fault_round, attempt = rnd["round"], rnd["attempt"]
        before = {u["client_id"] for u in fed.updates(job_id)
                  if u["status"] == "accepted" and u["round"] == fault_round and u["attempt"] == attempt}
        fed.coord.kill()
        fed.hold_file.unlink(missing_ok=True)
        time.sleep(1.0)
        t_restart = time.time()
        fed.coord.start()
        recover = wait_until(lambda: _first_progress_after(fed, job_id, t_restart), 90, "progress after restart")
        return {"accepted_before_kill": sorted(before), "fault_round": fault_round, "killed_attempt": attempt,
                "held_version": held_version, "recover_s": recover}

    name = "SIGKILL coordinator " + ("during aggregation" if during_aggregation else "mid-round")
    row = _run(fed, name, inject)
    closed = [r for r in fed.rounds(row["job_id"]) if r["round"] == row["fault_round"] and r["status"] == "closed"]
    row["fault_round_attempt"] = closed[0]["attempt"] if closed else None
    row["fault_round_participants"] = closed[0]["participants"] if closed else []
    row["fault_round_version"] = closed[0]["new_version"] if closed else None
    return row


def _capture_task(fed: Federation, client_id: str) -> tuple[Any, list[dict[str, Any]]]:
    """Subscribe as the test observer to a device's task topic before the job starts (a round can be over
    before a later subscription lands); :func:`_await_task` then returns the task of a round."""
    got: list[dict[str, Any]] = []
    obs = fed.broker.observer_client(f"observer-{client_id}")
    obs.on_message = lambda _c, _u, msg: got.append(json.loads(msg.payload))
    obs.subscribe(topics.task_topic(client_id), qos=1)
    return obs, got


def _await_task(obs: Any, got: list[dict[str, Any]], client_id: str, job_id: str, round_: int) -> dict[str, Any]:
    try:
        return wait_until(lambda: next((t for t in got if t.get("job_id") == job_id and t.get("round") == round_),
                                       None), 120, f"task of round {round_} for {client_id}")
    finally:
        obs.loop_stop()
        obs.disconnect()


def restart_device(fed: Federation) -> dict[str, Any]:
    """SIGKILL a device right after its update of the round was accepted, restart it on the same cache dir and
    hand it the same task again: it must resume its residual and not send a second update for that round."""
    idx = 0
    victim = fed.ids[idx]

    obs, got = _capture_task(fed, victim)

    def inject(job_id: str) -> dict[str, Any]:
        task = _await_task(obs, got, victim, job_id, FAULT_ROUND)
        wait_until(lambda: any(u["client_id"] == victim and u["round"] == FAULT_ROUND and u["status"] == "accepted"
                               for u in fed.updates(job_id)), 60, "the victim's update")
        fed.kill_device(idx)
        log_mark = len(fed.device_log(idx))
        fed.start_device(idx)
        wait_until(lambda: "online via" in fed.device_log(idx)[log_mark:], STARTUP_S, "the restarted device online")
        pub = fed.broker.observer_client("observer-republish")
        pub.publish(topics.task_topic(victim), json.dumps(task), qos=1).wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()
        handled = (f"already sent an update for job {job_id} round {FAULT_ROUND}",
                   f"skipping task for job {job_id} round {FAULT_ROUND}")
        wait_until(lambda: any(h in fed.device_log(idx)[log_mark:] for h in handled), 120,
                   "the re-delivered task handled without training")
        return {"victim": victim, "log_mark": log_mark}

    try:
        row = _run(fed, "restart a device mid-round", inject)
    finally:
        obs.loop_stop()
        obs.disconnect()
    after = fed.device_log(idx)[row.pop("log_mark"):]
    job_id = row["job_id"]
    row["skipped_duplicate_task"] = (f"already sent an update for job {job_id} round {FAULT_ROUND}" in after
                                     or f"skipping task for job {job_id} round {FAULT_ROUND}" in after)
    # what the device itself says it sent (old and new process): at most one update per attempt of the round
    sends = re.findall(rf"job {job_id} round {FAULT_ROUND} attempt (\d+): ", fed.device_log(idx))
    row["victim_max_sends_per_attempt"] = max((sends.count(a) for a in set(sends)), default=0)
    row["residual_resumed"] = "resumed error-feedback residual" in after
    row["victim_accepts_in_fault_round"] = sum(1 for u in fed.updates(row["job_id"]) if u["client_id"] == victim
                                               and u["round"] == FAULT_ROUND and u["status"] == "accepted")
    row["victim_accepted_later"] = any(u["client_id"] == victim and u["round"] > FAULT_ROUND
                                       and u["status"] == "accepted" for u in fed.updates(row["job_id"]))
    return row


class DiskFull:
    """A full data directory: a filled tmpfs where we may mount one, else RLIMIT_FSIZE=1 on the coordinator
    process (every write that grows a file then fails with EFBIG, which the coordinator must treat alike)."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.how = "tmpfs filled (ENOSPC)" if fed.tmpfs else "RLIMIT_FSIZE on the coordinator (EFBIG)"
        self._filler: Any = None

    def fill(self) -> None:
        if self.fed.tmpfs:
            self._filler = fill_disk(self.fed.data_dir)
        else:
            assert self.fed.coord.proc is not None
            resource.prlimit(self.fed.coord.proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))

    def free(self) -> None:
        if self._filler is not None:
            self._filler.unlink()
        else:
            assert self.fed.coord.proc is not None
            resource.prlimit(self.fed.coord.proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def disk_full(fed: Federation) -> dict[str, Any]:
    """Fill the coordinator's data directory once an update of a round is accepted; free it once the coordinator
    has said so (REST notice, `job status`) and 4 s more have passed."""
    def inject(job_id: str) -> dict[str, Any]:
        rnd = fed.open_round(job_id, FAULT_ROUND, min_accepted=1, later_ok=True)
        full = DiskFull(fed)
        full.fill()
        before = {u["client_id"] for u in fed.updates(job_id)
                  if u["status"] == "accepted" and u["round"] == rnd["round"] and u["attempt"] == rnd["attempt"]}
        notice = wait_until(lambda: fed.job(job_id).get("notice"), 60, "a storage notice in REST")
        status_out = subprocess.run(cli("job", "status", job_id, "--coordinator", fed.coord.url, "--ca",
                                        str(fed.tls.ca)), capture_output=True, text=True, cwd=ROOT, timeout=60,
                                    env={**child_env(), "FEDSIGHT_TOKEN": fed.coord.token}).stdout
        time.sleep(4.0)
        full.free()
        t_free = time.monotonic()
        wait_until(lambda: fed.job(job_id)["current_round"] >= rnd["round"], 60, "the held round committed")
        return {"notice": notice, "cli_status": status_out, "accepted_before_full": sorted(before),
                "fault_round": rnd["round"], "fault_attempt": rnd["attempt"], "recover_s": round(time.monotonic() - t_free, 2),
                "full_disk_by": full.how}

    row = _run(fed, "coordinator disk full", inject, timeout_s=30.0)
    closed = [r for r in fed.rounds(row["job_id"]) if r["round"] == row["fault_round"] and r["status"] == "closed"]
    row["fault_round_participants"] = closed[0]["participants"] if closed else []
    row["fault_round_attempt"] = closed[0]["attempt"] if closed else None
    return row


def partition_device(fed: Federation) -> dict[str, Any]:
    """The last device loses the broker (its TCP path is cut) as a round opens, for longer than the round;
    everything else keeps the broker. Its late update must be rejected as stale and it must rejoin later."""
    timeout_s = 8.0
    victim = fed.ids[fed.n - 1]

    def inject(job_id: str) -> dict[str, Any]:
        rnd = fed.open_round(job_id, FAULT_ROUND)
        t0 = time.monotonic()
        fed.proxy.cut(timeout_s + 4.0)
        closed = [r for r in fed.rounds(job_id) if r["round"] == FAULT_ROUND and r["status"] != "open"]
        return {"victim": victim, "victim_selected": victim in rnd["selected"], "deadline_s": timeout_s,
                "round_closed_while_cut": bool(closed), "cut_s": round(time.monotonic() - t0, 1)}

    row = _run(fed, "device loses the broker longer than a round", inject, timeout_s=timeout_s)
    mine = [u for u in fed.updates(row["job_id"]) if u["client_id"] == victim]
    row["victim_accepted_in_fault_round"] = any(u["status"] == "accepted" and u["round"] == FAULT_ROUND for u in mine)
    row["victim_stale_reasons"] = [u["reason"] for u in mine if u["status"] == "rejected"]
    row["victim_accepted_later"] = any(u["status"] == "accepted" and u["round"] > FAULT_ROUND for u in mine)
    return row
