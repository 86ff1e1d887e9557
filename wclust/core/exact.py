"""Globally optimal weighted 1-D k-means, batched over many codebooks.

In one dimension the optimal clusters are contiguous runs of the sorted values, so
k-means is a dynamic program over sorted points (Wu 1991):

    D[m][i] = min_{j <= i} D[m-1][j-1] + cost(j, i)

where ``cost(j, i)`` is the weighted within-cluster sum of squares of points ``j..i``,
O(1) from prefix sums of w, w*x and w*x^2. The cost is a Monge array, so the optimal
``j`` is monotone in ``i`` (and in ``m``) and each layer is solved by divide and
conquer in O(n log n) (Grønlund et al. 2017), O(k n log n) per codebook. Each row is
solved as follows, all without giving up optimality:

1. Upper bound. A cheap k-partition (companding start, a few Lloyd steps) gives
   ``UB >= OPT`` and brackets the Lagrange multiplier of k clusters.
2. Lagrangian relaxation of the cluster count (the "Aliens trick"). For a penalty
   lam per cluster, min over partitions with any number of clusters of
   SS + lam * clusters is a least-weight subsequence problem with a Monge cost,
   solved in O(n log n) whatever k (a deque of candidate cluster starts). Because
   OPT_k is convex in k, an optimal penalized partition with exactly k clusters is
   an optimal k-partition. A few values of lam (interpolated in log-log) usually
   hit k; typically 1-3 solves for k = 16, 3-8 for k = 256.
3. Otherwise (ties between cluster counts, or no hit), the layered DP, met in the
   middle: the first ``k//2`` clusters left to right, the rest right to left on
   the reversed points, joined at the best split. ``D[m][i]`` is nondecreasing in
   ``i`` and a state with ``D > UB`` lies on no optimal path, so each layer stops
   at the first such state: about two thirds of all states are never computed.
   Divide and conquer runs breadth-first (no stack): at stride ``h`` each state is
   bounded by its neighbours at ``+-h`` and by the previous layer; wide candidate
   ranges are scanned with SIMD (``error_model="numpy"``: no zero check on
   division).

Rows are sorted with a radix sort (11-bit digits, trivial passes skipped) and
duplicate values merged into weighted points, which keeps ``n`` small for fp16/bf16
weights. Codebooks are independent: numba runs chunks of rows in parallel
(``prange``), one workspace per chunk.
"""

from __future__ import annotations

import numpy as np

__all__ = ["optimal_kmeans_1d", "brute_force_kmeans_1d"]

_KERNEL = None
# Candidate ranges at least this long are scanned with a vectorized loop.
_WIDE = 48
# Rows at least this long are sorted with the radix sort.
_RADIX_MIN = 512
# Lloyd steps for the upper bound.
_UB_ITERS = 12
# Penalized (Lagrangian) solves tried before the layered DP, from this many clusters.
_ALIENS_TRIES = 12
_ALIENS_MIN_K = 8


def _build_kernel():
    # The kernels are module globals, not closure cells: numba keys its on-disk cache
    # on pickled closure contents, and a dispatcher pickles differently in every
    # process, so closures over other kernels would recompile on every import.
    global _scan, _scan_wide, _half, _prefix, _upper_bound, _solve_row, _lws
    global _lambda_range, _aliens
    global _radix_sort, _prepare, _reduce, _solve_rows, _prange
    import numba as nb

    _prange = nb.prange
    nj = dict(cache=True, error_model="numpy")

    @nb.njit(inline="always", **nj)
    def _scan(q, p0, p1, big0, big1, s, e):
        # argmin over j in [s, e] of q[j] - (big1 - p1[j])^2 / (big0 - p0[j])
        best = np.inf
        bj = s
        for j in range(s, e + 1):
            a = big1 - p1[j]
            v = q[j] - a * a / (big0 - p0[j])
            if v < best:
                best = v
                bj = j
        return best, bj

    @nb.njit(**nj)
    def _scan_wide(q, p0, p1, big0, big1, s, e, buf):
        n = e - s + 1
        qq = q[s : e + 1]
        a0 = p0[s : e + 1]
        a1 = p1[s : e + 1]
        for t in range(n):  # branch-free, zero-based: vectorizes
            a = big1 - a1[t]
            buf[t] = qq[t] - a * a / (big0 - a0[t])
        m0 = m1 = m2 = m3 = np.inf
        n4 = n & ~3
        for t in range(0, n4, 4):
            m0 = min(m0, buf[t])
            m1 = min(m1, buf[t + 1])
            m2 = min(m2, buf[t + 2])
            m3 = min(m3, buf[t + 3])
        for t in range(n4, n):
            m0 = min(m0, buf[t])
        best = min(min(m0, m1), min(m2, m3))
        for t in range(n):
            if buf[t] == best:
                return best, s + t
        return best, s

    @nb.njit(**nj)
    def _half(p0, p1, p2, n, n_layers, room, ub, arg, cur, q, buf):
        """Layers 0..n_layers-1 of the DP over prefixes of points 0..n-1.

        Layer m holds D[m][i], the optimal cost of points 0..i in m+1 clusters, for
        ``m <= i < cut``; ``room`` points are left for the other half. States past the
        first one with D > ``ub`` are skipped (+inf): D is nondecreasing in i. A
        computed state whose true cost is <= ``ub`` is exact, because its optimal
        predecessor costs no more and so was computed too. ``arg[m, i]`` is the
        first point of cluster m. On return ``cur`` holds the last layer; returns its
        cut (exclusive).
        """
        cut = n - room - (n_layers - 1)
        for i in range(n):
            cur[i] = np.inf
        for i in range(cut):
            s = p1[i + 1]
            v = p2[i + 1] - s * s / p0[i + 1]
            if v > ub:
                cut = i
                break
            cur[i] = v
            arg[0, i] = 0
        for m in range(1, n_layers):
            if cut <= m - 1:  # previous layer empty: nothing reachable
                for i in range(n):
                    cur[i] = np.inf
                return m
            # Cluster m is j..i; j-1 must be a live state of layer m-1.
            jmax = cut if cut < n - 1 else n - 1
            for j in range(m, jmax + 1):
                q[j] = cur[j - 1] - p2[j]
            ap = arg[m - 1]
            am = arg[m]
            lb_tail = ap[cut - 1]
            lim = n - room - (n_layers - 1 - m)
            count = lim - m
            new_cut = lim
            h = 1
            while h * 2 <= count:
                h *= 2
            # Breadth-first divide and conquer: at stride h, states i = m + t - 1 with
            # t an odd multiple of h; the argmins at i-h and i+h are known and bound
            # this one (monotone in i), as does layer m-1 (monotone in m).
            while h >= 1:
                t = h
                while t <= count:
                    i = m + t - 1
                    if i >= new_cut:
                        break
                    s = am[i - h] if t > h else m
                    if m > 1:
                        b = ap[i] if i < cut else lb_tail
                        if b > s:
                            s = b
                    e = i if i < jmax else jmax
                    if t + h <= count and i + h <= new_cut:
                        b = am[i + h]
                        if b < e:
                            e = b
                    if e < s:
                        best = np.inf
                        bj = s
                    elif e - s >= _WIDE:
                        best, bj = _scan_wide(q, p0, p1, p0[i + 1], p1[i + 1], s, e, buf)
                    else:
                        best, bj = _scan(q, p0, p1, p0[i + 1], p1[i + 1], s, e)
                    v = best + p2[i + 1]
                    am[i] = bj
                    if v > ub:
                        new_cut = i
                        cur[i] = np.inf
                    else:
                        cur[i] = v
                    t += 2 * h
                h >>= 1
            for i in range(new_cut, n):
                cur[i] = np.inf
            cut = new_cut
        return cut

    @nb.njit(**nj)
    def _prefix(x, w, mean, p0, p1, p2):
        # Values are centred first: less cancellation in s2 - s1^2/s0.
        p0[0] = 0.0
        p1[0] = 0.0
        p2[0] = 0.0
        for t in range(x.shape[0]):
            y = x[t] - mean
            p0[t + 1] = p0[t] + w[t]
            p1[t + 1] = p1[t] + w[t] * y
            p2[t + 1] = p2[t] + w[t] * y * y

    @nb.njit(**nj)
    def _upper_bound(x, p0, p1, p2, n, k, mean, bnd, cen):
        """Cost of some k-partition of the sorted points, so >= the optimum.

        Starts from the asymptotically optimal companding quantizer (cluster width
        ~ density^(-1/3), Panter-Dite; density from equal-count groups), then a few
        Lloyd steps.
        """
        n_groups = min(8 * k, n // 2)
        if n_groups < 1:
            n_groups = 1
        cum = np.empty(n_groups + 1)
        cum[0] = 0.0
        for g in range(n_groups):
            a = (g * n) // n_groups
            b = ((g + 1) * n) // n_groups
            width = (x[b] if b < n else x[n - 1]) - x[a]
            cum[g + 1] = cum[g] + (p0[b] - p0[a]) ** (1.0 / 3.0) * width ** (2.0 / 3.0)
        bnd[0] = 0
        g = 0
        for c in range(1, k):
            target = cum[n_groups] * c / k
            while g < n_groups - 1 and cum[g + 1] <= target:
                g += 1
            a = (g * n) // n_groups
            b = ((g + 1) * n) // n_groups
            span = cum[g + 1] - cum[g]
            f = (target - cum[g]) / span if span > 0.0 else 0.0
            t = a + int(f * (b - a) + 0.5)
            bnd[c] = min(max(t, bnd[c - 1]), n)
        bnd[k] = n
        best = np.inf
        for _it in range(_UB_ITERS):
            cost = 0.0
            for c in range(k):
                a = bnd[c]
                b = bnd[c + 1]
                if b > a:
                    sw = p0[b] - p0[a]
                    s1 = p1[b] - p1[a]
                    cost += (p2[b] - p2[a]) - s1 * s1 / sw
                    cen[c] = s1 / sw + mean
                else:
                    cen[c] = cen[c - 1] if c > 0 else x[0]
            best = min(best, cost)
            changed = False
            for c in range(1, k):
                t = bnd[c]
                if cen[c] > cen[c - 1]:
                    t = np.searchsorted(x, 0.5 * (cen[c - 1] + cen[c]))
                t = max(t, bnd[c - 1])
                if t != bnd[c]:
                    changed = True
                    bnd[c] = t
            if not changed:
                break
        return best

    @nb.njit(**nj)
    def _lws(p0, p1, p2, n, lam, f, arg, cnt, cand, start):
        """Penalized problem: f[i] = min over partitions of points 0..i, any number of
        clusters, of SS + lam * clusters. Returns the cluster count at n-1.

        Least-weight subsequence with a Monge cost: a deque of candidate starts, each
        best on an interval of i; a newer start, once better, stays better, so it
        pops dominated tails and finds where it takes over by galloping + bisection.
        ``arg[i]`` is the start of the last cluster of 0..i.
        """
        head = 0
        tail = 0
        guess = -1
        for i in range(n):
            qj = (f[i - 1] if i > 0 else 0.0) + lam - p2[i]
            while tail > head:  # the new start i beats the tail on its whole interval?
                c = cand[tail - 1]
                x = max(start[tail - 1], i)
                qc = (f[c - 1] if c > 0 else 0.0) + lam - p2[c]
                a = p1[x + 1] - p1[i]
                vj = qj - a * a / (p0[x + 1] - p0[i])
                a = p1[x + 1] - p1[c]
                vc = qc - a * a / (p0[x + 1] - p0[c])
                if vj <= vc:
                    tail -= 1
                else:
                    break
            if tail == head:
                cand[tail] = i
                start[tail] = i
                tail += 1
            else:
                c = cand[tail - 1]
                qc = (f[c - 1] if c > 0 else 0.0) + lam - p2[c]
                lo = max(start[tail - 1], i)  # i loses to c at lo
                hi = -1
                # Where i takes over moves little from one i to the next: probe the
                # last takeover point first, then gallop away from it.
                g = guess + 1
                if lo < g <= n - 1:
                    a = p1[g + 1] - p1[i]
                    vj = qj - a * a / (p0[g + 1] - p0[i])
                    a = p1[g + 1] - p1[c]
                    vc = qc - a * a / (p0[g + 1] - p0[c])
                    if vj <= vc:
                        hi = g
                        step = 1
                        while hi - step > lo:
                            x = hi - step
                            a = p1[x + 1] - p1[i]
                            vj = qj - a * a / (p0[x + 1] - p0[i])
                            a = p1[x + 1] - p1[c]
                            vc = qc - a * a / (p0[x + 1] - p0[c])
                            if vj <= vc:
                                hi = x
                                step *= 2
                            else:
                                lo = x
                                break
                    else:
                        lo = g
                if hi < 0:
                    step = 1
                    while True:
                        x = min(lo + step, n - 1)
                        a = p1[x + 1] - p1[i]
                        vj = qj - a * a / (p0[x + 1] - p0[i])
                        a = p1[x + 1] - p1[c]
                        vc = qc - a * a / (p0[x + 1] - p0[c])
                        if vj <= vc:
                            hi = x
                            break
                        if x == n - 1:
                            break
                        lo = x
                        step *= 2
                if hi >= 0:
                    while hi - lo > 1:
                        x = (lo + hi) >> 1
                        a = p1[x + 1] - p1[i]
                        vj = qj - a * a / (p0[x + 1] - p0[i])
                        a = p1[x + 1] - p1[c]
                        vc = qc - a * a / (p0[x + 1] - p0[c])
                        if vj <= vc:
                            hi = x
                        else:
                            lo = x
                    cand[tail] = i
                    start[tail] = hi
                    tail += 1
                    guess = hi
            while tail - head > 1 and start[head + 1] <= i:
                head += 1
            c = cand[head]
            a = p1[i + 1] - p1[c]
            prev = f[c - 1] if c > 0 else 0.0
            f[i] = prev + lam + (p2[i + 1] - p2[c]) - a * a / (p0[i + 1] - p0[c])
            arg[i] = c
            cnt[i] = (cnt[c - 1] if c > 0 else 0) + 1
        return cnt[n - 1]

    @nb.njit(**nj)
    def _lambda_range(p0, p1, p2, k, bnd):
        """(largest 2-split gain, smallest merge cost) of a k-partition: for an
        optimal partition the Lagrange multiplier of k clusters lies in between."""
        split = 0.0
        merge = np.inf
        for c in range(k):
            a = bnd[c]
            b = bnd[c + 1]
            if b - a < 2:
                continue
            s1 = p1[b] - p1[a]
            whole = (p2[b] - p2[a]) - s1 * s1 / (p0[b] - p0[a])
            best = np.inf
            for t in range(a + 1, b):
                u = p1[t] - p1[a]
                v = p1[b] - p1[t]
                best = min(best, -u * u / (p0[t] - p0[a]) - v * v / (p0[b] - p0[t]))
            split = max(split, whole - ((p2[b] - p2[a]) + best))
        last = -1
        for c in range(k):
            if bnd[c + 1] == bnd[c]:
                continue
            if last >= 0:
                a0 = bnd[last]
                a1 = bnd[last + 1]
                b1 = bnd[c + 1]
                wa = p0[a1] - p0[a0]
                wb = p0[b1] - p0[a1]
                d = (p1[a1] - p1[a0]) / wa - (p1[b1] - p1[a1]) / wb
                merge = min(merge, wa * wb / (wa + wb) * d * d)
            last = c
        return split, merge

    @nb.njit(**nj)
    def _aliens(p0, p1, p2, n, k, bnd, f, arg, cnt, cand, start):
        """Try to solve k-means as the penalized problem whose optimum has exactly k
        clusters (then it is optimal for k: Lagrangian relaxation, the cost is convex
        in k). Returns True with the partition in ``arg`` on success."""
        lo, hi = _lambda_range(p0, p1, p2, k, bnd)
        if not (hi < np.inf) or hi <= 0.0:
            return False
        lam = np.sqrt(lo * hi) if lo > 0.0 else 0.5 * hi
        below = 0.0  # largest lam seen with more than k clusters
        above = np.inf  # smallest lam seen with fewer
        for _ in range(_ALIENS_TRIES):
            c = _lws(p0, p1, p2, n, lam, f, arg, cnt, cand, start)
            if c == k:
                return True
            if c > k:
                below = max(below, lam)
            else:
                above = min(above, lam)
            if below > 0.0 and above < np.inf:
                if above < below * (1.0 + 1e-4):
                    return False  # counts jump over k: a tie, left to the DP
                lam = np.sqrt(below * above)
            else:  # marginal cost ~ k^-3 for smooth densities
                r = (c / k) ** 3
                lam *= min(max(r, 0.125), 8.0)
        return False

    @nb.njit(**nj)
    def _solve_row(x, w, k, out_c, arg_f, arg_b, ws):
        n = x.shape[0]
        if n <= k:
            for t in range(n):
                out_c[t] = x[t]
            for t in range(n, k):
                out_c[t] = x[n - 1]
            return
        tot = 0.0
        mean = 0.0
        for t in range(n):
            tot += w[t]
            mean += w[t] * x[t]
        mean = mean / tot
        if k == 1:
            out_c[0] = mean
            return
        p0 = ws[0, : n + 1]
        p1 = ws[1, : n + 1]
        p2 = ws[2, : n + 1]
        r0 = ws[3, : n + 1]
        r1 = ws[4, : n + 1]
        r2 = ws[5, : n + 1]
        q = ws[6, : n + 1]
        buf = ws[7, : n + 1]
        cur_f = ws[8, : n + 1]
        cur_b = ws[9, : n + 1]
        _prefix(x, w, mean, p0, p1, p2)
        bnd = np.empty(k + 1, dtype=np.int64)
        cen = np.empty(k)
        ub = _upper_bound(x, p0, p1, p2, n, k, mean, bnd, cen)
        # Slack for rounding in the DP sums (the bound only prunes; larger is safe).
        ub = ub + 1e-9 * (ub + p2[n]) + 1e-300
        h = k // 2
        hb = k - h
        if k >= _ALIENS_MIN_K:
            f = q
            w_arg = arg_f[0]
            w_cnt = arg_f[1]
            w_cand = arg_f[2]
            w_start = arg_f[3]
            if _aliens(p0, p1, p2, n, k, bnd, f, w_arg, w_cnt, w_cand, w_start):
                i = n - 1
                for m in range(k - 1, -1, -1):
                    j = w_arg[i]
                    out_c[m] = (p1[i + 1] - p1[j]) / (p0[i + 1] - p0[j]) + mean
                    i = j - 1
                return
        _prefix(x[::-1], w[::-1], mean, r0, r1, r2)
        split = -1
        for _attempt in range(2):
            cf = _half(p0, p1, p2, n, h, hb, ub, arg_f, cur_f, q, buf)
            cb = _half(r0, r1, r2, n, hb, h, ub, arg_b, cur_b, q, buf)
            best = np.inf
            for i in range(h - 1, cf):  # clusters 0..h-1 end at i
                ib = n - 2 - i  # the other k-h clusters cover i+1..n-1
                if ib < hb - 1:
                    break
                if ib < cb:
                    v = cur_f[i] + cur_b[ib]
                    if v < best:
                        best = v
                        split = i
            if split >= 0:
                break
            ub = np.inf  # cannot happen in exact arithmetic; retry without pruning
        i = split
        for m in range(h - 1, -1, -1):
            j = arg_f[m, i] if m > 0 else 0
            out_c[m] = (p1[i + 1] - p1[j]) / (p0[i + 1] - p0[j]) + mean
            i = j - 1
        i = n - 2 - split  # reversed index: original points n-1-i .. n-1
        for r in range(hb - 1, -1, -1):
            j = arg_b[r, i] if r > 0 else 0
            out_c[k - 1 - r] = (r1[i + 1] - r1[j]) / (r0[i + 1] - r0[j]) + mean
            i = j - 1

    @nb.njit(**nj)
    def _radix_sort(row, wr, with_w, ux, uw, kt, kt2, hist):
        """Sort ``row`` ascending into ``ux`` (and ``wr`` along with it into ``uw``)."""
        m = row.shape[0]
        top = np.uint64(1) << np.uint64(63)
        mask = np.uint64(2047)
        u = row.view(np.uint64)
        for t in range(m):  # order-preserving map of float64 bits to uint64
            v = u[t]
            kt[t] = ~v if v & top else v | top
        hist[:] = 0
        for t in range(m):
            v = kt[t]
            for p in range(6):
                hist[p, (v >> np.uint64(11 * p)) & mask] += 1
        src = kt
        dst = kt2
        wsrc = uw
        wdst = ux
        in_ux = False  # where the sorted weights are
        if with_w:
            for t in range(m):
                uw[t] = wr[t]
        for p in range(6):
            sh = np.uint64(11 * p)
            hp = hist[p]
            if hp[(src[0] >> sh) & mask] == m:  # every key has this digit
                continue
            tot = 0
            for d in range(2048):
                c = hp[d]
                hp[d] = tot
                tot += c
            if with_w:
                for t in range(m):
                    v = src[t]
                    d = (v >> sh) & mask
                    pos = hp[d]
                    hp[d] = pos + 1
                    dst[pos] = v
                    wdst[pos] = wsrc[t]
                wsrc, wdst = wdst, wsrc
                in_ux = not in_ux
            else:
                for t in range(m):
                    v = src[t]
                    d = (v >> sh) & mask
                    pos = hp[d]
                    hp[d] = pos + 1
                    dst[pos] = v
            src, dst = dst, src
        if in_ux:
            for t in range(m):
                uw[t] = ux[t]
        out = ux.view(np.uint64)
        for t in range(m):
            v = src[t]
            out[t] = v ^ top if v & top else ~v

    @nb.njit(**nj)
    def _prepare(row, wr, ux, uw, kt, kt2, hist):
        """Sorted distinct values with positive total weight into ux/uw; returns n."""
        m = row.shape[0]
        if m == 0:
            return 0
        w0 = wr[0]
        uniform = w0 > 0.0
        for t in range(m):
            if wr[t] != w0:
                uniform = False
                break
        ascending = True
        for t in range(1, m):
            if row[t] < row[t - 1]:
                ascending = False
                break
        if ascending:
            ux[:m] = row
            if not uniform:
                uw[:m] = wr
        elif m >= _RADIX_MIN:
            _radix_sort(row, wr, not uniform, ux, uw, kt, kt2, hist)
        elif uniform:
            ux[:m] = np.sort(row)
        else:
            order = np.argsort(row)
            for t in range(m):
                uw[t] = wr[order[t]]
                ux[t] = row[order[t]]
        n = 0
        for t in range(m):  # merge equal values, drop zero weights (in place)
            v = ux[t]
            wt = w0 if uniform else uw[t]
            if wt <= 0.0:
                continue
            if n > 0 and ux[n - 1] == v:
                uw[n - 1] += wt
            else:
                ux[n] = v
                uw[n] = wt
                n += 1
        return n

    @nb.njit(**nj)
    def _reduce(ux, uw, n, n_runs):
        """Replace n sorted points by n_runs runs of consecutive points, in place.

        Half the runs are equal-count; then the run with the largest within-run sum
        of squares is split at its best 2-means cut, again and again, so sparse
        tails and outliers get runs of their own. Each run becomes its weighted mean.
        Returns n_runs.
        """
        mean = 0.0
        tot = 0.0
        for t in range(n):
            tot += uw[t]
            mean += uw[t] * ux[t]
        mean /= tot
        p0 = np.empty(n + 1)
        p1 = np.empty(n + 1)
        p2 = np.empty(n + 1)
        _prefix(ux[:n], uw[:n], mean, p0, p1, p2)
        ra = np.empty(n_runs, dtype=np.int64)  # run t is points ra[t] .. rb[t]-1
        rb = np.empty(n_runs, dtype=np.int64)
        key = np.empty(n_runs)  # max-heap of splittable runs by sum of squares
        hid = np.empty(n_runs, dtype=np.int64)
        size = 0
        n0 = max(n_runs // 2, 1)
        for t in range(n0):
            ra[t] = (t * n) // n0
            rb[t] = ((t + 1) * n) // n0
        count = n0
        for t in range(n0):
            if rb[t] - ra[t] > 1:
                a = ra[t]
                b = rb[t]
                s1 = p1[b] - p1[a]
                v = (p2[b] - p2[a]) - s1 * s1 / (p0[b] - p0[a])
                pos = size  # sift up
                size += 1
                while pos > 0 and key[(pos - 1) >> 1] < v:
                    key[pos] = key[(pos - 1) >> 1]
                    hid[pos] = hid[(pos - 1) >> 1]
                    pos = (pos - 1) >> 1
                key[pos] = v
                hid[pos] = t
        while count < n_runs and size > 0:
            t = hid[0]
            size -= 1  # pop: move the last entry down from the root
            v = key[size]
            u = hid[size]
            pos = 0
            while True:
                c = 2 * pos + 1
                if c >= size:
                    break
                if c + 1 < size and key[c + 1] > key[c]:
                    c += 1
                if key[c] <= v:
                    break
                key[pos] = key[c]
                hid[pos] = hid[c]
                pos = c
            if size > 0:
                key[pos] = v
                hid[pos] = u
            a = ra[t]
            b = rb[t]
            best = np.inf
            cut = a + 1
            for c in range(a + 1, b):
                s1 = p1[c] - p1[a]
                s2 = p1[b] - p1[c]
                v = -s1 * s1 / (p0[c] - p0[a]) - s2 * s2 / (p0[b] - p0[c])
                if v < best:
                    best = v
                    cut = c
            rb[t] = cut
            ra[count] = cut
            rb[count] = b
            for run in (t, count):
                a = ra[run]
                b = rb[run]
                if b - a > 1:
                    s1 = p1[b] - p1[a]
                    v = (p2[b] - p2[a]) - s1 * s1 / (p0[b] - p0[a])
                    pos = size
                    size += 1
                    while pos > 0 and key[(pos - 1) >> 1] < v:
                        key[pos] = key[(pos - 1) >> 1]
                        hid[pos] = hid[(pos - 1) >> 1]
                        pos = (pos - 1) >> 1
                    key[pos] = v
                    hid[pos] = run
            count += 1
        order = np.argsort(ra[:count])
        for s in range(count):
            a = ra[order[s]]
            b = rb[order[s]]
            sw = p0[b] - p0[a]
            ux[s] = (p1[b] - p1[a]) / sw + mean
            uw[s] = sw
        return count

    @nb.njit(parallel=True, **nj)
    def _solve_rows(rows, w, k, max_points, n_chunks, out, reduced):
        b, m = rows.shape
        cap = min(m, max_points)
        h = max(k // 2, 1)
        for c in _prange(n_chunks):
            ux = np.empty(m)
            uw = np.empty(m)
            kt = np.empty(m, dtype=np.uint64)
            kt2 = np.empty(m, dtype=np.uint64)
            hist = np.empty((6, 2048), dtype=np.int64)
            arg_f = np.empty((h, cap), dtype=np.int32)
            arg_b = np.empty((max(k - h, 1), cap), dtype=np.int32)
            ws = np.empty((10, cap + 1))
            for r in range((c * b) // n_chunks, ((c + 1) * b) // n_chunks):
                # one weight row for all: uniform weights, no (B, m) array of ones
                n = _prepare(rows[r], w[r if w.shape[0] > 1 else 0], ux, uw, kt, kt2, hist)
                if n == 0:
                    out[r, :] = 0.0
                    continue
                if n > max_points:
                    reduced[r] = True
                    n = _reduce(ux, uw, n, max_points)
                _solve_row(ux[:n], uw[:n], k, out[r], arg_f, arg_b, ws)

    return _solve_rows


def optimal_kmeans_1d(
    rows: np.ndarray, weights: np.ndarray | None, k: int, max_points: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted 1-D k-means centroids for a batch of codebooks.

    Each row is sorted, equal values are merged into one weighted point and
    zero-weight points are dropped, then the DP runs on what remains.

    Args:
        rows: (B, m) float64 values, one codebook per row, any order.
        weights: (B, m) float64 non-negative weights, or None for all ones.
        k: clusters per codebook.
        max_points: a row with more distinct points is first reduced to this many
            runs of consecutive points, each its weighted mean (half the runs
            equal-count, the rest from splitting the runs with the largest sum of
            squares, so tails and outliers keep runs of their own); its result is
            optimal for the reduced points only, and such rows are flagged.

    Returns:
        ((B, k) float64 centroids ascending, (B,) bool flags of reduced rows). A row
        with fewer than ``k`` points gets its points followed by copies of its
        largest point; a row with no positive weight gets zeros.
    """
    import numba

    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    b = rows.shape[0]
    out = np.empty((b, k), dtype=np.float64)
    reduced = np.zeros(b, dtype=np.bool_)
    if b == 0:
        return out, reduced
    if weights is None:
        weights = np.ones((1, rows.shape[1]))
    _KERNEL(
        np.ascontiguousarray(rows, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        int(k),
        int(max_points),
        int(min(b, 4 * numba.get_num_threads())),
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
