"""Secure aggregation protocol core (issue 8 items 3-5): in-process rounds with the real cryptography."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from scipy import stats

from coordinator.secagg.graph import neighbours
from coordinator.secagg.local import KEY, run_round
from coordinator.secagg.server import SecAggParams, SecAggServer
from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol.errors import ProtocolError
from edge_sdk.secagg import noise
from edge_sdk.secagg.device import SecAggDevice
from edge_sdk.secagg.ring import FixedPoint, clip_l2

K = 400
_CHANCE = 1e-6  # a p-value below this is structure, not bad luck: see the uniformity test


def _inputs(n: int, k: int = K, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c-{i:03d}": rng.normal(0, scale, k) for i in range(n)}


def _plain(inputs: dict[str, np.ndarray], skip: set[str] = set(), clip: float = 1.0) -> np.ndarray:
    """The plain sum of what the devices send: each input clipped to L2 norm ``clip``."""
    return np.sum([clip_l2(v, clip) for d, v in inputs.items() if d not in skip], axis=0)


def _params(k: int = K, **kw) -> SecAggParams:
    return SecAggParams(**{"k": k, "clip": 1.0, "min_survivors": 2, **kw})


def test_unmasked_sum_matches_plain_sum_within_fixed_point_error() -> None:
    inputs = _inputs(8)
    inputs["c-007"] *= 10  # one device far over the clip bound: its clipped update is what is summed
    out = run_round(inputs, _params())
    assert out.error is None and out.result is not None
    fixed = out.server.fixed
    assert np.linalg.norm(inputs["c-007"]) > 5
    err = np.abs(out.result.sum - _plain(inputs)).max()
    assert err <= len(inputs) * fixed.resolution + 1e-12
    assert out.result.survivors == sorted(inputs) and not out.result.dropped


def test_coordinator_view_of_one_masked_update_is_uniform() -> None:
    """A constant input (maximally non-uniform) is indistinguishable from uniform over Z_2^32 once masked;
    the same test rejects the unmasked encoding, so it has the power to see structure.

    The masks come from fresh keys every run, so each p-value is uniform on [0, 1] when the masking is right
    (checked over 150 runs). The bar is therefore 1e-6, not 1e-3: four checks at 1e-3 failed about one CI run
    in 250 by chance (stop 18: chi-square p = 0.00078), while the unmasked encoding scores p = 0."""
    k = 20_000
    inputs = {f"c-{i}": np.full(k, 0.003) for i in range(4)}
    seen: dict[str, bytes] = {}

    def capture(device: str, kind: int, frame: bytes) -> bytes:
        if kind == sw.MASKED:
            seen[device] = frame
        return frame

    out = run_round(inputs, _params(k=k), tamper=capture)
    assert out.error is None
    masked = np.frombuffer(sw.decode(seen["c-0"]).body, dtype="<u4")
    u = masked.astype(np.float64) / 2**32
    assert stats.kstest(u, "uniform").pvalue > _CHANCE
    counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)  # top byte
    assert stats.chisquare(counts).pvalue > _CHANCE
    counts_low = np.bincount((masked & 0xFF).astype(np.int64), minlength=256)  # bottom byte
    assert stats.chisquare(counts_low).pvalue > _CHANCE
    plain = out.server.fixed.encode(inputs["c-0"])
    assert stats.kstest(plain.astype(np.float64) / 2**32, "uniform").pvalue < _CHANCE  # same bar: it has power
    # and the sum of the masked vectors, without the unmasking, is still just noise
    total = np.sum([np.frombuffer(sw.decode(f).body, dtype="<u4").astype(np.uint64) for f in seen.values()],
                   axis=0) % 2**32
    assert stats.kstest(total / 2**32, "uniform").pvalue > _CHANCE


def test_thirty_percent_dropouts_after_masking_are_recovered() -> None:
    inputs = _inputs(10)
    dropped = {"c-001", "c-004", "c-008"}
    out = run_round(inputs, _params(), drop_after_masking=dropped)
    assert out.error is None and out.result is not None
    assert out.result.dropped == sorted(dropped)
    assert np.abs(out.result.sum - _plain(inputs, dropped)).max() <= 10 * out.server.fixed.resolution


def test_device_dropping_before_sharing_is_left_out() -> None:
    inputs = _inputs(6)
    out = run_round(inputs, _params(), drop_before_sharing={"c-002"}, drop_after_masking={"c-005"})
    assert out.error is None and out.result is not None
    assert out.result.left_out == ["c-002"] and out.result.dropped == ["c-005"]
    assert np.abs(out.result.sum - _plain(inputs, {"c-002", "c-005"})).max() <= 6 * out.server.fixed.resolution


def test_neighbour_graph_round_with_dropouts() -> None:
    inputs = _inputs(40, k=64)
    dropped = {f"c-{i:03d}" for i in range(0, 40, 4)}  # 25 %
    out = run_round(inputs, _params(k=64, degree=8), drop_after_masking=dropped, seed=7)
    assert out.error is None and out.result is not None
    assert max(len(r) for r in out.server.roster.values()) == 9  # 8 neighbours + itself, not all 40
    assert np.abs(out.result.sum - _plain(inputs, dropped)).max() <= 40 * out.server.fixed.resolution


def test_graph_is_symmetric_and_regular() -> None:
    devices = [f"d{i}" for i in range(50)]
    g = neighbours(devices, 10, seed=3)
    assert all(len(v) == 10 for v in g.values())
    assert all(a in g[b] for a, vs in g.items() for b in vs)
    assert neighbours(devices[:5], 10, seed=3)["d0"] == ["d1", "d2", "d3", "d4"]


def _retag(frame: bytes, **changes: object) -> bytes:
    """Re-frame an uplink message with changed header fields and a valid MAC (an authenticated but wrong
    message, as a buggy or stale device would send)."""
    msg = sw.decode(frame)
    for name, value in changes.items():
        setattr(msg, name, value)
    return sw.encode(msg, KEY)


def test_shares_for_the_wrong_round_are_rejected_and_the_round_completes() -> None:
    inputs = _inputs(8)

    def stale(device: str, kind: int, frame: bytes) -> bytes:
        return _retag(frame, round=0) if device == "c-003" and kind == sw.SHARES else frame

    out = run_round(inputs, _params(), tamper=stale)
    assert out.error is None and out.result is not None
    assert [(d, r[:11]) for d, r in out.server.rejections] == [("c-003", "wrong round")]
    assert "round 0" in out.server.rejections[0][1] and "round 1" in out.server.rejections[0][1]
    assert out.result.left_out == ["c-003"]
    assert np.abs(out.result.sum - _plain(inputs, {"c-003"})).max() <= 8 * out.server.fixed.resolution


def test_shares_of_the_wrong_size_are_rejected_and_the_round_completes() -> None:
    inputs = _inputs(8)

    def short(device: str, kind: int, frame: bytes) -> bytes:
        return _retag(frame, body=sw.decode(frame).body[:-5]) if device == "c-006" and kind == sw.SHARES else frame

    out = run_round(inputs, _params(), tamper=short)
    assert out.error is None and out.result is not None
    assert len(out.server.rejections) == 1
    device, reason = out.server.rejections[0]
    assert device == "c-006" and reason.startswith("wrong size") and "7 neighbours" in reason
    assert np.abs(out.result.sum - _plain(inputs, {"c-006"})).max() <= 8 * out.server.fixed.resolution


def test_low_order_public_key_is_rejected_and_the_round_completes() -> None:
    """An all-zero X25519 key would make every neighbour's key agreement fail; it is refused at the door."""
    inputs = _inputs(5)

    def zero_key(device: str, kind: int, frame: bytes) -> bytes:
        if device == "c-001" and kind == sw.KEYS:
            return _retag(frame, body=bytes(32) + sw.decode(frame).body[32:])
        return frame

    out = run_round(inputs, _params(), tamper=zero_key)
    assert out.error is None and out.result is not None
    assert out.server.rejections == [("c-001", "invalid public key (a low-order X25519 point)")]
    assert out.result.left_out == ["c-001"]
    assert np.abs(out.result.sum - _plain(inputs, {"c-001"})).max() <= 5 * out.server.fixed.resolution


def test_envelope_sealed_for_another_round_does_not_open() -> None:
    """Envelopes carried inside a correctly labelled message but sealed for another round fail
    authentication at their recipient, which leaves those shares out: one such envelope costs one share and
    the round completes; if every holder's envelope is bad the sender's secrets cannot be rebuilt and the
    round fails safely, naming it, instead of producing a wrong sum."""
    inputs = _inputs(7)
    stolen = run_round(inputs, _params(), round_=5).server.envelopes["c-002"]  # same devices, another round

    def swap(slots: int):
        def tamper(device: str, kind: int, frame: bytes) -> bytes:
            if device == "c-002" and kind == sw.SHARES:
                body = sw.decode(frame).body
                cut = slots * sw.ENVELOPE_BYTES
                return _retag(frame, body=stolen[:cut] + body[cut:])
            return frame
        return tamper

    out = run_round(inputs, _params(), tamper=swap(1))  # the envelope for c-000 (slot 0)
    assert out.error is None and out.result is not None
    assert np.abs(out.result.sum - _plain(inputs)).max() <= 7 * out.server.fixed.resolution
    out = run_round(inputs, _params(), tamper=swap(6))
    assert out.result is None and "share(s) of c-002's self-mask seed were revealed" in (out.error or "")


def test_too_few_survivors_fails_safely_and_reveals_nothing() -> None:
    inputs = _inputs(6)
    out = run_round(inputs, _params(), drop_after_masking={"c-000", "c-001", "c-002", "c-003"})
    assert out.result is None and "SecAggAbort" in (out.error or "")
    assert "2 of 6 devices survived, 4 needed" in out.error
    assert out.server.phase == "failed" and not out.server.requests and not out.server.revealed
    assert "reveal" not in out.traffic.mean("up")


def test_device_refuses_to_reveal_for_a_short_survivor_list() -> None:
    """Even a coordinator that asks anyway gets nothing from a device when under a majority survived."""
    inputs = _inputs(5)
    server = SecAggServer("job-1", 1, 1, sorted(inputs), _params(), 0)
    devices = {d: SecAggDevice(d, "job-1", 1, 1) for d in inputs}
    for d, dev in devices.items():
        server.receive(d, dev.advertise())
    for d, msg in server.close_keys().items():
        server.receive(d, devices[d].share(msg))
    for d, msg in server.close_shares().items():
        devices[d].receive_inbox(msg)
    dev = devices["c-000"]
    dev.mask(dev.fixed.encode(inputs["c-000"]))
    forged = sw.SecAggMessage(sw.UNMASK, "job-1", 1, 1, "c-000", {"survivors": [0, 1], "dropped": [2, 3, 4]})
    with pytest.raises(ProtocolError, match="revealing nothing"):
        dev.reveal(forged)
    with pytest.raises(ProtocolError, match="phase"):  # and it never answers a second request
        dev.reveal(sw.SecAggMessage(sw.UNMASK, "job-1", 1, 1, "c-000",
                                    {"survivors": [0, 1, 2, 3], "dropped": [4]}))


def test_device_never_reveals_its_own_pairwise_key() -> None:
    inputs = _inputs(4)
    dev = SecAggDevice("c-000", "job-1", 1, 1)
    server = SecAggServer("job-1", 1, 1, ["c-000", "c-001", "c-002", "c-003"], _params(), 0)
    others = {d: SecAggDevice(d, "job-1", 1, 1) for d in ("c-001", "c-002", "c-003")}
    for d, x in [("c-000", dev), *others.items()]:
        server.receive(d, x.advertise())
    for d, msg in server.close_keys().items():
        server.receive(d, (dev if d == "c-000" else others[d]).share(msg))
    dev.receive_inbox(server.close_shares()["c-000"])
    dev.mask(dev.fixed.encode(inputs["c-000"]))
    with pytest.raises(ProtocolError, match="lists this device as dropped"):
        dev.reveal(sw.SecAggMessage(sw.UNMASK, "job-1", 1, 1, "c-000", {"survivors": [1, 2, 3], "dropped": [0]}))


def test_missing_reveals_fail_the_round_without_a_wrong_sum() -> None:
    inputs = _inputs(6)
    out = run_round(inputs, _params(), drop_after_masking={"c-005"},
                    drop_before_reveal={"c-000", "c-001", "c-002"})
    assert out.result is None and "were revealed" in (out.error or "")


def test_corrupt_revealed_share_is_detected() -> None:
    inputs = _inputs(5)

    def corrupt(device: str, kind: int, frame: bytes) -> bytes:
        if device == "c-000" and kind == sw.REVEAL:
            msg = sw.decode(frame)
            return _retag(frame, body=bytes(b ^ 0x5A for b in msg.body))
        return frame

    out = run_round(inputs, _params(), tamper=corrupt)
    assert out.result is None and "does not match its commitment" in (out.error or "")


def test_wire_rejects_forgery_and_garbage() -> None:
    dev = SecAggDevice("c-000", "job-1", 1, 1)
    frame = sw.encode(dev.advertise(), KEY)
    assert sw.verify(frame, KEY) and not sw.verify(frame, b"x" * 32)
    flipped = bytearray(frame)
    flipped[-40] ^= 1
    assert not sw.verify(bytes(flipped), KEY)
    for bad, why in [(b"XYZ" + frame[3:], "magic"), (frame[:10], "fit|truncated"),
                     (frame[:3] + bytes([9]) + frame[4:], "version")]:
        with pytest.raises(ProtocolError, match=why):
            sw.decode(bad)
    msg = sw.decode(frame)
    msg.body = msg.body[:90]
    with pytest.raises(ProtocolError, match="wrong size"):
        sw.decode(sw.encode(msg, KEY))
    with pytest.raises(ProtocolError, match="signed"):
        sw.encode(dev._msg(sw.KEYS, body=bytes(96)))  # uplink must be signed
    head = struct.unpack_from("<3sBBBI", frame)
    assert head[2] == sw.KEYS


def test_fixed_point_worst_case_does_not_wrap() -> None:
    n, k = 50, 16
    fixed = FixedPoint.for_round(2.0, n, k, noise_multiplier=1.0, min_devices=26)
    one = np.zeros(k)
    one[3] = 5.0  # clipped to 2.0
    total = np.zeros(k, dtype=np.uint32)
    for _ in range(n):
        total += fixed.encode(one)
    noise_std = np.sqrt(noise.per_device_variance(1.0, 2.0, fixed.scale, k, 26) * n)
    total[3] += np.uint32(int(12 * noise_std))  # the noise's 12-sigma tail on top
    assert fixed.decode_sum(total)[3] > 0
    assert abs(fixed.decode_sum(total)[3] - n * 2.0) < 12 * noise_std / fixed.scale + n * fixed.resolution


def test_distributed_noise_sum_carries_the_calibrated_variance() -> None:
    """Each device adds Skellam noise of variance sigma^2 / min_devices; the unmasked sum of zero inputs is
    the noise alone, with the variance the effective noise multiplier promises."""
    k, n = 4000, 6
    inputs = {f"c-{i}": np.zeros(k) for i in range(n)}
    out = run_round(inputs, _params(k=k, noise_multiplier=0.5), rng=np.random.default_rng(1))
    assert out.error is None and out.result is not None
    fixed = out.server.fixed
    ring_sum = out.result.sum * fixed.scale
    z_eff = out.result.effective_noise_multiplier
    assert z_eff == pytest.approx(0.5 * np.sqrt(n / out.server.min_devices))
    want = z_eff * noise.sensitivity(1.0, fixed.scale, k)
    assert np.std(ring_sum) == pytest.approx(want, rel=0.05)
    assert abs(np.mean(ring_sum)) < 4 * want / np.sqrt(k)
