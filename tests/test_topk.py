"""Fast top-k selection: the same indices as a full sort, whichever path (sampled threshold or full) runs."""
from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.protocol import codecs, topk


def reference(mag: np.ndarray, k: int) -> np.ndarray:
    """k largest by magnitude, ties to the lowest index, sorted: by full sort."""
    order = np.lexsort((np.arange(mag.size), -mag))
    return np.sort(order[:k]).astype(np.int64)


def layered(rng: np.random.Generator, n: int) -> np.ndarray:
    """Like a real update: tensors whose scales differ by orders of magnitude."""
    sizes = rng.integers(50, 20_000, size=200)
    sizes = sizes[np.cumsum(sizes) <= n]
    parts = [rng.standard_normal(s).astype(np.float32) * np.float32(10.0 ** rng.uniform(-5, 0)) for s in sizes]
    parts.append(np.zeros(n - int(sizes.sum()), np.float32))
    return np.concatenate(parts)


@pytest.mark.parametrize("k_frac", [1e-4, 0.003, 0.01, 0.1, 0.3])
@pytest.mark.parametrize("kind", ["normal", "layered", "heavy_tail"])
def test_matches_full_sort(kind: str, k_frac: float) -> None:
    rng = np.random.default_rng(7)
    n = 300_001
    vec = {"normal": lambda: rng.standard_normal(n).astype(np.float32),
           "layered": lambda: layered(rng, n),
           "heavy_tail": lambda: rng.standard_cauchy(n).astype(np.float32)}[kind]()
    mag = np.abs(vec)
    k = max(1, int(k_frac * n))
    got = topk.top_k_indices(mag, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, reference(mag, k))


def test_sampled_threshold_is_used_on_large_vectors() -> None:
    mag = np.abs(np.random.default_rng(0).standard_normal(1_500_000).astype(np.float32))
    k = 15_000
    cand = topk._candidates(mag, k)
    assert cand is not None and k <= cand.size < 3 * k  # the fast path really narrows the work
    assert set(reference(mag, k)) <= set(cand.tolist())


def test_unlucky_sample_falls_back_to_full_partition() -> None:
    """Every sampled coordinate larger than the rest, but fewer of them than k: the threshold then passes
    too few coordinates, so the full partition must run and still return the exact answer."""
    n, k = 1 << 18, 20_000
    mag = np.abs(np.random.default_rng(1).standard_normal(n).astype(np.float32))
    stride = n // topk.SAMPLE
    mag[stride // 2::stride] = 10.0
    assert topk._candidates(mag, k) is None
    np.testing.assert_array_equal(topk.top_k_indices(mag, k), reference(mag, k))


def test_ties_and_zeros_go_to_lowest_indices() -> None:
    n = 200_000
    mag = np.zeros(n, np.float32)
    mag[::1000] = 1.0  # 200 ones, the rest zeros (a frozen backbone's exactly-zero deltas)
    for k in (50, 200, 1000):
        np.testing.assert_array_equal(topk.top_k_indices(mag, k), reference(mag, k))


def test_edges() -> None:
    mag = np.array([0.5, 2.0, 1.0], np.float32)
    assert topk.top_k_indices(mag, 0).size == 0
    np.testing.assert_array_equal(topk.top_k_indices(mag, 3), [0, 1, 2])
    np.testing.assert_array_equal(topk.top_k_indices(mag, 5), [0, 1, 2])
    np.testing.assert_array_equal(topk.top_k_indices(mag, 2), [1, 2])


def test_codec_sends_the_largest_coordinates() -> None:
    rng = np.random.default_rng(3)
    sizes = [100_000, 250_000, 50_000]
    vec = layered(rng, sum(sizes))
    for scope in ("global", "per_tensor"):
        spec = {"name": "topk", "density": 0.01, "scope": scope}
        _, sent = codecs.encode(spec, vec, sizes)
        if scope == "global":
            expected = reference(np.abs(vec), sent.indices.size)
        else:
            offs = np.cumsum([0] + sizes)
            expected = np.concatenate([reference(np.abs(vec[a:b]), codecs._k_of(0.01, b - a)) + a
                                       for a, b in zip(offs[:-1], offs[1:])])
        np.testing.assert_array_equal(sent.indices, expected)
        np.testing.assert_array_equal(sent.values, vec[expected])
