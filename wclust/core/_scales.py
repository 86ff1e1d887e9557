"""The inner loop of ``quantizers.fit_scales`` (numba; compress time only)."""

from __future__ import annotations

import numba as nb
import numpy as np

# buckets per table entry in the code lookup: few enough to stay in cache, enough
# that the exact count starting from a bucket's count takes about one step
_BUCKETS_PER_CODE = 16


@nb.njit(parallel=True, cache=True)
def grid_errors(rows, w, table, mids, cand):
    """(groups, n) sum over each group of ``w * (table[c] * s - x)**2`` with ``c`` the
    nearest entry of ``table`` to ``x / s`` (the count of ``mids`` below it, as
    ``torch.searchsorted``), for every candidate scale ``s = cand[g, j]``.

    The count is looked up in uniform buckets over ``[mids[0], mids[-1]]`` (the
    count below each bucket's lower edge), then stepped to the exact count: the same
    codes as a binary search, without its unpredictable branches."""
    n_groups, gs = rows.shape
    n_cand = cand.shape[1]
    k1 = mids.shape[0]
    out = np.empty((n_groups, n_cand), dtype=np.float64)
    lo = mids[0]
    span = mids[k1 - 1] - lo if k1 else 0.0
    n_b = max(1, _BUCKETS_PER_CODE * k1)
    inv = n_b / span if span > 0 else 0.0
    start = np.empty(n_b, dtype=np.int64)
    c = 0
    for b in range(n_b):
        edge = lo + b / inv if inv > 0 else lo
        while c < k1 and mids[c] < edge:
            c += 1
        start[b] = c
    for g in nb.prange(n_groups):
        for j in range(n_cand):
            s = cand[g, j]
            e = 0.0
            for i in range(gs):
                x = rows[g, i]
                v = x / s
                if k1 == 0 or v <= lo:
                    code = 0
                elif v > mids[k1 - 1]:
                    code = k1
                else:
                    b = int((v - lo) * inv)
                    b = min(max(b, 0), n_b - 1)
                    code = start[b]
                    while code < k1 and mids[code] < v:
                        code += 1
                    while code > 0 and mids[code - 1] >= v:
                        code -= 1
                d = table[code] * s - x
                e += d * d * w[g, i]
            out[g, j] = e
    return out
