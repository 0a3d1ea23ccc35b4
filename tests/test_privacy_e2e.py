"""A DP job with a small budget stops by itself at the right round, over real parts: Mosquitto (mqtts), the
coordinator process, three device processes that clip what they send; created and followed through REST, and
through the CLI (`fedsight job create --epsilon ...`, `fedsight job status`)."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from coordinator.cli import main as cli
from coordinator.privacy import accountant
from tests.support.processes import Coordinator, start_devices_online, stop_process

pytestmark = pytest.mark.integration

DEVICES = 3
Z = 4.0
# two rounds fit in the budget, a third does not
BUDGET = round((accountant.epsilon(Z, 2, 1e-5) + accountant.epsilon(Z, 3, 1e-5)) / 2, 3)


@pytest.fixture(scope="module")
def devices(coordinator: Coordinator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    workdir = tmp_path_factory.mktemp("dp-devices")
    procs = start_devices_online(workdir, coordinator, DEVICES, timeout=90)
    yield coordinator
    for p in procs:
        stop_process(p)


def wait_done(coordinator: Coordinator, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = coordinator.http.get(f"{coordinator.api}/jobs/{job_id}", timeout=5).json()
        if job["status"] in ("finished", "failed", "stopped"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish: {job}")


def check_stopped_at_budget(coordinator: Coordinator, job: dict) -> list[dict]:
    assert job["status"] == "finished" and job["current_round"] == 2, job
    assert job["reason"].startswith("privacy budget reached: round 3 would raise epsilon")
    p = job["privacy"]
    assert p["epsilon_spent"] == pytest.approx(accountant.epsilon(Z, 2, 1e-5)) and p["epsilon_spent"] <= BUDGET
    assert p["rounds_released"] == 2 and p["target_epsilon"] == BUDGET
    rounds = coordinator.http.get(f"{coordinator.api}/jobs/{job['id']}/rounds", timeout=5).json()["rounds"]
    closed = [r for r in rounds if r["status"] == "closed"]
    assert [r["round"] for r in closed] == [1, 2] and max(r["round"] for r in rounds) == 2  # round 3 never opened
    assert [r["privacy"]["epsilon"] for r in closed] == pytest.approx([accountant.epsilon(Z, n, 1e-5) for n in (1, 2)])
    assert closed[-1]["new_version"] == job["current_version"]  # the released model: the last one within budget
    assert all(r["metrics"] == {} for r in closed)  # device-reported metrics are not released under DP
    updates = coordinator.http.get(f"{coordinator.api}/jobs/{job['id']}/updates?status=accepted", timeout=5).json()
    assert updates["updates"] and all(u["num_samples"] == 1 and u["metrics"] == {} for u in updates["updates"])
    return rounds


def test_small_budget_job_stops_at_the_right_round_via_rest(devices: Coordinator) -> None:
    body = {"name": "dp-rest", "model": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
            "rounds": 6, "clients_per_round": DEVICES, "min_clients": DEVICES, "round_timeout_s": 90,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "eval": {"dataset": "digits"},
            "codec": {"name": "topk", "density": 0.1, "values": "int8"},
            "privacy": {"epsilon": BUDGET, "noise_multiplier": Z, "clip": {"mode": "fixed", "bound": 0.5}}}
    http, api = devices.http, devices.api
    created = http.post(f"{api}/jobs", json=body, timeout=60)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["config"]["privacy"]["rounds_within_budget"] == 2
    bad = http.post(f"{api}/jobs", json={**body, "privacy": {"epsilon": -1}}, timeout=60)
    assert bad.status_code == 400 and "'privacy.epsilon' must be in (0" in bad.text
    assert http.post(f"{api}/jobs/{job_id}/start", timeout=10).ok
    check_stopped_at_budget(devices, wait_done(devices, job_id))


def test_small_budget_job_stops_at_the_right_round_via_cli(devices: Coordinator, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIGHT_TOKEN", devices.token)
    where = ["--coordinator", devices.url, "--ca", str(devices.ca)]
    assert cli.main(["job", "create", *where, "--name", "dp-cli", "--rounds", "5", "--clients-per-round",
                     str(DEVICES), "--min-clients", str(DEVICES), "--epochs", "1", "--eval", "digits",
                     "--epsilon", str(BUDGET), "--noise-multiplier", str(Z), "--dp-clip", "fixed:0.5",
                     "--start"]) == 0
    job_id = capsys.readouterr().out.strip()
    deadline = time.monotonic() + 240
    while True:
        assert cli.main(["job", "status", job_id, *where]) == 0
        out = capsys.readouterr().out
        if f"job {job_id} (dp-cli): finished" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1.0)
    assert "round 2/5" in out and "finished early: privacy budget reached: round 3 would raise epsilon" in out
    assert f"privacy: epsilon {accountant.epsilon(Z, 2, 1e-5):.3f} of {BUDGET:g} spent" in out
    header = next(line for line in out.splitlines() if line.startswith("round "))
    assert header.split()[-1] == "epsilon"
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert [float(r[-1]) for r in rows] == pytest.approx([accountant.epsilon(Z, n, 1e-5) for n in (1, 2)], abs=1e-3)
    check_stopped_at_budget(devices, wait_done(devices, job_id))
    assert cli.main(["job", "create", *where, "--delta", "1e-6"]) == 2  # DP flags without a budget
    assert "need --epsilon" in capsys.readouterr().err
