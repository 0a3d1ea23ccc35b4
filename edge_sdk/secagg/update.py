"""A device's update under secure aggregation: the round's shared random-k coordinates, error feedback,
L2 clipping of what is sent, fixed-point encoding.

Every device in a round selects the same k coordinates (from the codec seed the task announces), so the
masked vectors add up coordinate by coordinate and the upload stays k ring elements. Error feedback keeps
what was not sent (other coordinates, what clipping cut, rounding; under DP only the other coordinates) in
the device's residual, never sent.
"""
from __future__ import annotations

import numpy as np

from edge_sdk.error_feedback import ResidualStore
from edge_sdk.protocol import codecs, sparse_index
from edge_sdk.protocol.codecs import Decoded

from .ring import FixedPoint


def round_indices(spec: dict, numel: int) -> np.ndarray:
    """The coordinates every device of the round sends (random-k from the round's seed)."""
    norm = codecs.validate_spec(spec)
    if norm["name"] != "randk":
        raise ValueError(f"secure aggregation needs the randk codec (a shared index set), got {norm['name']!r}")
    return sparse_index.seeded_indices(norm["seed"], numel, codecs.expected_counts(norm, [numel])[0])


def encode_secure(spec: dict, delta: np.ndarray, fixed: FixedPoint, residuals: ResidualStore | None, job_id: str,
                  stats: np.ndarray | None = None, dp: bool = False) -> tuple[np.ndarray, Decoded]:
    """``(ring vector of k uint32, what it stands for)``; updates the residual when the codec uses feedback.

    ``dp`` (differential privacy: the clip bound is tight): the residual keeps only the coordinates the codec
    did not send, not what clipping cut (as ``edge_sdk/dp_clip.py``), or it would grow whenever updates are
    clipped."""
    delta = np.asarray(delta, dtype=np.float32)
    idx = round_indices(spec, delta.size)
    feedback = residuals is not None and codecs.uses_error_feedback(spec)
    corrected = residuals.apply(job_id, delta) if feedback else delta.copy()
    if stats is not None and stats.any():
        corrected[stats] = delta[stats]
    encoded = fixed.encode(corrected[idx])
    sent = Decoded(idx, fixed.decode_one(encoded).astype(np.float32))
    if feedback:
        residuals.update(job_id, corrected, Decoded(idx, corrected[idx]) if dp else sent)
    return encoded, sent
