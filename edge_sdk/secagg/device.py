"""One device's side of one secure-aggregation round: a state machine over ``secagg_wire`` messages.

advertise -> share (roster) -> receive_inbox -> mask (the encoded update) -> reveal (unmask request)

Secrets never leave the device except as Shamir shares sealed for one neighbour each, and at unmasking the
device hands out, per peer, either a share of its self-mask seed (peer survived) or of its masking-key seed
(peer dropped), never both, and only once per round; it reveals nothing when fewer than a strict majority
of its neighbourhood survived. Honest-but-curious model: the coordinator relays keys faithfully (no PKI
signatures on the keys; docs/secagg.md says what a malicious coordinator could do). Given the job's
``terms``, the device does not take the roster's noise on trust: it refuses a roster that would give less
noise than the job promises (``terms.py``) before it shares anything.
"""
from __future__ import annotations

import hashlib
import logging
import secrets

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_sdk.protocol import secagg_wire as sw
from edge_sdk.protocol.errors import ProtocolError

from . import noise, prg, shares
from .ring import FixedPoint
from .terms import RosterRefused, RoundTerms, refusal

log = logging.getLogger(__name__)


def commitment(context: bytes, self_seed: bytes) -> bytes:
    """Published with the keys, so the coordinator can tell a correctly rebuilt self-mask seed from garbage."""
    return hashlib.sha256(b"fedsight/secagg/v1|commit|" + context + b"|" + self_seed).digest()


class SecAggDevice:
    """Create one per round attempt; each method accepts only the message its phase expects."""

    def __init__(self, client_id: str, job_id: str, round_: int, attempt: int,
                 terms: RoundTerms | None = None) -> None:
        """``terms``: the job's promise the roster is checked against (the SDK's session always passes them;
        without them the roster's scale and noise variance are taken as stated)."""
        self.client_id, self.job_id, self.round, self.attempt = client_id, job_id, round_, attempt
        self.terms = terms
        self.context = sw.context_bytes(job_id, round_, attempt)
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_seed = secrets.token_bytes(prg.SEED_BYTES)
        self._mask_sk = prg.mask_private_key(self._mask_seed, self.context)
        self._self_seed = secrets.token_bytes(prg.SEED_BYTES)
        self.phase = "advertise"
        self.peers: list[str] = []
        self._keys: list[tuple[bytes, bytes]] = []
        self.me = -1
        self.fixed: FixedPoint | None = None
        self.k = 0
        self.noise_var = 0.0
        self._held: dict[int, tuple[bytes, bytes]] = {}  # roster position -> (mask-key share, self-mask share)
        self.sharers: list[int] = []  # positions whose envelopes the coordinator relayed: they masked with us
        self.bad_envelopes: list[str] = []

    def _msg(self, kind: int, fields: dict | None = None, body: bytes = b"") -> sw.SecAggMessage:
        return sw.SecAggMessage(kind, self.job_id, self.round, self.attempt, self.client_id, fields or {}, body)

    def _expect(self, msg: sw.SecAggMessage, kind: int, phase: str) -> None:
        if msg.kind != kind:
            raise ProtocolError(f"expected a {sw.KIND_NAMES[kind]} message, got {msg.name}")
        if (msg.job_id, msg.round, msg.attempt, msg.client_id) != (self.job_id, self.round, self.attempt,
                                                                   self.client_id):
            raise ProtocolError(f"{msg.name} is for job {msg.job_id} round {msg.round} attempt {msg.attempt} "
                                f"device {msg.client_id}, not this round")
        if self.phase != phase:
            raise ProtocolError(f"{msg.name} arrived in phase {self.phase!r}")

    def advertise(self) -> sw.SecAggMessage:
        if self.phase != "advertise":
            raise ProtocolError("keys were already advertised for this round")
        self.phase = "share"
        body = (prg.public_bytes(self._enc_sk) + prg.public_bytes(self._mask_sk)
                + commitment(self.context, self._self_seed))
        return self._msg(sw.KEYS, body=body)

    def share(self, roster: sw.SecAggMessage) -> sw.SecAggMessage:
        """Split both seeds t-of-m over the roster (self included) and seal one envelope per neighbour."""
        self._expect(roster, sw.ROSTER, "share")
        peers = list(roster.fields["peers"])
        if self.client_id not in peers:
            raise ProtocolError("roster does not list this device")
        keys = [(roster.body[i * 64:i * 64 + 32], roster.body[i * 64 + 32:i * 64 + 64]) for i in range(len(peers))]
        me = peers.index(self.client_id)
        if keys[me] != (prg.public_bytes(self._enc_sk), prg.public_bytes(self._mask_sk)):
            raise ProtocolError("roster carries keys for this device that it did not advertise")
        reason = refusal(roster.fields, self.terms) if self.terms is not None else None
        if reason is not None:
            self.phase = "refused"
            raise RosterRefused(f"refusing the roster: {reason}")
        self.peers, self._keys, self.me = peers, keys, me
        self.k = int(roster.fields["k"])
        self.fixed = FixedPoint(float(roster.fields["clip"]), len(peers), float(roster.fields["scale"]))
        self.noise_var = float(roster.fields["noise_var"])
        m = len(peers)
        t = shares.threshold(m)
        mask_shares = shares.split(self._mask_seed, t, m)
        self_shares = shares.split(self._self_seed, t, m)
        self._held[me] = (mask_shares[me], self_shares[me])
        sealed = []
        for pos, peer in enumerate(peers):
            if pos == me:
                continue
            key = prg.share_encryption_key(self._enc_sk, keys[pos][0], self.context, self.client_id, peer)
            sealed.append(shares.seal(key, self.context, self.client_id, peer, mask_shares[pos], self_shares[pos]))
        self.phase = "inbox"
        return self._msg(sw.SHARES, body=b"".join(sealed))

    def receive_inbox(self, inbox: sw.SecAggMessage) -> None:
        """Open the neighbours' envelopes; one that does not authenticate (sealed for another round, tampered)
        is logged and its shares left out; the sender still counts as having shared (it masked with us)."""
        self._expect(inbox, sw.INBOX, "inbox")
        senders = list(inbox.fields["from"])
        if any(p >= len(self.peers) or p == self.me for p in senders):
            raise ProtocolError("inbox names senders outside this device's roster")
        for i, pos in enumerate(senders):
            blob = inbox.body[i * sw.ENVELOPE_BYTES:(i + 1) * sw.ENVELOPE_BYTES]
            peer = self.peers[pos]
            key = prg.share_encryption_key(self._enc_sk, self._keys[pos][0], self.context, peer, self.client_id)
            try:
                self._held[pos] = shares.open_envelope(key, self.context, peer, self.client_id, blob)
            except ValueError as exc:
                log.warning("secure aggregation round %s: %s", self.context.decode(), exc)
                self.bad_envelopes.append(peer)
        self.sharers = sorted(senders)
        self.phase = "mask"

    def mask(self, encoded: np.ndarray, rng: np.random.Generator | None = None) -> sw.SecAggMessage:
        """Add the distributed noise, the self mask and every pairwise mask to the encoded update (uint32)."""
        if self.phase != "mask":
            raise ProtocolError(f"cannot mask in phase {self.phase!r}")
        encoded = np.asarray(encoded, dtype=np.uint32)
        if encoded.shape != (self.k,):
            raise ValueError(f"encoded update has {encoded.size} ring elements, the round uses k={self.k}")
        y = encoded + noise.skellam(self.noise_var, self.k, rng).astype(np.uint32)
        y += prg.expand(prg.self_mask_key(self._self_seed, self.context), self.k)
        for pos in self.sharers:
            peer = self.peers[pos]
            m = prg.expand(prg.pair_mask_key(self._mask_sk, self._keys[pos][1], self.context, self.client_id, peer),
                           self.k)
            if self.client_id < peer:
                y += m
            else:
                y -= m
        self.phase = "reveal"
        return self._msg(sw.MASKED, {"k": self.k}, y.astype("<u4").tobytes())

    def reveal(self, request: sw.SecAggMessage) -> sw.SecAggMessage:
        """Shares of survivors' self-mask seeds and dropped peers' masking-key seeds, once; refuses (ProtocolError)
        when too few of this device's neighbourhood survived, so a failing round reveals nothing."""
        self._expect(request, sw.UNMASK, "reveal")
        survivors, dropped = set(request.fields["survivors"]), set(request.fields["dropped"])
        allowed = set(self.sharers) | {self.me}
        if not survivors | dropped <= allowed:
            raise ProtocolError("unmask request names devices that did not share with this device")
        if self.me not in survivors:
            raise ProtocolError("unmask request lists this device as dropped, but it sent its masked input")
        need = shares.threshold(len(self.peers))
        if len(survivors) < need:
            self.phase = "done"
            raise ProtocolError(f"only {len(survivors)} of {len(self.peers)} neighbours survived, {need} needed: "
                                "revealing nothing")
        self.phase = "done"
        self_ids = sorted(p for p in survivors if p in self._held)
        pair_ids = sorted(p for p in dropped if p in self._held)
        body = b"".join(self._held[p][1] for p in self_ids) + b"".join(self._held[p][0] for p in pair_ids)
        return self._msg(sw.REVEAL, {"self_masks": self_ids, "pair_keys": pair_ids}, body)
