"""Cluster a tensor into codebooks + codes: ``cluster_tensor`` and ``ClusteredTensor``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .exact import optimal_kmeans_1d
from .kmeans import INITS, init_centroids, lloyd_sorted
from .packing import pack_codes, packed_nbytes

__all__ = [
    "CODEBOOK_DTYPES",
    "GRANULARITIES",
    "METHODS",
    "ClusteredTensor",
    "cluster_scalar",
    "codebook_layout",
]

GRANULARITIES = ("tensor", "channel", "group")
METHODS = ("kmeans", "exact")
CODEBOOK_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
MAX_CLUSTERS = 256

# The exact solver runs on at most this many weighted points per codebook. Codebooks
# with more distinct values (large fp32 tensors clustered per tensor) are first
# reduced to this many equal-count runs of the sorted values, solved exactly, then
# polished by Lloyd on the full data (which never increases the error).
# docs/experiments measure the effect.
EXACT_MAX_POINTS = 1 << 16
# Rows of codebooks are clustered in batches of at most this many elements (a single
# codebook larger than this is one batch).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class ClusteredTensor:
    """A tensor stored as per-codebook centroids plus one code per element.

    Attributes:
        codebook: (n_codebooks, n_clusters) float32 centroids, as stored (already
            rounded to ``codebook_dtype``).
        codes: uint8 tensor of the original shape; ``codes[i]`` indexes the row of
            ``codebook`` that element ``i`` belongs to (see ``codebook_layout``).
        shape, dtype: of the original tensor.
        granularity, group_size: how elements map to codebooks.
        n_clusters: centroids per codebook; ``bits`` = ceil(log2(n_clusters)).
        codebook_dtype: storage type of the centroids; for "int8" the centroids are
            ``codebook_int8 * codebook_scale[:, None]``.
        mse: weighted mean squared error of ``dequantize()`` against the input.
        method, init: how the centroids were found.
    """

    codebook: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    granularity: str
    group_size: int | None
    n_clusters: int
    codebook_dtype: str
    mse: float
    method: str
    init: str | None
    keep_zeros: bool = False
    codebook_scale: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.n_clusters)))

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
        return torch.round(self.codebook / self.codebook_scale[:, None]).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """Tensor of the original shape and dtype rebuilt as ``codebook[codes]``."""
        rows = self.codes.reshape(self.n_codebooks, -1).long()  # (n_cb, per_cb)
        return self.codebook.gather(1, rows).reshape(self.shape).to(self.dtype)

    def packed_codes(self) -> torch.Tensor:
        """Codes packed ``bits`` per element into a uint8 stream (see core.packing)."""
        return pack_codes(self.codes, self.bits)

    @property
    def codebook_nbytes(self) -> int:
        n = self.codebook.numel() * CODEBOOK_DTYPES[self.codebook_dtype]
        if self.codebook_scale is not None:
            n += 4 * self.codebook_scale.numel()
        return n

    @property
    def nbytes(self) -> int:
        """Storage bytes: packed codes plus codebooks (and their scales)."""
        return packed_nbytes(self.numel, self.bits) + self.codebook_nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


def codebook_layout(
    shape: tuple[int, ...], granularity: str, group_size: int | None
) -> tuple[int, int]:
    """(n_codebooks, elements per codebook) for a tensor shape.

    "tensor": one codebook. "channel": one per index of dim 0 (output channel).
    "group": each channel's elements (flattened in row-major order, i.e. along the
    input dimension) split into consecutive groups of ``group_size``.
    """
    numel = math.prod(shape)
    if granularity == "tensor":
        return 1, numel
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    if len(shape) < 2:
        raise ValueError(
            f"granularity={granularity!r} needs a tensor with at least 2 dims (output "
            f"channels first); got shape {tuple(shape)}. Use granularity='tensor'."
        )
    out = shape[0]
    per_channel = numel // out
    if granularity == "channel":
        return out, per_channel
    if group_size is None or group_size < 1:
        raise ValueError("granularity='group' needs group_size, a positive integer")
    if per_channel % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {per_channel} elements per output "
            f"channel of shape {tuple(shape)}; pick a divisor of {per_channel}"
        )
    return out * (per_channel // group_size), group_size


def _resolve_k(n_clusters: int | None, bits: int | None) -> int:
    if bits is not None:
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")
        if n_clusters is not None and n_clusters != 1 << bits:
            raise ValueError(
                f"n_clusters={n_clusters} contradicts bits={bits}; give only one of them"
            )
        return 1 << bits
    if n_clusters is None:
        return 16
    if not isinstance(n_clusters, int) or not 2 <= n_clusters <= MAX_CLUSTERS:
        raise ValueError(
            f"n_clusters must be an integer from 2 to {MAX_CLUSTERS}, got {n_clusters!r}"
        )
    return n_clusters


def _validate(x, sample_weight, method, init, codebook_dtype):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"can only cluster floating-point tensors, got {x.dtype}; integer or already "
            "quantized weights must be dequantized first"
        )
    if x.device.type == "meta":
        raise ValueError("x is on the meta device (no data); load the real weights first")
    if x.numel() == 0:
        raise ValueError(f"cannot cluster an empty tensor (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x has {bad} NaN/Inf values; clustering needs finite weights")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "kmeans" and init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(
            f"unknown codebook_dtype {codebook_dtype!r}; choose one of {', '.join(CODEBOOK_DTYPES)}"
        )
    if sample_weight is not None:
        if not isinstance(sample_weight, torch.Tensor) or sample_weight.shape != x.shape:
            got = (
                tuple(sample_weight.shape)
                if isinstance(sample_weight, torch.Tensor)
                else type(sample_weight).__name__
            )
            raise ValueError(
                f"sample_weight must be a tensor of x's shape {tuple(x.shape)}, got {got}"
            )
        sw = sample_weight.detach().to("cpu", torch.float64)
        if not torch.isfinite(sw).all() or (sw < 0).any():
            raise ValueError("sample_weight must be finite and non-negative")
        return sw
    return None


def cluster_scalar(
    x: torch.Tensor,
    n_clusters: int | None = None,
    *,
    bits: int | None = None,
    granularity: str = "tensor",
    group_size: int | None = None,
    method: str = "kmeans",
    init: str = "kmeans++",
    sample_weight: torch.Tensor | None = None,
    keep_zeros: bool = False,
    codebook_dtype: str = "float32",
    seed: int = 0,
    max_iter: int = 300,
) -> ClusteredTensor:
    """Replace a tensor by scalar codebooks of centroids plus one code per element
    (``wclust.cluster_tensor`` with ``cluster_dim=1``).

    Args:
        x: floating-point tensor (fp32/fp16/bf16), any shape, finite.
        n_clusters: centroids per codebook (2..256); default 16. Or give ``bits``.
        bits: code width; ``n_clusters = 2**bits``.
        granularity: "tensor" | "channel" (a codebook per index of dim 0) | "group".
        group_size: for "group": consecutive elements of each channel per codebook.
        method: "kmeans" (Lloyd on sorted prefix sums) or "exact" (globally optimal
            weighted 1-D k-means for every codebook).
        init: Lloyd's init: "linear" | "density" | "random" | "kmeans++".
        sample_weight: optional non-negative importance per element (x's shape); the
            weighted squared error is minimized. A codebook whose weights are all
            zero falls back to uniform weights.
        keep_zeros: exact zeros (pruned weights) stay exactly zero: centroid 0 of every
            codebook is fixed at 0.0, and non-zero elements use the other centroids.
        codebook_dtype: "float32" | "float16" | "bfloat16" | "int8" (symmetric, one
            float32 scale per codebook). Codes are re-assigned to the rounded centroids.
        seed: RNG seed for the random inits; results are deterministic given it.
        max_iter: Lloyd iteration cap.
    Returns:
        A :class:`ClusteredTensor` (a codebook with fewer distinct values than
        ``n_clusters`` reproduces its values exactly: spare centroids repeat a value).
    """
    k = _resolve_k(n_clusters, bits)
    sw = _validate(x, sample_weight, method, init, codebook_dtype)
    shape = tuple(x.shape)
    n_cb, per = codebook_layout(shape, granularity, group_size)
    rows = x.detach().reshape(n_cb, per)  # (n_cb, per), still x's dtype
    sw_rows = sw.reshape(n_cb, per) if sw is not None else None
    gen = torch.Generator().manual_seed(seed)
    # Codebooks are solved in batches of whole rows of at most CHUNK_ELEMENTS, so the
    # float64 working copies stay bounded (about 100 bytes per element) however large
    # the tensor: a 4096x11008 matrix per channel peaks at ~0.6 GB, not 2.3 GB.
    step = max(1, CHUNK_ELEMENTS // per)
    parts = [
        _cluster_rows(
            rows[i : i + step],
            None if sw_rows is None else sw_rows[i : i + step],
            k,
            method,
            init,
            keep_zeros,
            codebook_dtype,
            gen,
            max_iter,
        )
        for i in range(0, n_cb, step)
    ]
    codebook = torch.cat([p[0] for p in parts])
    codes = torch.cat([p[1] for p in parts])
    scale = torch.cat([p[2] for p in parts]) if codebook_dtype == "int8" else None
    mse = sum(p[3] for p in parts) / sum(p[4] for p in parts)
    return ClusteredTensor(
        codebook=codebook,
        codes=codes.reshape(shape),
        shape=shape,
        dtype=x.dtype,
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        n_clusters=k,
        codebook_dtype=codebook_dtype,
        mse=mse,
        method=method,
        init=init if method == "kmeans" else None,
        keep_zeros=keep_zeros,
        codebook_scale=scale,
    )


def _cluster_rows(x_rows, sw_rows, k, method, init, keep_zeros, codebook_dtype, gen, max_iter):
    """Cluster each row of ``x_rows`` (n, per) into its own codebook.

    Returns:
        (codebook (n, k) float32, codes (n, per) uint8, int8 scale (n,) or None,
        weighted squared error sum, weight sum).
    """
    n_cb = x_rows.shape[0]
    rows = x_rows.to("cpu", torch.float64)  # (n, per)
    w = None  # None: uniform weights (no array of ones is made)
    if sw_rows is not None:
        w = torch.where(sw_rows.sum(1, keepdim=True) > 0, sw_rows, torch.ones_like(sw_rows))
    w_fit, k_fit = w, k
    if keep_zeros:
        w_fit = torch.where(rows != 0, 1.0 if w is None else w, 0.0).to(torch.float64)
        k_fit = k - 1

    if method == "exact":
        cents = _exact(rows, w_fit, k_fit)
    else:
        order = rows.argsort(dim=1, stable=True)
        xs = rows.gather(1, order)
        ws = torch.ones_like(xs) if w_fit is None else w_fit.gather(1, order)
        del order
        cents = init_centroids(xs, ws, k_fit, init, gen) if k_fit > 0 else xs[:, :0]
        cents = lloyd_sorted(xs, ws, cents, max_iter)
        del xs, ws

    scale = None
    if codebook_dtype == "int8":
        amax = cents.abs().amax(1) if k_fit else torch.zeros(n_cb, dtype=torch.float64)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
        cents = (
            torch.round(cents / scale[:, None].double()).clamp(-127, 127) * scale[:, None].double()
        )
    elif codebook_dtype != "float32":
        cents = cents.to(getattr(torch, codebook_dtype)).double()
    cents = cents.float().double().sort(1).values  # what is stored is float32
    stored = cents
    if keep_zeros:
        stored = torch.cat([torch.zeros(n_cb, 1, dtype=cents.dtype), cents], 1)
    codebook = stored.float()
    # What dequantize() gives back, in float64, for the error.
    table = codebook.to(x_rows.dtype).double()
    codes, err = _assign_err(rows, cents, table, w, keep_zeros)
    wsum = float(rows.numel()) if w is None else float(w.sum())
    return codebook, codes, scale, err, wsum


_ASSIGN = None


def _assign_kernel():
    global _ASSIGN
    if _ASSIGN is None:
        import numba as nb

        @nb.njit(parallel=True, cache=True)
        def assign(rows, cents, table, w, zero_code, codes, err):
            n, per = rows.shape
            k = cents.shape[1]
            for r in nb.prange(n):
                c = cents[r]
                acc = 0.0
                for t in range(per):
                    v = rows[r, t]
                    if zero_code and v == 0.0:
                        code = 0
                    else:
                        # number of midpoints < v, as torch.searchsorted(mids, v)
                        lo, hi = 0, max(k - 1, 0)
                        while lo < hi:
                            m = (lo + hi) >> 1
                            if 0.5 * (c[m + 1] + c[m]) < v:
                                lo = m + 1
                            else:
                                hi = m
                        code = lo + 1 if zero_code else lo
                    codes[r, t] = code
                    d = table[r, code] - v
                    acc += d * d * (w[r, t] if w.shape[0] else 1.0)
                err[r] = acc

        _ASSIGN = assign
    return _ASSIGN


def _assign_err(rows, cents, table, w, zero_code: bool):
    """Nearest centroid of ``cents`` (ascending rows) for every element, as uint8
    codes (shifted by one, zeros to code 0, with ``zero_code``), and the weighted
    squared error sum of ``table[codes]`` against ``rows``: one fused pass."""
    codes = torch.empty(rows.shape, dtype=torch.uint8)
    err = torch.empty(rows.shape[0], dtype=torch.float64)
    wn = np.empty((0, 0)) if w is None else w.to(torch.float64).contiguous().numpy()
    _assign_kernel()(
        rows.contiguous().numpy(),
        cents.contiguous().numpy(),
        table.contiguous().numpy(),
        wn,
        zero_code,
        codes.numpy(),
        err.numpy(),
    )
    return codes, float(err.sum())


def _exact(rows: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """Optimal centroids per row (``w`` None: uniform); rows reduced for size are
    polished by Lloyd."""
    if k == 0:
        return rows[:, :0]
    cents, reduced = optimal_kmeans_1d(
        rows.numpy(), None if w is None else w.numpy(), k, EXACT_MAX_POINTS
    )
    cents = torch.from_numpy(cents)
    if reduced.any():
        idx = torch.from_numpy(np.flatnonzero(reduced))
        xs, order = rows[idx].sort(1)
        ws = torch.ones_like(xs) if w is None else w[idx].gather(1, order)
        cents[idx] = lloyd_sorted(xs, ws, cents[idx])
    return cents
