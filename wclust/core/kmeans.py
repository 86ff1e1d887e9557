"""Lloyd's k-means in 1-D on sorted prefix sums, batched over codebooks; inits.

With the points of a codebook sorted, the Voronoi cell of each centroid is a
contiguous run: the assignment step is a binary search of the midpoints between
consecutive centroids (O(k log n)) and the update step is two prefix-sum lookups per
cluster. One iteration is O(k log n) per codebook instead of O(k n). Codebooks run in
parallel in a numba kernel, each until its own assignment stops changing.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INITS", "argsort_f32", "init_centroids", "lloyd_sorted", "prefix_sums"]

INITS = ("linear", "density", "random", "kmeans++", "exact-coarse")

# kmeans++ seeding is sequential in k; on long rows it runs on this many
# representative points (equal-weight chunks of the sorted row).
_KMPP_POINTS = 2048

# "exact-coarse" solves each row exactly after reducing it to this many weighted
# points per cluster (at least _COARSE_MIN): runs of consecutive values, split where
# the within-run spread is largest (see core.exact). Lloyd from there ends within
# ~0.1% of the optimum on Gaussian, Student-t, outlier and Whisper weights, where
# Lloyd from the other inits stalls at +5% to +60% (+1000s of % for k=256 with
# heavy tails): 1-D Lloyd cannot move clusters from dense to sparse regions.
_COARSE_PER_CLUSTER = 16
_COARSE_MIN = 64


def argsort_f32(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort the 1-D tensor ``x`` (compared as float32, no NaN) ascending,
    equal values in their original order.

    Sorts 32-bit integer keys that order like the floats (the magnitude bits of
    negative values flipped): torch radix-sorts integers on CPU, about 10x faster
    than its comparison sort of the floats on a million values.
    """
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: all ones where negative
    return torch.sort(key.to(torch.int64), stable=True).indices


def prefix_sums(xs: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums of w and w*x with a leading zero column: (B, n+1) each."""
    z = torch.zeros(xs.shape[0], 1, dtype=xs.dtype)
    return torch.cat([z, ws.cumsum(1)], 1), torch.cat([z, (ws * xs).cumsum(1)], 1)


def _weighted_quantiles(xs, p0, q):
    """Values at cumulative-weight fractions ``q`` (k,) of each sorted row: (B, k)."""
    total = p0[:, -1:]
    target = q[None, :] * total  # (B, k)
    idx = torch.searchsorted(p0[:, 1:].contiguous(), target.contiguous())
    return xs.gather(1, idx.clamp_(max=xs.shape[1] - 1))


def init_centroids(
    xs: torch.Tensor, ws: torch.Tensor, k: int, init: str, generator: torch.Generator
) -> torch.Tensor:
    """Initial centroids for each sorted row.

    Args:
        xs: (B, n) float64 rows sorted ascending.
        ws: (B, n) non-negative weights; zero-weight points are ignored.
        k: clusters per row.
        init: "linear" (evenly spaced between min and max, Deep Compression's
            choice), "density" (weighted quantiles), "random" (k data points drawn
            in proportion to weight), "kmeans++" (D^2 seeding) or "exact-coarse"
            (optimal centroids of the row reduced to ``16 k`` weighted runs).
        generator: torch RNG for the random inits.

    Returns:
        (B, k) float64 centroids, ascending.
    """
    b, n = xs.shape
    if init == "linear":
        live = ws > 0
        lo = torch.where(live, xs, torch.inf).amin(1, keepdim=True)
        hi = torch.where(live, xs, -torch.inf).amax(1, keepdim=True)
        t = torch.linspace(0, 1, k, dtype=xs.dtype)[None, :]
        return lo + (hi - lo) * t
    if init == "density":
        q = (torch.arange(k, dtype=xs.dtype) + 0.5) / k
        return _weighted_quantiles(xs, prefix_sums(xs, ws)[0], q)
    if init == "random":
        idx = torch.multinomial(ws.float() + 1e-30, k, replacement=n < k, generator=generator)
        return xs.gather(1, idx).sort(1).values
    if init == "kmeans++":
        return _kmeans_pp(xs, ws, prefix_sums(xs, ws)[0], k, generator)
    if init == "exact-coarse":
        return _exact_coarse(xs, ws, k)
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _exact_coarse(xs, ws, k):
    from .exact import optimal_kmeans_1d

    x = xs.detach().to("cpu", torch.float64).numpy()
    w = ws.detach().to("cpu", torch.float64).numpy()
    n_points = max(_COARSE_PER_CLUSTER * k, _COARSE_MIN)
    cents, _ = optimal_kmeans_1d(x, w, k, max_points=n_points)
    return torch.from_numpy(cents).to(xs.dtype)


def _kmeans_pp(xs, ws, p0, k, generator):
    b, n = xs.shape
    if n > _KMPP_POINTS:
        # Representative points: weighted means of equal-count chunks of the sorted row.
        edges = torch.linspace(0, n, _KMPP_POINTS + 1).round().long()
        _, p1 = prefix_sums(xs, ws)
        s0 = p0[:, edges[1:]] - p0[:, edges[:-1]]
        s1 = p1[:, edges[1:]] - p1[:, edges[:-1]]
        mid = xs[:, ((edges[1:] + edges[:-1]) // 2).clamp(max=n - 1)]
        pts = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), mid)
        pw = s0
    else:
        pts, pw = xs, ws
    pw = pw.clamp_min(0) + 1e-30
    cents = torch.empty(b, k, dtype=xs.dtype)
    first = torch.multinomial(pw.float(), 1, generator=generator)
    cents[:, 0] = pts.gather(1, first)[:, 0]
    d2 = (pts - cents[:, :1]) ** 2
    for j in range(1, k):
        prob = (pw * d2).float()
        dead = prob.sum(1, keepdim=True) <= 0  # every point already a centroid
        prob = torch.where(dead, pw.float(), prob)
        nxt = torch.multinomial(prob, 1, generator=generator)
        cents[:, j] = pts.gather(1, nxt)[:, 0]
        d2 = torch.minimum(d2, (pts - cents[:, j : j + 1]) ** 2)
    return cents.sort(1).values


def lloyd_sorted(
    xs: torch.Tensor,
    ws: torch.Tensor,
    cents: torch.Tensor,
    max_iter: int = 300,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run Lloyd iterations until no assignment changes.

    Args:
        xs: (B, n) float64 rows sorted ascending.
        ws: (B, n) non-negative weights.
        cents: (B, k) initial centroids.
        max_iter: iteration cap.
        fixed: optional (B, k) bool: these centroids keep their initial value (they
            still take part in the assignment). Lloyd still never raises the error.

    Returns:
        (B, k) float64 centroids, ascending. A centroid whose cell is empty keeps
        its value.
    """
    global _LLOYD
    if _LLOYD is None:
        _LLOYD = _build_lloyd()
    import numba

    x = np.ascontiguousarray(xs.detach().to("cpu", torch.float64).numpy())
    w = np.ascontiguousarray(ws.detach().to("cpu", torch.float64).numpy())
    c = np.array(cents.detach().to("cpu", torch.float64).numpy(), dtype=np.float64, order="C")
    f = np.zeros(c.shape, dtype=np.bool_) if fixed is None else np.array(fixed.cpu().numpy())
    b = x.shape[0]
    if b and c.shape[1]:
        _LLOYD(x, w, c, f, int(max_iter), int(min(b, 4 * numba.get_num_threads())))
    return torch.from_numpy(c).to(device=cents.device)


_LLOYD = None


def _build_lloyd():
    global _lloyd_rows
    import numba as nb

    @nb.njit(parallel=True, cache=True, error_model="numpy")
    def _lloyd_rows(xs, ws, cents, fixed, max_iter, n_chunks):
        b, n = xs.shape
        k = cents.shape[1]
        for ch in nb.prange(n_chunks):
            p0 = np.empty(n + 1)
            p1 = np.empty(n + 1)
            bnd = np.empty(k + 1, dtype=np.int64)
            prev = np.empty(k + 1, dtype=np.int64)
            for r in range((ch * b) // n_chunks, ((ch + 1) * b) // n_chunks):
                x = xs[r]
                w = ws[r]
                c = cents[r]
                f = fixed[r]
                p0[0] = 0.0
                p1[0] = 0.0
                for t in range(n):
                    p0[t + 1] = p0[t] + w[t]
                    p1[t + 1] = p1[t] + w[t] * x[t]
                bnd[0] = 0
                bnd[k] = n
                for it in range(max_iter):
                    o = np.argsort(c)
                    c[:] = c[o]
                    f[:] = f[o]
                    same = it > 0
                    for j in range(1, k):  # first point of each right cell
                        v = np.searchsorted(x, 0.5 * (c[j - 1] + c[j]))
                        if v != prev[j]:
                            same = False
                        bnd[j] = v
                    if same:
                        break
                    prev[:] = bnd
                    for j in range(k):
                        s0 = p0[bnd[j + 1]] - p0[bnd[j]]
                        if s0 > 0.0 and not f[j]:
                            c[j] = (p1[bnd[j + 1]] - p1[bnd[j]]) / s0
                    if k == 1:
                        break
                c[:] = np.sort(c)

    return _lloyd_rows
