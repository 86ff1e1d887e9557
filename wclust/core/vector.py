"""Vector codebooks: k-means over ``d`` consecutive weights (``cluster_dim``).

A weight tensor, flattened in row-major order (along the input dimension), is cut
into vectors of ``d`` consecutive weights; each codebook holds ``k`` centroids of
``d`` values and each vector stores one code of ``ceil(log2 k)`` bits. With ``b``
code bits per weight, ``k = 2**(b*d)``: the same code bits per weight as a scalar
codebook of ``2**b`` values, but the centroids may sit anywhere in d-space instead
of on a grid (the gain of GPTVQ / AQLM / VPTQ, and of coremltools' ``cluster_dim``).

Codebooks are laid out as the scalar ones (``codebook.codebook_layout``: per tensor,
per output channel, or per group of consecutive weights of a channel), or per group
of whole output channels (``group_size = m * in``: m channels share one codebook). Optionally the weights are first
normalized per group of ``scale_group_size`` consecutive weights by a float16 scale
(absmax, or fitted), the vector analogue of ``quantizers.scaled_kmeans``.

Initialization "product" starts from the best scalar codebook of the same layout and
width (optimal 1-D k-means, or for scaled groups ``scaled_kmeans`` with the same
scales): its Cartesian product is a d-dimensional codebook with exactly the scalar
codebook's error, and weighted Lloyd in d dimensions can only lower it. The result
is never worse than that scalar codebook (the best codebook seen is kept).

Pure tensor code; Lloyd is batched over codebooks, its assignment a parallel numba
kernel (no distance matrix is held), each codebook learned on a random sample of at
most ``TRAIN_PER_CLUSTER`` vectors per centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .codebook import CODEBOOK_DTYPES, _validate, cluster_scalar, codebook_layout
from .packing import MAX_CODE_BITS, pack_codes, packed_nbytes

__all__ = [
    "CLUSTER_DIMS",
    "VECTOR_INITS",
    "VectorClusteredTensor",
    "cluster_vectors",
    "product_codebook",
    "vector_lloyd",
]

CLUSTER_DIMS = (1, 2, 4, 8)
VECTOR_INITS = ("product", "random")
SCALAR_INITS = ("exact", "lloyd", "fit")
# Lloyd learns each codebook on at most this many vectors per centroid (at least
# TRAIN_MIN), drawn at random, as faiss does; every vector is then assigned once.
TRAIN_PER_CLUSTER = 256
TRAIN_MIN = 1 << 16


@dataclass
class VectorClusteredTensor:
    """A tensor stored as codebooks of d-dimensional centroids plus one code per
    ``d`` consecutive weights (and optional float16 scales per group of weights).

    Attributes:
        codebook: (n_codebooks, n_clusters, d) float32 centroids, as stored (already
            rounded to ``codebook_dtype``); for "int8" they are
            ``codebook_int8 * codebook_scale[:, None, None]``.
        codes: (numel // d,) int32 codes of the vectors in row-major order; the
            vectors of codebook ``i`` are ``codes.view(n_codebooks, -1)[i]``.
        shape, dtype: of the original tensor.
        cluster_dim: ``d``, weights per vector.
        granularity, group_size: how vectors map to codebooks (``codebook_layout``).
        n_clusters: centroids per codebook; ``code_bits = ceil(log2(n_clusters))``.
        codebook_dtype: storage type of the centroids.
        scale: optional (numel // scale_group_size,) float16 scale per group of
            consecutive weights: the weight is ``codebook[code] * scale[group]``.
        scale_group_size: weights per scale.
        mse: weighted mean squared error of ``dequantize()`` against the input.
        init: how Lloyd was started.
    """

    codebook: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    cluster_dim: int
    granularity: str
    group_size: int | None
    n_clusters: int
    codebook_dtype: str
    mse: float
    init: str
    codebook_scale: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    scale_group_size: int | None = None

    @property
    def code_bits(self) -> int:
        """Width of one code (one per ``cluster_dim`` weights)."""
        return max(1, math.ceil(math.log2(self.n_clusters)))

    @property
    def bits(self) -> int:
        """The code width, as ``ClusteredTensor.bits`` (the width codes are packed at)."""
        return self.code_bits

    @property
    def n_codebooks(self) -> int:
        return self.codebook.shape[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def codebook_int8(self) -> torch.Tensor | None:
        if self.codebook_scale is None:
            return None
        return torch.round(self.codebook / self.codebook_scale[:, None, None]).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """Tensor of the original shape and dtype rebuilt from codes, codebooks, scales."""
        w = _decode(self.codebook, self.codes, self.scale)
        return w.reshape(self.shape).to(self.dtype)

    def packed_codes(self) -> torch.Tensor:
        """Codes packed ``code_bits`` each into a uint8 stream (see core.packing)."""
        return pack_codes(self.codes, self.code_bits)

    @property
    def codebook_nbytes(self) -> int:
        """Codebooks (and int8 scales) and group scales."""
        n = self.codebook.numel() * CODEBOOK_DTYPES[self.codebook_dtype]
        if self.codebook_scale is not None:
            n += 4 * self.codebook_scale.numel()
        if self.scale is not None:
            n += 2 * self.scale.numel()
        return n

    @property
    def nbytes(self) -> int:
        """Storage bytes: packed codes, codebooks, their scales, group scales."""
        return packed_nbytes(self.numel // self.cluster_dim, self.code_bits) + self.codebook_nbytes

    @property
    def bits_per_weight(self) -> float:
        """Everything counted: ``code_bits / d`` plus codebook and scale bits per weight."""
        return 8.0 * self.nbytes / self.numel


def _decode(codebook: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None):
    """Flat float32 weights (numel,) from (n_cb, k, d) codebooks and flat codes."""
    n_cb, k, d = codebook.shape
    idx = codes.reshape(n_cb, -1).long()
    if n_cb > 1:
        idx = idx + (torch.arange(n_cb, device=idx.device) * k)[:, None]
    w = codebook.reshape(n_cb * k, d).float().index_select(0, idx.reshape(-1)).reshape(-1)
    if scale is not None:
        w = (w.view(scale.numel(), -1) * scale.float()[:, None]).reshape(-1)
    return w


def _layout(shape, granularity, group_size) -> tuple[int, int]:
    """(n_codebooks, weights per codebook): ``codebook_layout``, and for "group" a
    ``group_size`` that is a multiple of the row length: codebooks over whole rows
    (output channels)."""
    numel = math.prod(shape)
    if granularity == "group" and len(shape) >= 2 and isinstance(group_size, int):
        row = numel // shape[0]
        if group_size > 0 and group_size % row == 0 and numel % group_size == 0:
            return numel // group_size, group_size
    return codebook_layout(shape, granularity, group_size)


def _resolve_vector_k(n_clusters, bits, d) -> int:
    if bits is not None:
        if not isinstance(bits, int) or bits < 1 or bits * d > MAX_CODE_BITS:
            raise ValueError(
                f"bits (code bits per weight) must be a positive integer with bits * "
                f"cluster_dim <= {MAX_CODE_BITS}; got bits={bits!r}, cluster_dim={d}"
            )
        if n_clusters is not None and n_clusters != 1 << (bits * d):
            raise ValueError(
                f"n_clusters={n_clusters} contradicts bits={bits} with cluster_dim={d} "
                f"(2**(bits*cluster_dim) = {1 << (bits * d)}); give only one of them"
            )
        return 1 << (bits * d)
    if n_clusters is None:
        return 1 << (4 * d)
    if not isinstance(n_clusters, int) or not 2 <= n_clusters <= 1 << MAX_CODE_BITS:
        raise ValueError(
            f"n_clusters must be an integer from 2 to {1 << MAX_CODE_BITS} for vector "
            f"codebooks, got {n_clusters!r}"
        )
    return n_clusters


def _product_side(k: int, d: int) -> int | None:
    """``m`` with ``m**d == k`` (m >= 2), or None."""
    m = round(k ** (1.0 / d))
    for c in (m - 1, m, m + 1):
        if c >= 2 and c**d == k:
            return c
    return None


def product_codebook(cb1: torch.Tensor, d: int) -> torch.Tensor:
    """The Cartesian product of scalar codebooks.

    Args:
        cb1: (n_cb, m) scalar centroids.
        d: vector dimension.

    Returns:
        (n_cb, m**d, d): centroid ``c`` has ``cb1[:, (c // m**j) % m]`` in dimension j.
    """
    n_cb, m = cb1.shape
    idx = torch.arange(m**d)
    digits = torch.stack([(idx // m**j) % m for j in range(d)], 1)  # (m**d, d)
    return cb1[:, digits]


_ASSIGN = None


def _assign_kernel():
    global _ASSIGN
    if _ASSIGN is None:
        import numba as nb

        @nb.njit(parallel=True, cache=True, fastmath=False)
        def assign(v, w, cents, per_cb, codes, err):
            n, d = v.shape
            k = cents.shape[1]
            for i in nb.prange(n):
                c = cents[i // per_cb]
                best = np.inf
                arg = 0
                for j in range(k):
                    acc = np.float32(0.0)
                    for t in range(d):
                        diff = v[i, t] - c[j, t]
                        acc += w[i, t] * diff * diff
                    if acc < best:
                        best = acc
                        arg = j
                codes[i] = arg
                e = 0.0
                for t in range(d):  # the chosen centroid's error, in float64
                    diff = np.float64(v[i, t]) - np.float64(c[arg, t])
                    e += np.float64(w[i, t]) * diff * diff
                err[i] = e

        _ASSIGN = assign
    return _ASSIGN


def _assign(v, w, cents):
    """Nearest centroid of each vector under its own per-dimension weights,
    argmin_c sum_j w_j (v_j - c_j)^2, and that weighted squared error.

    Args:
        v, w: (n_cb, n, d) vectors and weights.
        cents: (n_cb, k, d) centroids.

    Returns:
        ((n_cb, n) int64 codes, (n_cb, n) float64 weighted squared error of each
        vector against its float32 centroid).
    """
    n_cb, n, d = v.shape
    codes = np.empty(n_cb * n, dtype=np.int64)
    err = np.empty(n_cb * n, dtype=np.float64)
    _assign_kernel()(
        np.ascontiguousarray(v.reshape(-1, d).float().numpy()),
        np.ascontiguousarray(w.reshape(-1, d).float().numpy()),
        np.ascontiguousarray(cents.float().numpy()),
        n,
        codes,
        err,
    )
    return torch.from_numpy(codes).view(n_cb, n), torch.from_numpy(err).view(n_cb, n)


def _update(v, wf, wvf, codes, cents, vec_err) -> torch.Tensor:
    """Weighted mean of each cell, per dimension (float64 sums). An empty cell moves
    onto the vector of its codebook with the largest error (one distinct vector per
    empty cell), which can only lower the error. ``wf``, ``wvf``: (n_cb * n, d)
    float64 weights and weights * vectors; ``vec_err``: (n_cb, n) errors."""
    n_cb, k, d = cents.shape
    idx = (codes + (torch.arange(n_cb) * k)[:, None]).reshape(-1)
    s0 = torch.zeros(n_cb * k, d, dtype=torch.float64).index_add_(0, idx, wf)
    s1 = torch.zeros(n_cb * k, d, dtype=torch.float64).index_add_(0, idx, wvf)
    new = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), cents.reshape(-1, d).double())
    new = new.view(n_cb, k, d)
    empty = s0.view(n_cb, k, d).sum(2) <= 0  # (n_cb, k)
    n_empty = int(empty.sum(1).max()) if empty.any() else 0
    if n_empty:
        worst = vec_err.topk(min(n_empty, vec_err.shape[1]), dim=1).indices  # (n_cb, e)
        for r in empty.any(1).nonzero().flatten().tolist():
            cells = empty[r].nonzero().flatten()[: worst.shape[1]]
            src = worst[r, : cells.numel()]
            live = vec_err[r, src] > 0  # a vector already exact needs no centroid
            new[r, cells[live]] = v[r, src[live]].double()
    return new


def vector_lloyd(
    v: torch.Tensor,
    w: torch.Tensor,
    cents: torch.Tensor,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd in d dimensions, batched over codebooks; keeps the best seen.

    Args:
        v: (n_cb, n, d) vectors.
        w: (n_cb, n, d) non-negative weight of every coordinate.
        cents: (n_cb, k, d) initial centroids.
        max_iter: iteration cap.
        tol: stop when an iteration lowers the total error by less than this fraction.

    Returns:
        (centroids (n_cb, k, d) float64, codes (n_cb, n) int64): for each codebook
        the best iteration (errors of the float32 centroids, as ``_assign`` gives them).
    """
    d = v.shape[2]
    wf = w.reshape(-1, d).double()
    wvf = wf * v.reshape(-1, d).double()
    cents = cents.double()
    codes, vec_err = _assign(v, w, cents)
    err = vec_err.sum(1)
    best_c, best_codes, best_err = cents.clone(), codes.clone(), err.clone()
    for _ in range(max_iter):
        cents = _update(v, wf, wvf, codes, cents, vec_err)
        codes, vec_err = _assign(v, w, cents)
        err = vec_err.sum(1)
        better = err < best_err
        prev_total = float(best_err.sum())
        best_c[better] = cents[better]
        best_codes[better] = codes[better]
        best_err = torch.where(better, err, best_err)
        if prev_total - float(best_err.sum()) <= tol * prev_total:
            break
    return best_c, best_codes


def _round_codebook(cents: torch.Tensor, codebook_dtype: str):
    """Centroids (n_cb, k, d) as stored (float64 values), and int8 scales or None."""
    if codebook_dtype == "int8":
        amax = cents.abs().flatten(1).amax(1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
        q = torch.round(cents / scale.double()[:, None, None]).clamp(-127, 127)
        return q * scale.double()[:, None, None], scale
    if codebook_dtype != "float32":
        cents = cents.to(getattr(torch, codebook_dtype))
    return cents.float().double(), None


def cluster_vectors(
    x: torch.Tensor,
    n_clusters: int | None = None,
    *,
    cluster_dim: int = 2,
    bits: int | None = None,
    granularity: str = "tensor",
    group_size: int | None = None,
    scale_group_size: int | None = None,
    scalar: str = "exact",
    sample_weight: torch.Tensor | None = None,
    init: str = "product",
    codebook_dtype: str = "float32",
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> VectorClusteredTensor:
    """Vector k-means: one code per ``cluster_dim`` consecutive weights.

    Args:
        x: floating-point tensor; its rows (``x.shape[0]`` of them, or the whole
            tensor if 1-D) must have a multiple of ``cluster_dim`` elements.
        n_clusters: centroids per codebook (2..65536), or give ``bits``.
        cluster_dim: ``d``, weights per vector: 2, 4 or 8.
        bits: code bits per weight: ``n_clusters = 2**(bits * cluster_dim)``.
        granularity, group_size: codebook layout as for scalar codebooks
            ("tensor" | "channel" | "group" of ``group_size`` consecutive weights,
            a multiple of ``cluster_dim``).
        scale_group_size: if set, every group of that many consecutive weights is
            divided by a float16 scale before clustering (absmax, or fitted when
            ``scalar="fit"``) and the error of the real weights is minimized.
        scalar: the scalar codebook the "product" init starts from: "exact" (optimal
            1-D k-means; without scale groups, always), and with scale groups
            "exact", "lloyd" or "fit" as ``scaled_kmeans`` (method exact / lloyd,
            ``fit_scale``).
        sample_weight: optional non-negative importance per element (x's shape).
        init: "product" (Cartesian product of the scalar codebook; needs
            ``n_clusters == m**d``) or "random" (centroids drawn from the vectors in
            proportion to their weight).
        codebook_dtype: "float32" | "float16" | "bfloat16" | "int8" (one float32
            scale per codebook).
        seed: RNG seed for "random".
        max_iter, tol: Lloyd's iteration cap and relative stopping threshold.

    Returns:
        A :class:`VectorClusteredTensor`. With init "product" its weighted error is
        at most that of the scalar codebook it started from (same layout, same
        scales, ``m = n_clusters**(1/d)`` centroids).
    """
    d = cluster_dim
    k, sw, n_cb, per, m = _check_vector_args(
        x,
        n_clusters,
        d,
        bits,
        granularity,
        group_size,
        scale_group_size,
        scalar,
        init,
        sample_weight,
        codebook_dtype,
    )
    shape, numel = tuple(x.shape), x.numel()
    xf = x.detach().to("cpu", torch.float32).reshape(-1)
    w = sw.float().reshape(-1) if sw is not None else torch.ones(numel)
    # A codebook whose weights are all zero falls back to uniform weights.
    wr = w.view(n_cb, per)
    dead = wr.sum(1) <= 0
    if dead.any():
        wr[dead] = 1.0
    scale, cb1 = _scales_and_scalar_codebook(
        xf, w, shape, n_cb, per, k, m, d, init, scalar, scale_group_size, codebook_dtype
    )
    v, wv = xf, w
    if scale is not None:
        s = scale.float().repeat_interleave(scale_group_size)
        v, wv = xf / s, w * s * s
    v = v.view(n_cb, per // d, d)
    wv = wv.view(n_cb, per // d, d)
    if init == "product":
        cents0 = product_codebook(cb1, d)
    else:
        gen = torch.Generator().manual_seed(seed)
        pw = wv.sum(2).double() + 1e-30
        pick = torch.multinomial(pw.float(), k, replacement=per // d < k, generator=gen)
        cents0 = v.gather(1, pick[:, :, None].expand(-1, -1, d)).double()
    c, cscale, codes, err = _fit_and_keep_best(
        v, wv, cents0, k, codebook_dtype, seed, max_iter, tol
    )
    wsum = float(w.double().sum())
    return VectorClusteredTensor(
        codebook=c.float(),
        codes=codes.to(torch.int32).reshape(-1),
        shape=shape,
        dtype=x.dtype,
        cluster_dim=d,
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        n_clusters=k,
        codebook_dtype=codebook_dtype,
        mse=float(err.sum()) / wsum if wsum > 0 else 0.0,
        init=init,
        codebook_scale=cscale,
        scale=scale,
        scale_group_size=scale_group_size,
    )


def _check_vector_args(
    x,
    n_clusters,
    d,
    bits,
    granularity,
    group_size,
    scale_group_size,
    scalar,
    init,
    sample_weight,
    codebook_dtype,
):
    """Refuses what ``cluster_vectors`` cannot do; returns ``(k, validated sample
    weight, codebooks, weights per codebook, product side m or None)``."""
    if d not in CLUSTER_DIMS or d == 1:
        raise ValueError(
            f"cluster_dim must be one of {', '.join(map(str, CLUSTER_DIMS[1:]))} for vector "
            f"codebooks (1 is the scalar cluster_tensor), got {d!r}"
        )
    k = _resolve_vector_k(n_clusters, bits, d)
    sw = _validate(x, sample_weight, "kmeans", "kmeans++", codebook_dtype)
    if init not in VECTOR_INITS:
        raise ValueError(f"unknown init {init!r} for vector codebooks; choose {VECTOR_INITS}")
    if scalar not in SCALAR_INITS:
        raise ValueError(f"unknown scalar init {scalar!r}; choose one of {SCALAR_INITS}")
    shape = tuple(x.shape)
    numel = x.numel()
    row = numel // shape[0] if len(shape) >= 2 else numel
    if row % d:
        raise ValueError(
            f"cluster_dim={d} does not divide the {row} weights per row of shape {shape}; "
            f"pick a cluster_dim that divides {row}"
        )
    n_cb, per = _layout(shape, granularity, group_size)
    if per % d:
        raise ValueError(
            f"group_size={group_size} is not a multiple of cluster_dim={d}; vectors must "
            "not straddle codebooks"
        )
    if scale_group_size is not None:
        g = scale_group_size
        if not isinstance(g, int) or g < 1 or g % d or numel % g or (per % g and g % per):
            raise ValueError(
                f"scale_group_size={g!r} must be a positive multiple of cluster_dim={d} that "
                f"divides the {numel} weights and nests with the codebooks' {per} weights"
            )
    m = _product_side(k, d)
    if init == "product" and m is None:
        raise ValueError(
            f"init='product' needs n_clusters = m**{d} (e.g. {4**d} or {8**d}), got {k}; "
            "use init='random'"
        )
    if scale_group_size is not None and init == "product" and m & (m - 1):
        raise ValueError(
            f"scaled groups with init='product' need n_clusters = (2**b)**{d}, got {k}"
        )
    return k, sw, n_cb, per, m


def _scales_and_scalar_codebook(
    xf, w, shape, n_cb, per, k, m, d, init, scalar, scale_group_size, codebook_dtype
):
    """The float16 group scales (None without scale groups) and, for the "product"
    init, the scalar codebooks ``(n_cb, m)`` it starts from (else None)."""
    if scale_group_size is not None:
        from .quantizers import scaled_kmeans

        if init != "product":
            floor = torch.finfo(torch.float16).tiny  # as scaled_kmeans: no 0/0 on zeros
            return xf.view(-1, scale_group_size).abs().amax(1).half().clamp_min(floor), None
        sc = scaled_kmeans(
            xf.view(shape),
            m.bit_length() - 1,
            scale_group_size,
            sample_weight=w.view(shape),
            method="exact" if scalar == "exact" else "lloyd",
            fit_scale=scalar == "fit",
        )
        return sc.scale, sc.codebook.double().expand(n_cb, -1)
    if init != "product":
        return None, None
    ct = cluster_scalar(  # the same codebooks, one per row of (n_cb, per)
        xf.view(n_cb, per),
        n_clusters=m,
        granularity="channel" if n_cb > 1 else "tensor",
        method="exact",
        sample_weight=w.view(n_cb, per),
        codebook_dtype=codebook_dtype if codebook_dtype != "int8" else "float32",
    )
    return None, ct.codebook.double()  # (n_cb, m)


def _fit_and_keep_best(v, wv, cents0, k, codebook_dtype, seed, max_iter, tol):
    """Lloyd from ``cents0`` (on a sample of the vectors where there are many), then
    per codebook the better of the result and the start, both rounded to the storage
    dtype with codes re-assigned: rounding never makes it worse than its start.
    Returns ``(centroids, codebook scales or None, codes, error per codebook)``."""
    init_c, _ = _round_codebook(cents0, codebook_dtype)
    n_train = max(TRAIN_PER_CLUSTER * k, TRAIN_MIN)
    if v.shape[1] > n_train:
        pick = torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(seed))[:n_train]
        cents, _ = vector_lloyd(v[:, pick], wv[:, pick], cents0, max_iter, tol)
    else:
        cents, _ = vector_lloyd(v, wv, cents0, max_iter, tol)
    best = None
    for cand in (cents, init_c):
        c, cscale = _round_codebook(cand, codebook_dtype)
        codes, vec_err = _assign(v, wv, c)
        err = vec_err.sum(1)
        if best is None:
            best = [c, cscale, codes, err]
        else:
            better = err < best[3]
            best[0][better] = c[better]
            best[2][better] = codes[better]
            best[3] = torch.where(better, err, best[3])
            if cscale is not None:
                best[1][better] = cscale[better]
    return tuple(best)
