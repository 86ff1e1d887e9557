"""The batched optimal 1-D k-means kernel against an O(k n^2) oracle and Lloyd."""

import numpy as np
import pytest
import torch

from wclust.core.exact import brute_force_kmeans_1d, optimal_kmeans_1d
from wclust.core.kmeans import INITS, init_centroids, lloyd_sorted


def _oracle(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Optimal weighted SSE by the plain O(k n^2) DP, vectorized over j (any order)."""
    keep = w > 0
    x, w = x[keep], w[keep]
    if len(x) == 0:
        return 0.0
    o = np.argsort(x, kind="stable")
    x, w = x[o], w[o]
    n = len(x)
    p0 = np.concatenate([[0.0], np.cumsum(w)])
    p1 = np.concatenate([[0.0], np.cumsum(w * x)])
    p2 = np.concatenate([[0.0], np.cumsum(w * x * x)])
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    s0 = p0[i + 1] - p0[j]
    s1 = p1[i + 1] - p1[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(j <= i, np.maximum(p2[i + 1] - p2[j] - s1 * s1 / s0, 0.0), np.inf)
        cost = np.where((j <= i) & (s0 <= 0), 0.0, cost)  # equal values merged: zero cost
    d = cost[:, 0].copy()  # one cluster over 0..i
    for _ in range(1, min(k, n)):
        prev = np.concatenate([[np.inf], d[:-1]])  # prev[j] = d[j-1]
        d = np.min(prev[None, :] + cost, axis=1)
    return float(d[-1])


def _sse(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
    """Weighted SSE of x against its nearest centroid in ascending ``c``."""
    mids = 0.5 * (c[1:] + c[:-1])
    return float((w * (x - c[np.searchsorted(mids, x)]) ** 2).sum())


def _total_ss(x: np.ndarray, w: np.ndarray) -> float:
    if w.sum() <= 0:
        return 0.0
    return float((w * (x - (w * x).sum() / w.sum()) ** 2).sum())


def _random_batch(rng, m: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of length m with duplicates, ties, outliers, zero and uneven weights."""
    x = np.empty((rows, m))
    w = np.empty((rows, m))
    for r in range(rows):
        kind = r % 6
        if kind == 0:
            v = np.round(rng.standard_normal(m), 1)  # many duplicates
        elif kind == 1:
            v = rng.standard_normal(m)
        elif kind == 2:
            v = rng.integers(0, 4, m).astype(float)  # heavy ties
        elif kind == 3:
            v = rng.standard_normal(m)
            v[: max(1, m // 8)] *= 25.0  # outliers
        elif kind == 4:
            v = rng.laplace(size=m) ** 3
        else:
            v = np.round(rng.standard_normal(m) * 1e3) * 1e-3 + 7.0  # offset, grid
        wk = (r // 6) % 4
        if wk == 0:
            u = np.ones(m)
        elif wk == 1:
            u = rng.random(m) * (rng.random(m) > 0.25)  # some zero weights
        elif wk == 2:
            u = rng.integers(0, 4, m).astype(float)
        else:
            u = np.full(m, 0.3)
        x[r], w[r] = v, u
    return x, w


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 21, 34, 55])
def test_matches_oracle_on_many_small_weighted_rows(m):
    # k >= 8 takes the Lagrangian path first, smaller k the layered DP only.
    rng = np.random.default_rng(m)
    x, w = _random_batch(rng, m, 240)
    for k in (1, 2, 3, 4, 7, 8, 12):
        cents, reduced = optimal_kmeans_1d(x, w, k)
        assert cents.shape == (len(x), k) and not reduced.any()
        assert np.all(np.diff(cents, axis=1) >= 0)
        for r in range(len(x)):
            live = w[r] > 0
            if not live.any():
                assert np.all(cents[r] == 0.0)
                continue
            best = _oracle(x[r], w[r], k)
            got = _sse(x[r][live], w[r][live], cents[r])
            tol = 1e-9 * _total_ss(x[r], w[r]) + 1e-12
            assert got <= best + tol, (m, k, r, got, best)


def test_ties_between_cluster_counts():
    # Evenly spaced points: many partitions cost the same and the cost is not
    # strictly convex in k, so the Lagrangian search can miss k; the DP then answers.
    rows = [np.arange(n, dtype=float) for n in (9, 16, 17, 24, 32, 40)]
    rows += [np.repeat(np.arange(6.0), 5), np.concatenate([np.arange(10.0), np.arange(10.0)])]
    for x in rows:
        w = np.ones_like(x)
        for k in (8, 9, 10, 12):
            cents, _ = optimal_kmeans_1d(x[None], w[None], k)
            got = _sse(x, w, cents[0])
            assert got <= _oracle(x, w, k) + 1e-9 * _total_ss(x, w) + 1e-12, (len(x), k)


def test_oracle_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 15))
        k = int(rng.integers(1, 6))
        x = np.sort(np.round(rng.standard_normal(n), 1))
        w = rng.random(n)
        assert _oracle(x, w, k) == pytest.approx(
            brute_force_kmeans_1d(x, w, k), rel=1e-9, abs=1e-12
        )


@pytest.mark.parametrize("m", [600, 2000])
def test_long_rows_match_oracle(m):
    # Long rows take the radix-sort path; include -0.0/0.0 and repeated values.
    rng = np.random.default_rng(m)
    x, w = _random_batch(rng, m, 6)
    x[1, : m // 3] = -0.0
    x[1, m // 3 : m // 2] = 0.0
    for k in (2, 5, 9):
        cents, _ = optimal_kmeans_1d(x, w, k)
        for r in range(len(x)):
            live = w[r] > 0
            best = _oracle(x[r], w[r], k)
            got = _sse(x[r][live], w[r][live], cents[r])
            assert got <= best + 1e-9 * _total_ss(x[r], w[r]) + 1e-12, (m, k, r)


@pytest.mark.parametrize("k", [16, 64])
def test_exact_never_worse_than_lloyd(k):
    g = torch.Generator().manual_seed(k)
    n = 3000
    rows = torch.stack(
        [
            torch.randn(n, generator=g, dtype=torch.float64),
            torch.cat(
                [torch.randn(n - 30, generator=g), 8 * torch.randn(30, generator=g)]
            ).double(),
            torch.distributions.Laplace(0.0, 1.0).sample((n,)).double() ** 3,
            torch.randint(0, 40, (n,), generator=g).double(),
        ]
    )
    w = torch.rand(rows.shape, generator=g, dtype=torch.float64)
    w[:, ::7] = 0
    xs, order = rows.sort(1)
    ws = w.gather(1, order)
    cents, _ = optimal_kmeans_1d(rows.numpy(), w.numpy(), k)
    for init in INITS:
        km = lloyd_sorted(xs, ws, init_centroids(xs, ws, k, init, g)).numpy()
        for r in range(len(rows)):
            ex = _sse(xs[r].numpy(), ws[r].numpy(), cents[r])
            ll = _sse(xs[r].numpy(), ws[r].numpy(), np.sort(km[r]))
            assert ex <= ll * (1 + 1e-12) + 1e-12, (init, r, ex, ll)


def test_k_at_least_n_keeps_every_point():
    x = np.array([[3.0, 1.0, 2.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0, 4.0]])
    w = np.ones_like(x)
    cents, _ = optimal_kmeans_1d(x, w, 6)
    assert cents[0].tolist() == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert cents[1].tolist() == [4.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    cents, _ = optimal_kmeans_1d(x, w, 3)  # k == distinct values
    assert cents[0].tolist() == [1.0, 2.0, 3.0]


def test_constant_rows():
    x = np.full((3, 700), -2.5)
    w = np.ones_like(x)
    w[1] = np.linspace(0, 1, 700)
    for k in (1, 2, 16):
        cents, _ = optimal_kmeans_1d(x, w, k)
        assert np.all(cents == -2.5)


def test_zero_weight_points_and_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50))
    w = np.ones_like(x)
    w[0] = 0.0  # no weight at all: zeros
    w[1, 25:] = 0.0  # only the first half counts
    x[1, 25:] = 1e6  # ... so these far values must not pull any centroid
    cents, _ = optimal_kmeans_1d(x, w, 4)
    assert np.all(cents[0] == 0.0)
    assert cents[1].max() < 10.0
    ref, _ = optimal_kmeans_1d(x[1:2, :25], w[1:2, :25], 4)
    np.testing.assert_allclose(cents[1], ref[0], rtol=1e-12, atol=1e-12)


def test_single_cluster_is_weighted_mean():
    x = np.array([[0.0, 1.0, 2.0, 10.0]])
    w = np.array([[1.0, 1.0, 1.0, 5.0]])
    cents, _ = optimal_kmeans_1d(x, w, 1)
    assert cents[0, 0] == pytest.approx(53.0 / 8.0)


def test_max_points_reduction_is_flagged():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1000))
    w = np.ones_like(x)
    cents, reduced = optimal_kmeans_1d(x, w, 8, max_points=100)
    assert reduced.tolist() == [True, True]
    full, _ = optimal_kmeans_1d(x, w, 8)
    for r in range(2):
        # optimal for 100 run means only: close to, never better than, the optimum
        a, b = _sse(x[r], w[r], cents[r]), _sse(x[r], w[r], full[r])
        assert b <= a * (1 + 1e-12) and a < 1.05 * b


def test_argsort_f32_orders_like_the_floats_and_keeps_ties_in_order():
    from wclust.core.kmeans import argsort_f32

    special = torch.tensor([0.0, 1.0, -1.0, 3e-39, -3e-39, float("inf"), -float("inf"), 2.0, -2.0])
    x = torch.cat([torch.randn(5000), special, torch.randint(-3, 3, (2000,)).float()])
    order = argsort_f32(x)
    assert torch.equal(x[order], x.sort().values)
    # equal values keep their original order (what a stable sort gives)
    ties = torch.randint(-3, 3, (3000,)).float()
    assert torch.equal(argsort_f32(ties), torch.sort(ties, stable=True).indices)
