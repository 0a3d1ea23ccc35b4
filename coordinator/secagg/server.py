"""The coordinator's side of one secure-aggregation round: relay keys and shares, collect masked inputs,
ask the survivors to unmask, rebuild the secrets it is owed and subtract the masks. Pure, no I/O.

Phases: ``keys`` -> ``shares`` -> ``masked`` -> ``unmask`` -> ``done`` (or ``failed``). ``receive`` files one
authenticated message and returns None or the reason it was rejected (wrong round, wrong phase, wrong size,
duplicate); a rejected device is simply treated as if it had not sent. ``close_*`` end a phase and return
the downlink messages, or raise :class:`SecAggAbort` when too few devices are left, before anything that
could reveal an input is asked for. The coordinator only ever holds masked vectors, shares of one of each
device's two seeds, and the final sum.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.secagg import noise, prg, shares
from edge_sdk.secagg.device import commitment
from edge_sdk.secagg.ring import FixedPoint

from coordinator.secagg.graph import neighbours

log = logging.getLogger(__name__)


class SecAggAbort(Exception):
    """The round cannot complete; nothing that would unmask an input has been (or will be) requested."""


@dataclass(frozen=True)
class SecAggParams:
    """A round's public parameters (from the job's ``secure_aggregation`` field)."""

    k: int
    clip: float
    degree: int = 16
    noise_multiplier: float = 0.0
    min_survivors: int = 2


@dataclass
class RoundResult:
    sum: np.ndarray  # float64, length k: the sum of the survivors' clipped updates (plus the noise)
    survivors: list[str]
    dropped: list[str]  # shared, then never sent a masked input
    left_out: list[str]  # selected but never shared: not part of the round at all
    effective_noise_multiplier: float
    timings: dict[str, float] = field(default_factory=dict)


class SecAggServer:
    def __init__(self, job_id: str, round_: int, attempt: int, selected: list[str], params: SecAggParams,
                 graph_seed: int) -> None:
        self.job_id, self.round, self.attempt = job_id, round_, attempt
        self.context = sw.context_bytes(job_id, round_, attempt)
        self.selected = sorted(selected)
        self.params = params
        self.graph_seed = graph_seed
        self.phase = "keys"
        self.reason: str | None = None
        self.keys: dict[str, bytes] = {}
        self.nbrs: dict[str, list[str]] = {}
        self.roster: dict[str, list[str]] = {}  # device -> its roster (sorted neighbours + itself)
        self.fixed: FixedPoint | None = None
        self.min_devices = 1
        self.noise_var = 0.0
        self.envelopes: dict[str, bytes] = {}  # sharer -> its SHARES body (envelopes in roster order)
        self.masked: dict[str, np.ndarray] = {}
        self.requests: dict[str, tuple[list[str], list[str]]] = {}  # device -> (survivors, dropped) asked
        self.revealed: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = {}
        self.rejections: list[tuple[str, str]] = []
        self.bytes_up: dict[str, int] = {}
        self.bytes_down: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- inbound
    _PHASE_KIND = {"keys": sw.KEYS, "shares": sw.SHARES, "masked": sw.MASKED, "unmask": sw.REVEAL}

    def receive(self, client_id: str, msg: sw.SecAggMessage, nbytes: int = 0) -> str | None:
        """File one message from ``client_id`` (already authenticated); None if accepted, else why not."""
        t0 = time.perf_counter()
        reason = self._check(client_id, msg)
        if reason is None:
            reason = self._accept(client_id, msg)
        if reason is None:
            self.bytes_up[f"{client_id}:{msg.name}"] = nbytes
        else:
            self.rejections.append((client_id, reason))
            log.warning("secure aggregation %s: %s from %s rejected: %s", self.context.decode(), msg.name, client_id,
                        reason)
        self.timings[f"receive_{msg.name}"] = self.timings.get(f"receive_{msg.name}", 0.0) + time.perf_counter() - t0
        return reason

    def _check(self, client_id: str, msg: sw.SecAggMessage) -> str | None:
        if msg.client_id != client_id:
            return f"message names device {msg.client_id}, sent by {client_id}"
        if (msg.job_id, msg.round, msg.attempt) != (self.job_id, self.round, self.attempt):
            return (f"wrong round: {msg.name} is for job {msg.job_id} round {msg.round} attempt {msg.attempt}, "
                    f"the open round is job {self.job_id} round {self.round} attempt {self.attempt}")
        if client_id not in self.selected:
            return "device was not selected for this round"
        expected = self._PHASE_KIND.get(self.phase)
        if msg.kind != expected:
            return f"a {msg.name} message arrived during the {self.phase} phase"
        return None

    def _accept(self, cid: str, msg: sw.SecAggMessage) -> str | None:
        if msg.kind == sw.KEYS:
            if cid in self.keys:
                return "keys already advertised"
            if not (prg.usable_public(msg.body[:32]) and prg.usable_public(msg.body[32:64])):
                return "invalid public key (a low-order X25519 point)"
            self.keys[cid] = msg.body
        elif msg.kind == sw.SHARES:
            if cid not in self.roster:
                return "device did not advertise keys in time"
            if cid in self.envelopes:
                return "shares already sent"
            want = sw.ENVELOPE_BYTES * (len(self.roster[cid]) - 1)
            if len(msg.body) != want:
                return (f"wrong size: {len(msg.body)} bytes of shares, {len(self.roster[cid]) - 1} neighbours need "
                        f"{want}")
            self.envelopes[cid] = msg.body
        elif msg.kind == sw.MASKED:
            if cid not in self.envelopes:
                return "device did not share its keys in time"
            if cid in self.masked:
                return "masked input already sent"
            if msg.fields["k"] != self.params.k:
                return f"wrong size: masked input has k={msg.fields['k']}, the round uses k={self.params.k}"
            self.masked[cid] = np.frombuffer(msg.body, dtype="<u4").astype(np.uint32)
        else:
            return self._accept_reveal(cid, msg)
        return None

    def _accept_reveal(self, cid: str, msg: sw.SecAggMessage) -> str | None:
        if cid not in self.requests:
            return "device was not asked to unmask"
        if cid in self.revealed:
            return "shares already revealed"
        roster = self.roster[cid]
        names_s = [roster[p] for p in msg.fields["self_masks"] if p < len(roster)]
        names_p = [roster[p] for p in msg.fields["pair_keys"] if p < len(roster)]
        asked_s, asked_p = self.requests[cid]
        if len(names_s) != len(msg.fields["self_masks"]) or not set(names_s) <= set(asked_s):
            return "revealed self-mask shares for devices it was not asked about"
        if len(names_p) != len(msg.fields["pair_keys"]) or not set(names_p) <= set(asked_p):
            return "revealed masking-key shares for devices it was not asked about"
        b = msg.body
        n = len(names_s)
        self.revealed[cid] = ({u: b[i * 16:(i + 1) * 16] for i, u in enumerate(names_s)},
                              {u: b[(n + i) * 16:(n + i + 1) * 16] for i, u in enumerate(names_p)})
        return None

    # ----------------------------------------------------------------------------------------- phases
    def _fail(self, reason: str) -> SecAggAbort:
        self.phase, self.reason = "failed", reason
        log.warning("secure aggregation %s failed: %s", self.context.decode(), reason)
        return SecAggAbort(reason)

    def _enough(self, n: int, what: str) -> None:
        if n < self.params.min_survivors:
            raise self._fail(f"{n} device(s) {what}, at least {self.params.min_survivors} needed")

    def expecting(self) -> set[str]:
        """Devices whose message for the current phase has not arrived yet (a phase may close early)."""
        have = {"keys": (self.selected, self.keys), "shares": (list(self.roster), self.envelopes),
                "masked": (list(self.envelopes), self.masked), "unmask": (list(self.requests), self.revealed)}
        if self.phase not in have:
            return set()
        want, got = have[self.phase]
        return set(want) - set(got)

    def close_keys(self) -> dict[str, sw.SecAggMessage]:
        """Rosters for the devices that advertised keys (the rest are left out of the round)."""
        t0 = time.perf_counter()
        u1 = sorted(self.keys)
        self._enough(len(u1), "advertised keys")
        self.nbrs = neighbours(u1, self.params.degree, self.graph_seed)
        self.roster = {d: sorted(self.nbrs[d] + [d]) for d in u1}
        self.min_devices = max(self.params.min_survivors, shares.threshold(len(u1)))
        self.fixed = FixedPoint.for_round(self.params.clip, len(u1), self.params.k, self.params.noise_multiplier,
                                          self.min_devices, noise.max_scale(self.params.noise_multiplier,
                                                                            self.params.clip, self.min_devices))
        if self.params.noise_multiplier > 0 and self.params.clip * self.fixed.scale < noise.MIN_NOISY_SENSITIVITY:
            span = self.params.clip * self.fixed.scale
            raise self._fail(f"the ring is too coarse for distributed DP: one update spans {span:.0f} ring units, "
                             f"{noise.MIN_NOISY_SENSITIVITY:.0f} needed; lower the noise or the devices per round")
        self.noise_var = noise.per_device_variance(self.params.noise_multiplier, self.params.clip, self.fixed.scale,
                                                   self.params.k, self.min_devices)
        out = {}
        for d in u1:
            body = b"".join(self.keys[p][:sw.PEER_KEY_BYTES] for p in self.roster[d])
            out[d] = self._down(sw.ROSTER, d, {"peers": self.roster[d], "k": self.params.k, "clip": self.params.clip,
                                               "scale": self.fixed.scale, "noise_var": self.noise_var,
                                               "t": self.min_devices, "devices": len(u1)}, body)
        self.phase = "shares"
        self.timings["close_keys"] = time.perf_counter() - t0
        return out

    def close_shares(self) -> dict[str, sw.SecAggMessage]:
        """Each sharer's inbox: the envelopes its neighbours who also shared sealed for it."""
        t0 = time.perf_counter()
        u2 = set(self.envelopes)
        self._enough(len(u2), "shared their keys")
        out = {}
        for v in sorted(u2):
            senders, blobs = [], []
            for u in self.nbrs[v]:
                if u not in u2:
                    continue
                ru = self.roster[u]
                slot = ru.index(v) - (1 if ru.index(v) > ru.index(u) else 0)  # u's envelopes skip u itself
                blobs.append(self.envelopes[u][slot * sw.ENVELOPE_BYTES:(slot + 1) * sw.ENVELOPE_BYTES])
                senders.append(self.roster[v].index(u))
            out[v] = self._down(sw.INBOX, v, {"from": senders}, b"".join(blobs))
        self.phase = "masked"
        self.timings["close_shares"] = time.perf_counter() - t0
        return out

    def close_masked(self) -> dict[str, sw.SecAggMessage]:
        """Unmask requests to the survivors, after checking that every secret the coordinator will need can be
        rebuilt from survivors' shares; otherwise the round fails here and no share is ever requested."""
        t0 = time.perf_counter()
        u2, u3 = set(self.envelopes), set(self.masked)
        self._enough(len(u3), "sent their masked input")
        if len(u3) < self.min_devices:
            raise self._fail(f"{len(u3)} of {len(self.roster)} devices survived, {self.min_devices} needed")
        for u in sorted(u2):
            live = [v for v in self.roster[u] if v in u3]
            need = shares.threshold(len(self.roster[u]))
            if len(live) < need:
                raise self._fail(f"only {len(live)} of {len(self.roster[u])} holders of {u}'s shares survived, "
                                 f"{need} needed")
        out = {}
        for v in sorted(u3):
            pos = {d: i for i, d in enumerate(self.roster[v])}
            circle = [u for u in self.roster[v] if u in u2]
            surv = [u for u in circle if u in u3]
            drop = [u for u in circle if u not in u3]
            self.requests[v] = (surv, drop)
            out[v] = self._down(sw.UNMASK, v, {"survivors": [pos[u] for u in surv], "dropped": [pos[u] for u in drop]})
        self.phase = "unmask"
        self.timings["close_masked"] = time.perf_counter() - t0
        return out

    def finish(self) -> RoundResult:
        """Rebuild the survivors' self-mask seeds and the dropped devices' masking keys, remove their masks and
        decode the sum."""
        t0 = time.perf_counter()
        assert self.fixed is not None
        u2, u3 = set(self.envelopes), sorted(self.masked)
        k = self.params.k
        total = np.zeros(k, dtype=np.uint32)
        for u in u3:
            total += self.masked[u]
        for u in u3:
            seed = self._rebuild(u, 0)
            if commitment(self.context, seed) != self.keys[u][64:96]:
                raise self._fail(f"the self-mask seed of {u} rebuilt from its neighbours' shares does not match its "
                                 "commitment (a neighbour revealed a corrupt share)")
            total -= prg.expand(prg.self_mask_key(seed, self.context), k)
        for u in sorted(u2 - set(u3)):
            sk = prg.mask_private_key(self._rebuild(u, 1), self.context)
            if prg.public_bytes(sk) != self.keys[u][32:64]:
                raise self._fail(f"the masking key of dropped device {u} rebuilt from shares does not match its "
                                 "public key (a neighbour revealed a corrupt share)")
            for v in self.nbrs[u]:
                if v in self.masked:  # v added +m if v < u else -m for the pair (v, u): take it back
                    m = prg.expand(prg.pair_mask_key(sk, self.keys[v][32:64], self.context, u, v), k)
                    if v < u:
                        total -= m
                    else:
                        total += m
        self.phase = "done"
        self.timings["finish"] = time.perf_counter() - t0
        return RoundResult(self.fixed.decode_sum(total), u3, sorted(u2 - set(u3)),
                           sorted(set(self.selected) - u2),
                           noise.effective_noise_multiplier(self.params.noise_multiplier, len(u3), self.min_devices),
                           dict(self.timings))

    def _rebuild(self, u: str, which: int) -> bytes:
        """Seed ``which`` (0 self-mask, 1 masking key) of ``u`` from the first t revealed shares."""
        roster = self.roster[u]
        points = []
        for holder, (self_shares, pair_shares) in self.revealed.items():
            share = (self_shares if which == 0 else pair_shares).get(u)
            if share is not None and holder in roster:
                points.append((roster.index(holder) + 1, share))
        need = shares.threshold(len(roster))
        if len(points) < need:
            what = "self-mask seed" if which == 0 else "masking key"
            raise self._fail(f"only {len(points)} share(s) of {u}'s {what} were revealed, {need} needed")
        return shares.combine(sorted(points)[:need])

    def abort_message(self, client_id: str) -> sw.SecAggMessage:
        return self._down(sw.ABORT, client_id, {"reason": self.reason or "round aborted"})

    def _down(self, kind: int, cid: str, fields: dict | None = None, body: bytes = b"") -> sw.SecAggMessage:
        return sw.SecAggMessage(kind, self.job_id, self.round, self.attempt, cid, fields or {}, body)

