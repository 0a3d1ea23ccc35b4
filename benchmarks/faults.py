"""Fault-injection benchmark: every scenario of tests/test_faults.py, plus the issue-10 run end to end.

The issue-10 run is a 25-round digits job over a real Mosquitto with 6 device processes and min_clients 3:
two devices SIGKILLed at round 5, the coordinator SIGKILLed at round 10 and restarted on the same data
directory, Mosquitto restarted (3 s down, persistence on) at round 15. It must finish all rounds with no
manual step. Writes benchmarks/results/faults.json and the "faults" section of BENCHMARKS.md.

    nice -n 10 python benchmarks/faults.py [--skip-issue-run]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_section  # noqa: E402
from tests.support import fault_scenarios as sc  # noqa: E402
from tests.support.federation import Federation, job_body, wait_until  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "faults.json"


def issue_run(fed: Federation, rounds: int = 25) -> dict:
    """The scenario of issue 10, with the recovery time of each fault."""
    job_id = fed.create_job(job_body("issue-10", rounds, fed.n, timeout_s=10.0))
    t0 = time.monotonic()
    fed.open_round(job_id, 5, min_accepted=1, timeout=600)
    for i in (fed.n - 2, fed.n - 1):
        fed.kill_device(i)
    fed.open_round(job_id, 10, min_accepted=1, timeout=600)
    fed.coord.kill()
    time.sleep(1.0)
    t = time.time()
    fed.coord.start()
    coord_recover = wait_until(lambda: sc._first_progress_after(fed, job_id, t), 120, "progress after restart")
    fed.open_round(job_id, 15, timeout=600)
    fed.broker.write_config(persistence=True)
    fed.broker.restart(down_s=3.0)
    t = time.time()
    broker_recover = wait_until(lambda: sc._first_progress_after(fed, job_id, t), 120, "progress after broker")
    final = fed.wait_finished(job_id, timeout=900)
    acc_15 = next((r["eval"]["accuracy"] for r in fed.rounds(job_id) if r["round"] == 15 and r["status"] == "closed"),
                  None)
    return {"scenario": "issue 10: kill 2 devices @5, SIGKILL coordinator @10, restart broker @15",
            "job_id": job_id, "status": final["status"], "wall_s": round(time.monotonic() - t0, 1),
            "coordinator_recover_s": coord_recover, "recover_s": broker_recover, "accuracy_round_15": acc_15,
            **fed.summary(job_id)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-issue-run", action="store_true", help="only the short scenarios of the test suite")
    args = ap.parse_args()
    rows: list[dict] = []
    issue = None
    if args.skip_issue_run and RESULTS.exists():  # keep the last issue-10 run in the report
        issue = json.loads(RESULTS.read_text()).get("issue_run")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_issue_run:  # first: it is the end-to-end proof of issue 10
            fed = Federation(Path(tmp) / "issue", devices=6)
            try:
                issue = issue_run(fed)
                print(json.dumps(issue), flush=True)
            finally:
                fed.close()
            report(rows, issue)
        fed = Federation(Path(tmp) / "short", devices=6, tmpfs_mb=64)
        try:
            rows.append(sc.baseline(fed))
            for run in (sc.kill_devices, sc.sigstop_device, sc.partition_device,
                        lambda f: sc.restart_broker(f, persistence=False, mid_upload=False),
                        lambda f: sc.restart_broker(f, persistence=True, mid_upload=True),
                        lambda f: sc.kill_coordinator(f, during_aggregation=False),
                        lambda f: sc.kill_coordinator(f, during_aggregation=True),
                        sc.restart_device, sc.disk_full):
                try:
                    rows.append(run(fed))
                except Exception as exc:  # noqa: BLE001 - record the failure in the table and go on
                    rows.append({"scenario": getattr(run, "__name__", "scenario"), "status": f"ERROR: {exc}",
                                 "rounds_lost": "?"})
                print(json.dumps({k: rows[-1].get(k) for k in ("scenario", "status", "rounds_lost", "recover_s",
                                                                 "final_accuracy")}), flush=True)
                report(rows, issue)  # after every scenario, so a cut-short run still leaves its numbers
        finally:
            fed.close()
    print("\n".join(report(rows, issue)))


def report(rows: list[dict], issue: dict | None) -> list[str]:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"scenarios": rows, "issue_run": issue}, indent=2, default=str))
    b = rows[0]["final_accuracy"] if rows else None
    lines = [f"small_cnn on digits, 6 device processes (IID shards), real Mosquitto, {sc.ROUNDS} rounds per scenario, "
             "top-k 25 % + error feedback, faults injected from outside at round 2. Rounds lost = round attempts "
             "that did not commit; recovery = seconds from the fault's end (broker/coordinator back, disk freed) "
             "to the next accepted update, new round or commit.", "",
             "| scenario | status | rounds lost | recover (s) | final accuracy | vs fault-free |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows + ([issue] if issue else []):
        acc = r.get("final_accuracy")
        rec = r.get("recover_s")
        lines.append(f"| {r['scenario']} | {r['status']} | {r['rounds_lost']} | "
                     f"{'' if rec is None else f'{rec:.1f}'} | {'' if acc is None else f'{100 * acc:.1f} %'} | "
                     f"{'' if acc is None or b is None or r is issue else f'{100 * (acc - b):+.1f} pt'} |")
    if issue:
        lines += ["", f"Issue-10 run: {issue['rounds_closed']} of 25 rounds closed, coordinator back in "
                      f"{issue['coordinator_recover_s']} s, broker in {issue['recover_s']} s, accuracy "
                      f"{100 * (issue['accuracy_round_15'] or 0):.1f} % at round 15."]
    write_section("faults", "Fault injection", "nice -n 10 python benchmarks/faults.py", lines)
    return lines


if __name__ == "__main__":
    main()
