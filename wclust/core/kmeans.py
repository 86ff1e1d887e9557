"""Lloyd's k-means in 1-D on sorted prefix sums, batched over codebooks; inits.

With the points of a codebook sorted, the Voronoi cell of each centroid is a
contiguous run: the assignment step is ``searchsorted`` of the midpoints between
consecutive centroids (O(k log n)) and the update step is two prefix-sum lookups per
cluster. One iteration is O(k log n) per codebook instead of O(k n), and every
codebook of the batch advances together in a few tensor ops.
"""

from __future__ import annotations

import torch

__all__ = ["INITS", "init_centroids", "lloyd_sorted", "prefix_sums"]

INITS = ("linear", "density", "random", "kmeans++")

# kmeans++ seeding is sequential in k; on long rows it runs on this many
# representative points (equal-weight chunks of the sorted row).
_KMPP_POINTS = 2048


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
            in proportion to weight) or "kmeans++" (D^2 seeding).
        generator: torch RNG for the random inits.

    Returns:
        (B, k) float64 centroids, ascending.
    """
    b, n = xs.shape
    p0, _ = prefix_sums(xs, ws)
    if init == "linear":
        live = ws > 0
        lo = torch.where(live, xs, torch.inf).amin(1, keepdim=True)
        hi = torch.where(live, xs, -torch.inf).amax(1, keepdim=True)
        t = torch.linspace(0, 1, k, dtype=xs.dtype)[None, :]
        return lo + (hi - lo) * t
    if init == "density":
        q = (torch.arange(k, dtype=xs.dtype) + 0.5) / k
        return _weighted_quantiles(xs, p0, q)
    if init == "random":
        idx = torch.multinomial(ws.float() + 1e-30, k, replacement=n < k, generator=generator)
        return xs.gather(1, idx).sort(1).values
    if init == "kmeans++":
        return _kmeans_pp(xs, ws, p0, k, generator)
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


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
) -> torch.Tensor:
    """Run Lloyd iterations until no assignment changes.

    Args:
        xs: (B, n) float64 rows sorted ascending.
        ws: (B, n) non-negative weights.
        cents: (B, k) initial centroids.
        max_iter: iteration cap.

    Returns:
        (B, k) float64 centroids, ascending. A centroid whose cell is empty keeps
        its value.
    """
    p0, p1 = prefix_sums(xs, ws)
    b, n = xs.shape
    k = cents.shape[1]
    zero = torch.zeros(b, 1, dtype=torch.long)
    end = torch.full((b, 1), n, dtype=torch.long)
    prev = None
    for _ in range(max_iter):
        cents = cents.sort(1).values
        mids = 0.5 * (cents[:, 1:] + cents[:, :-1])  # (B, k-1)
        idx = torch.searchsorted(xs, mids.contiguous())  # first point of each right cell
        if prev is not None and torch.equal(idx, prev):
            break
        prev = idx
        bounds = torch.cat([zero, idx, end], 1)  # (B, k+1)
        s0 = p0.gather(1, bounds[:, 1:]) - p0.gather(1, bounds[:, :-1])
        s1 = p1.gather(1, bounds[:, 1:]) - p1.gather(1, bounds[:, :-1])
        cents = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), cents)
        if k == 1:
            break
    return cents.sort(1).values
