"""Globally optimal weighted 1-D k-means, batched over many codebooks.

In one dimension the optimal clusters are contiguous runs of the sorted values, so
k-means is a dynamic program over sorted points (Wu 1991):

    D[m][i] = min_{j <= i} D[m-1][j-1] + cost(j, i)

where ``cost(j, i)`` is the weighted within-cluster sum of squares of points ``j..i``,
O(1) from prefix sums of w, w*x and w*x^2. The cost is a Monge array, so the optimal
``j`` is monotone in ``i`` and each layer is solved by divide and conquer in
O(n log n) (Grønlund et al. 2017), giving O(k n log n) per codebook. Codebooks are
independent: numba runs them in parallel (``prange``), no Python loop.

Points are given as a ragged batch (CSR): sorted unique values, their weights, and
row offsets. Collapsing duplicate values into weighted points (done by the caller)
keeps ``n`` small for fp16/bf16 weights.
"""

from __future__ import annotations

import numpy as np

__all__ = ["optimal_kmeans_1d", "brute_force_kmeans_1d"]

_KERNEL = None


def _build_kernel():
    import numba as nb

    @nb.njit(cache=True, fastmath=False, inline="always")
    def _cost(p0, p1, p2, j, i):
        w = p0[i + 1] - p0[j]
        if w <= 0.0:
            return 0.0
        s = p1[i + 1] - p1[j]
        c = (p2[i + 1] - p2[j]) - s * s / w
        return c if c > 0.0 else 0.0

    @nb.njit(cache=True)
    def _solve_row(x, w, k, out_c):
        n = x.shape[0]
        if n <= k:
            for t in range(n):
                out_c[t] = x[t]
            for t in range(n, k):
                out_c[t] = x[n - 1]
            return
        # Center values before the prefix sums: less cancellation in s2 - s1^2/s0.
        tot = 0.0
        mean = 0.0
        for t in range(n):
            tot += w[t]
            mean += w[t] * x[t]
        mean = mean / tot if tot > 0.0 else 0.0
        p0 = np.zeros(n + 1)
        p1 = np.zeros(n + 1)
        p2 = np.zeros(n + 1)
        for t in range(n):
            y = x[t] - mean
            p0[t + 1] = p0[t] + w[t]
            p1[t + 1] = p1[t] + w[t] * y
            p2[t + 1] = p2[t] + w[t] * y * y
        prev = np.empty(n)
        cur = np.empty(n)
        for i in range(n):
            prev[i] = _cost(p0, p1, p2, 0, i)
        arg = np.zeros((k, n), dtype=np.int32)
        stack = np.empty((256, 4), dtype=np.int64)
        for m in range(1, k):
            # Layer m: D[m][i] for i in [m, n-1]; the last layer only needs i = n-1.
            lo0 = m if m < k - 1 else n - 1
            sp = 0
            stack[0, 0] = lo0
            stack[0, 1] = n - 1
            stack[0, 2] = m
            stack[0, 3] = n - 1
            sp = 1
            while sp > 0:
                sp -= 1
                lo = stack[sp, 0]
                hi = stack[sp, 1]
                olo = stack[sp, 2]
                ohi = stack[sp, 3]
                mid = (lo + hi) // 2
                best = np.inf
                # opt_m(i) >= opt_{m-1}(i) (monotone in m as well as in i).
                start = olo
                if m > 1 and arg[m - 1, mid] > start:
                    start = arg[m - 1, mid]
                bj = start
                top = mid if mid < ohi else ohi
                for j in range(start, top + 1):
                    v = prev[j - 1] + _cost(p0, p1, p2, j, mid)
                    if v < best:
                        best = v
                        bj = j
                cur[mid] = best
                arg[m, mid] = bj
                if lo <= mid - 1:
                    stack[sp, 0] = lo
                    stack[sp, 1] = mid - 1
                    stack[sp, 2] = olo
                    stack[sp, 3] = bj
                    sp += 1
                if mid + 1 <= hi:
                    stack[sp, 0] = mid + 1
                    stack[sp, 1] = hi
                    stack[sp, 2] = bj
                    stack[sp, 3] = ohi
                    sp += 1
            tmp = prev
            prev = cur
            cur = tmp
        # Backtrack cluster boundaries, then weighted means.
        i = n - 1
        for m in range(k - 1, -1, -1):
            j = arg[m, i] if m > 0 else 0
            sw = p0[i + 1] - p0[j]
            if sw > 0.0:
                out_c[m] = (p1[i + 1] - p1[j]) / sw + mean
            else:  # zero-weight run: any value inside it is optimal
                out_c[m] = 0.5 * (x[j] + x[i])
            i = j - 1

    @nb.njit(parallel=True, cache=True)
    def _solve_rows(rows, w, k, max_points, out, reduced):
        for r in nb.prange(rows.shape[0]):
            order = np.argsort(rows[r], kind="mergesort")
            m = rows.shape[1]
            ux = np.empty(m)
            uw = np.empty(m)
            n = 0
            for t in range(m):  # merge equal values, drop zero-weight points
                v = rows[r, order[t]]
                wt = w[r, order[t]]
                if wt <= 0.0:
                    continue
                if n > 0 and ux[n - 1] == v:
                    uw[n - 1] += wt
                else:
                    ux[n] = v
                    uw[n] = wt
                    n += 1
            if n == 0:
                out[r, :] = 0.0
                continue
            if n > max_points:  # equal-count runs, each a weighted point
                reduced[r] = True
                for s in range(max_points):
                    a = (s * n) // max_points
                    b = ((s + 1) * n) // max_points
                    sw = 0.0
                    sx = 0.0
                    for t in range(a, b):
                        sw += uw[t]
                        sx += uw[t] * ux[t]
                    ux[s] = sx / sw
                    uw[s] = sw
                n = max_points
            _solve_row(ux[:n], uw[:n], k, out[r])

    return _solve_rows


def optimal_kmeans_1d(
    rows: np.ndarray, weights: np.ndarray, k: int, max_points: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted 1-D k-means centroids for a batch of codebooks.

    Each row is sorted, equal values are merged into one weighted point and
    zero-weight points are dropped, then the DP runs on what remains.

    Args:
        rows: (B, m) float64 values, one codebook per row, any order.
        weights: (B, m) float64 non-negative weights.
        k: clusters per codebook.
        max_points: a row with more distinct points is first reduced to this many
            equal-count runs (each its weighted mean), so its result is optimal for
            the reduced points only; such rows are flagged.

    Returns:
        ((B, k) float64 centroids ascending, (B,) bool flags of reduced rows). A row
        with fewer than ``k`` points gets its points followed by copies of its
        largest point; a row with no positive weight gets zeros.
    """
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    b = rows.shape[0]
    out = np.empty((b, k), dtype=np.float64)
    reduced = np.zeros(b, dtype=np.bool_)
    _KERNEL(
        np.ascontiguousarray(rows, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        int(k),
        int(max_points),
        out,
        reduced,
    )
    return out, reduced


def brute_force_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Optimal weighted SSE by O(k n^2) dynamic programming: the test oracle.

    Args:
        x: (n,) values, sorted ascending.
        w: (n,) non-negative weights.
        k: clusters.

    Returns:
        The minimal weighted sum of squared errors.
    """
    n = len(x)
    p0 = np.concatenate([[0.0], np.cumsum(w)])
    p1 = np.concatenate([[0.0], np.cumsum(w * x)])
    p2 = np.concatenate([[0.0], np.cumsum(w * x * x)])

    def cost(j: int, i: int) -> float:
        s0 = p0[i + 1] - p0[j]
        if s0 <= 0:
            return 0.0
        s1 = p1[i + 1] - p1[j]
        return max(p2[i + 1] - p2[j] - s1 * s1 / s0, 0.0)

    k = min(k, n)
    d = [cost(0, i) for i in range(n)]
    for _ in range(1, k):
        d = [
            min((d[j - 1] + cost(j, i) for j in range(1, i + 1)), default=np.inf)
            if i > 0
            else np.inf
            for i in range(n)
        ]
    return float(d[n - 1])
