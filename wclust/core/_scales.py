"""The inner loop of ``quantizers.fit_scales`` (numba; compress time only)."""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def grid_errors(rows, w, table, mids, cand):
    """(groups, n) sum over each group of ``w * (table[c] * s - x)**2`` with ``c`` the
    nearest entry of ``table`` to ``x / s`` (the count of ``mids`` below it, as
    ``torch.searchsorted``), for every candidate scale ``s = cand[g, j]``."""
    n_groups, gs = rows.shape
    n_cand = cand.shape[1]
    k1 = mids.shape[0]
    out = np.empty((n_groups, n_cand), dtype=np.float64)
    for g in nb.prange(n_groups):
        for j in range(n_cand):
            s = cand[g, j]
            e = 0.0
            for i in range(gs):
                x = rows[g, i]
                v = x / s
                lo, hi = 0, k1
                while lo < hi:  # first mid >= v
                    mid = (lo + hi) >> 1
                    if mids[mid] < v:
                        lo = mid + 1
                    else:
                        hi = mid
                d = table[lo] * s - x
                e += d * d * w[g, i]
            out[g, j] = e
    return out
