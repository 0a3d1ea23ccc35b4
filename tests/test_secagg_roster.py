"""Devices check the secure round's noise themselves: a roster that states a smaller variance, a larger t, a
coarser or an overflowing scale than the job's settings allow is refused with a reason, and the device sends
nothing more. An honest roster passes (and every in-process round in tests/test_secagg.py is checked too)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from coordinator.secagg.server import SecAggParams, SecAggServer
from edge_sdk.protocol import codecs, topics
from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.secagg import noise
from edge_sdk.secagg.device import SecAggDevice
from edge_sdk.secagg.session import SecAggRefused, SecureRounds
from edge_sdk.secagg.terms import RosterRefused, RoundTerms
from edge_sdk.secagg.update import round_indices
from tests.test_engine import JOB as EJOB
from tests.test_engine import Env, wait_for

JOB, K, Z, CLIP = "job-1", 64, 1.0, 1.0


def _round(n: int, degree: int = 16, z: float = Z, max_devices: int | None = None
           ) -> tuple[dict[str, SecAggDevice], dict[str, sw.SecAggMessage], RoundTerms]:
    """``n`` devices that check rosters against the job's terms, and the honest coordinator's rosters (through
    the wire encoding)."""
    ids = [f"c-{i:03d}" for i in range(n)]
    params = SecAggParams(k=K, clip=CLIP, degree=degree, noise_multiplier=z, min_survivors=2)
    terms = RoundTerms(k=K, clip=CLIP, noise_multiplier=z, min_survivors=2, neighbours=degree,
                       max_devices=max_devices or n)
    server = SecAggServer(JOB, 1, 1, ids, params, graph_seed=3)
    devices = {d: SecAggDevice(d, JOB, 1, 1, terms) for d in ids}
    for d, dev in devices.items():
        assert server.receive(d, dev.advertise()) is None
    rosters = {d: sw.decode(sw.encode(m)) for d, m in server.close_keys().items()}
    return devices, rosters, terms


def _forged(roster: sw.SecAggMessage, **fields: Any) -> sw.SecAggMessage:
    out = {**roster.fields, **fields}
    for name in [k for k, v in fields.items() if v is None]:
        del out[name]
    return sw.decode(sw.encode(sw.SecAggMessage(roster.kind, roster.job_id, roster.round, roster.attempt,
                                                roster.client_id, out, roster.body)))


def test_honest_roster_is_accepted_and_states_t_and_the_round_size() -> None:
    devices, rosters, terms = _round(5)
    f = rosters["c-000"].fields
    assert (f["devices"], f["t"]) == (5, 3)  # a strict majority of 5 (above min_clients 2)
    assert f["noise_var"] == pytest.approx(noise.per_device_variance(Z, CLIP, f["scale"], K, 3), rel=1e-12)
    msg = devices["c-000"].share(rosters["c-000"])
    assert msg.kind == sw.SHARES and devices["c-000"].noise_var == f["noise_var"]


def test_lowered_variance_is_refused_with_the_variance_it_needs() -> None:
    devices, rosters, _ = _round(5)
    honest = rosters["c-000"].fields["noise_var"]
    dev = devices["c-000"]
    with pytest.raises(RosterRefused, match=r"noise variance .* is below the .* noise multiplier 1 .* t=3") as info:
        dev.share(_forged(rosters["c-000"], noise_var=honest * 0.5))
    assert isinstance(info.value, ProtocolError)  # the SDK's error path: logged, never a crash
    assert dev.phase == "refused"
    with pytest.raises(ProtocolError):  # and it takes no further part in the round
        dev.mask(np.zeros(K, np.uint32))
    assert devices["c-001"].share(rosters["c-001"]).kind == sw.SHARES  # the honest roster still works


def test_inflated_t_is_refused_even_with_a_consistent_variance() -> None:
    """t = 5 of 5 devices (each adds 1/5 of the noise): the stated variance matches t, but the job's rule
    (max(min_clients, majority)) allows at most t = 3, so 3 survivors would carry only 3/5 of the noise."""
    devices, rosters, _ = _round(5)
    f = rosters["c-000"].fields
    forged = _forged(rosters["c-000"], t=5, noise_var=noise.per_device_variance(Z, CLIP, f["scale"], K, 5))
    with pytest.raises(RosterRefused, match="roster sets t=5, but 5 devices and min_clients allow at most t=3"):
        devices["c-000"].share(forged)


@pytest.mark.parametrize("change,why", [
    ({"devices": 9}, r"claims 9 devices .* must lie in \[5, 5\]"),  # more than were selected
    ({"devices": 4}, r"must lie in \[5, 5\]"),  # fewer than the roster lists
    ({"t": None}, "does not state how many devices"),  # an old or stripped roster
    ({"k": K // 2}, "k=32, but this round's codec seed and model give k=64"),
    ({"clip": 2 * CLIP}, "clip bound 2.0 differs from the job's 1.0"),
])
def test_roster_that_misstates_the_round_is_refused(change: dict[str, Any], why: str) -> None:
    devices, rosters, _ = _round(5)
    with pytest.raises(RosterRefused, match=why):
        devices["c-000"].share(_forged(rosters["c-000"], **change))


def test_complete_graph_must_list_every_device() -> None:
    """Up to neighbours + 1 devices everyone is in everyone's roster; a roster that claims 6 devices but lists
    5 (t = 4 instead of 3) is refused even though 6 <= clients_per_round."""
    devices, rosters, _ = _round(5, max_devices=8)
    f = rosters["c-000"].fields
    forged = _forged(rosters["c-000"], devices=6, t=4, noise_var=noise.per_device_variance(Z, CLIP, f["scale"], K, 4))
    with pytest.raises(RosterRefused, match="claims 6 devices, few enough .* but lists 5"):
        devices["c-000"].share(forged)


def test_scale_too_coarse_for_the_accounting_or_too_fine_for_the_ring_is_refused() -> None:
    devices, rosters, _ = _round(5)
    f = rosters["c-000"].fields
    coarse = 1000.0  # clip * scale = 1000 < 2^12, variance recomputed for it (so only the scale is wrong)
    with pytest.raises(RosterRefused, match="leaves one update 1000 ring units, under the 4096"):
        devices["c-000"].share(_forged(rosters["c-000"], scale=coarse,
                                       noise_var=noise.per_device_variance(Z, CLIP, coarse, K, 3)))
    fine = f["scale"] * 4  # more noise, but the sum of 5 updates plus noise no longer fits the ring
    with pytest.raises(RosterRefused, match="exceeds the ring's room for 5 devices"):
        devices["c-001"].share(_forged(rosters["c-001"], scale=fine,
                                       noise_var=noise.per_device_variance(Z, CLIP, fine, K, 3)))


def test_neighbour_graph_bounds_the_round_size_by_clients_per_round() -> None:
    """12 devices, 4 neighbours: each roster lists 5, so the round's size is only bounded by the 12 selected."""
    devices, rosters, _ = _round(12, degree=4)
    f = rosters["c-000"].fields
    assert len(f["peers"]) == 5 and (f["devices"], f["t"]) == (12, 7)
    assert devices["c-000"].share(rosters["c-000"]).kind == sw.SHARES
    forged = _forged(rosters["c-001"], devices=40, t=21,
                     noise_var=noise.per_device_variance(Z, CLIP, f["scale"], K, 21))
    with pytest.raises(RosterRefused, match=r"claims 40 devices .* at most 12 selected"):
        devices["c-001"].share(forged)


def test_without_noise_a_zero_variance_is_fine_but_t_is_still_checked() -> None:
    devices, rosters, _ = _round(4, z=0.0)
    assert rosters["c-000"].fields["noise_var"] == 0.0
    assert devices["c-000"].share(rosters["c-000"]).kind == sw.SHARES
    with pytest.raises(RosterRefused, match="roster sets t=4"):
        devices["c-001"].share(_forged(rosters["c-001"], t=4))


# --------------------------------------------------------------------------- the SDK session
SPEC = codecs.validate_spec({"name": "randk", "density": 0.25, "seed": 11})
NUMEL = 256


def _task(**sa: Any) -> dict[str, Any]:
    fields = {"clip": CLIP, "phase_timeout_s": 0.5, "noise_multiplier": Z, "neighbours": 16, "min_survivors": 2,
              "max_devices": 3, **sa}
    return {"job_id": JOB, "round": 1, "attempt": 1, "deadline_s": 5,
            "config": {"codec": SPEC, "secure_aggregation": {k: v for k, v in fields.items() if v is not None}}}


class _Harness:
    """One SDK session (``SecureRounds``) next to an honest coordinator and two honest peers; the test may
    forge the session's roster before it is relayed."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.sent: list[sw.SecAggMessage] = []
        self.session = SecureRounds("c-000", b"k" * 32, self._publish)
        self.k = int(round_indices(SPEC, NUMEL).size)
        self.server = SecAggServer(JOB, 1, 1, ["c-000", "c-001", "c-002"],
                                   SecAggParams(k=self.k, clip=CLIP, noise_multiplier=Z, min_survivors=2), 0)
        self.peers = {d: SecAggDevice(d, JOB, 1, 1) for d in ("c-001", "c-002")}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(task,), daemon=True)

    def _publish(self, topic: str, frame: bytes) -> bool:
        self.sent.append(sw.decode(frame))
        return True

    def _run(self, task: dict[str, Any]) -> None:
        try:
            self.session.run(task, SPEC, np.zeros(NUMEL, np.float32), None, None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def roster_round(self, forge: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """Advertise, relay the session's roster (fields changed by ``forge``), and let the session run to its
        end."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.sent and self.thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        self.server.receive("c-000", self.sent[0])
        for d, dev in self.peers.items():
            self.server.receive(d, dev.advertise())
        roster = self.server.close_keys()["c-000"]
        self.session.on_relay(sw.encode(_forged(roster, **forge(roster.fields)) if forge else roster))
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_session_shares_on_with_an_honest_roster() -> None:
    h = _Harness(_task())
    h.roster_round()
    assert [m.kind for m in h.sent] == [sw.KEYS, sw.SHARES]
    assert "no inbox" in str(h.error)  # then waits for the inbox this test never relays


def test_session_refuses_a_lowered_variance_logs_why_and_sends_nothing_more(caplog) -> None:
    h = _Harness(_task())
    with caplog.at_level(logging.WARNING, logger="edge_sdk.secagg.session"):
        h.roster_round(lambda f: {"noise_var": f["noise_var"] / 2})
    assert isinstance(h.error, SecAggRefused) and "is below the" in str(h.error)
    assert [m.kind for m in h.sent] == [sw.KEYS]  # keys only: no shares, no masked input
    assert any("not taking part in secure aggregation" in r.getMessage() and "is below the" in r.getMessage()
               for r in caplog.records)


def test_session_refuses_a_task_without_the_jobs_settings_before_sending_anything() -> None:
    sent: list[bytes] = []
    session = SecureRounds("c-000", b"k" * 32, lambda topic, frame: sent.append(frame) or True)
    with pytest.raises(SecAggRefused, match=r"does not state the job's secure-aggregation setting\(s\) \['noise"):
        session.run(_task(noise_multiplier=None), SPEC, np.zeros(NUMEL, np.float32), None, None)
    assert sent == []


# --------------------------------------------------------------------------- against the coordinator's round flow
@pytest.mark.parametrize("dishonest", [False, True])
def test_the_coordinators_task_lets_devices_check_its_rosters(tmp_path, monkeypatch, dishonest: bool) -> None:
    """The real runner's task carries the job's terms: honest rosters pass them; a coordinator that halves the
    stated variance is refused by every device, and the round fails before anything could be unmasked."""
    if dishonest:
        honest = SecAggServer.close_keys

        def halved(self: SecAggServer) -> dict[str, sw.SecAggMessage]:
            return {d: _forged(m, noise_var=m.fields["noise_var"] / 2) for d, m in honest(self).items()}

        monkeypatch.setattr(SecAggServer, "close_keys", halved)
    env = Env(tmp_path, clients="abc", online="abc", codec={"name": "randk", "density": 0.25}, limits=None,
              clients_per_round=3, min_clients=2,
              secure_aggregation={"clip": 1.0, "phase_timeout_s": 2, "noise_multiplier": 0.5})
    try:
        env.engine.start_job(EJOB)
        rnd = env.open_round()
        task = env.pub.json_on(topics.task_topic("a"))[0]
        k = int(round_indices(task["config"]["codec"], env.numel).size)
        terms = RoundTerms.from_task(task["config"]["secure_aggregation"], k)
        assert (terms.noise_multiplier, terms.min_survivors, terms.max_devices) == (0.5, 2, 3)
        send = lambda c, m: env.engine.submit_secagg(c, sw.encode(m, env.engine.device_key(c)))  # noqa: E731
        devs = {c: SecAggDevice(c, EJOB, 1, rnd.attempt, terms) for c in "abc"}
        for c, d in devs.items():
            assert send(c, d.advertise()) is None
        rosters: dict[str, sw.SecAggMessage] = {}
        wait_for(lambda: len(rosters.update({m.client_id: m for t, p in list(env.pub.messages)
                                             if t.endswith("/relay") for m in [sw.decode(p)]
                                             if m.kind == sw.ROSTER}) or rosters) == 3, what="rosters")
        for c, d in devs.items():
            if not dishonest:
                assert send(c, d.share(rosters[c])) is None
                continue
            with pytest.raises(RosterRefused, match="is below the"):
                d.share(rosters[c])
        if dishonest:
            env.open_round(1, 2)  # nobody shared: the attempt fails, a fresh one opens
            failed = [r for r in env.store.get_rounds(EJOB) if r["attempt"] == 1][0]
            assert failed["status"] == "failed" and "0 device(s) shared their keys" in failed["reason"]
    finally:
        env.close()
