"""Codebooks with per-group scales: NF4, round-to-nearest integers, and k-means over
scale-normalized groups. Pure tensor code.

Every result is a :class:`ScaledCodes`: the weight ``w`` of a group ``g`` is

    w[g, i] = codebook[codes[g, i]] * scale[g] + offset[g]

with one small codebook shared by the whole tensor. This is the storage that
quantizers use (NF4: a fixed 16-value table; int RTN: ``arange(2**b)`` with an
affine scale/offset), so clustering and quantization share one module type, one
file format and one measurement. Scales and offsets are stored in float16, as in
the usual "4.25 bits per weight" accounting for groups of 64 (one scale) or 128
(scale + offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codebook import cluster_scalar
from .kmeans import argsort_f32, lloyd_sorted

__all__ = [
    "NF4_TABLE",
    "ScaledCodes",
    "fit_scales",
    "nf4",
    "normal_float_table",
    "rtn",
    "scaled_kmeans",
]

# Candidate scales for ``fit_scales``, as fractions of a group's absmax.
# The smallest positive float16 (a subnormal): a scale that rounds to zero would turn a
# group of equal values (e.g. a zero row) into 0/0.
_FP16_MIN = 2.0**-24

SCALE_GRID = tuple(0.70 + 0.02 * i for i in range(21))  # 0.70 .. 1.10

# QLoRA's NormalFloat4 (Dettmers et al. 2023): quantiles of N(0,1), scaled to [-1, 1].
NF4_TABLE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


def normal_float_table(bits: int) -> torch.Tensor:
    """QLoRA's NormalFloat construction for any width: ``2**(b-1)`` positive and
    ``2**(b-1) - 1`` negative quantiles of N(0, 1), plus an exact 0, scaled to
    [-1, 1] (ascending). ``normal_float_table(4)`` is NF4."""
    if not 1 < bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    half = 1 << (bits - 1)
    offset = 0.5 * (1 / 32 + 1 / 30)  # QLoRA's choice (0.9677 after 1 - offset)
    p = torch.linspace(1 - offset, 0.5, half + 1, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p)
    n = torch.linspace(1 - offset, 0.5, half, dtype=torch.float64)[:-1]
    neg = -torch.special.ndtri(n)
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (v / v.abs().max()).sort().values.float()


@dataclass
class ScaledCodes:
    """Codes + one shared codebook + per-group float16 scale (and offset)."""

    codes: torch.Tensor  # uint8, the weight's shape
    codebook: torch.Tensor  # (1, k) float32
    scale: torch.Tensor  # (n_groups,) float16
    offset: torch.Tensor | None  # (n_groups,) float16 or None
    group_size: int
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    mse: float

    def dequantize(self) -> torch.Tensor:
        g = self.scale.numel()
        v = self.codebook[0][self.codes.reshape(g, -1).long()]
        v = v * self.scale.float()[:, None]
        if self.offset is not None:
            v = v + self.offset.float()[:, None]
        return v.reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        n = math.ceil(math.prod(self.shape) * self.bits / 8) + self.codebook.numel() * 4
        n += 2 * self.scale.numel() + (2 * self.offset.numel() if self.offset is not None else 0)
        return n


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Consecutive elements of the flattened (row-major) tensor, as bitsandbytes
    groups them: the same groups as per-channel grouping whenever the group size
    divides a channel, and still defined when it only divides the whole tensor."""
    numel = x.numel()
    if not isinstance(group_size, int) or group_size < 1 or numel % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {numel} elements of shape "
            f"{tuple(x.shape)}"
        )
    return x.detach().float().reshape(numel // group_size, group_size)


def _finish(x, rows, codes, codebook, scale, offset, group_size, bits, weight=None):
    sc = ScaledCodes(
        codes.to(torch.uint8).reshape(x.shape),
        codebook.float()[None, :],
        scale,
        offset,
        group_size,
        bits,
        tuple(x.shape),
        x.dtype,
        0.0,
    )
    err = (sc.dequantize().float().reshape(rows.shape) - rows) ** 2
    w = weight if weight is not None else torch.ones_like(err)
    sc.mse = float((err * w).sum() / w.sum())
    return sc


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending ``table`` for every value (a
    (rows, k) table: of its own row of the table for each row of ``values``)."""
    mids = 0.5 * (table[..., 1:] + table[..., :-1])
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def nf4(x: torch.Tensor, group_size: int = 64) -> ScaledCodes:
    """NF4: each group scaled by its absmax onto the fixed 16-value NF4 table."""
    rows = _groups(x, group_size)
    scale = rows.abs().amax(1).clamp_min(_FP16_MIN).half()
    s = scale.float()[:, None]
    codes = _nearest(rows / s, NF4_TABLE)
    return _finish(x, rows, codes, NF4_TABLE, scale, None, group_size, 4)


def rtn(x: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False) -> ScaledCodes:
    """Round-to-nearest integer quantization per group.

    Asymmetric: ``w = (q - zero) * scale`` with q in [0, 2**bits) (stored as
    codebook ``arange``, scale and offset ``-zero*scale``). Symmetric: q in
    [-(2**(b-1)-1), 2**(b-1)-1], absmax scale, no offset.
    """
    rows = _groups(x, group_size)
    levels = 1 << bits
    if symmetric:
        qmax = levels // 2 - 1
        scale = (rows.abs().amax(1) / qmax).clamp_min(_FP16_MIN).half()
        q = torch.round(rows / scale.float()[:, None]).clamp(-qmax, qmax)
        table = torch.arange(-(levels // 2), levels // 2, dtype=torch.float32)
        return _finish(x, rows, q + levels // 2, table, scale, None, group_size, bits)
    lo, hi = rows.amin(1), rows.amax(1)
    scale = ((hi - lo) / (levels - 1)).clamp_min(_FP16_MIN).half()
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, levels - 1)
    offset = (-zero * s).half()
    q = torch.round((rows - offset.float()[:, None]) / s[:, None]).clamp(0, levels - 1)
    table = torch.arange(levels, dtype=torch.float32)
    return _finish(x, rows, q, table, scale, offset, group_size, bits)


def fit_scales(
    rows: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor | None = None,
    grid: tuple[float, ...] = SCALE_GRID,
) -> torch.Tensor:
    """Per-group float16 scale minimizing the (weighted) error of ``rows`` against
    ``table[codes] * scale`` with nearest codes, instead of the absmax.

    Each group tries every ``grid`` fraction of its absmax (codes re-chosen each time;
    as llama.cpp's and HQQ's scale searches do), keeps the best, then takes one
    least-squares step ``s = sum(w x t) / sum(w t^2)`` for its codes ``t`` where that
    lowers the error further. Never worse than the absmax scale (1.0 is always tried).

    Args:
        rows: (groups, group_size) float32 values.
        table: (k,) ascending codebook of normalized values.
        weight: importance of each value, ``rows``' shape; uniform if None.
        grid: fractions of the absmax to try.

    Returns:
        (groups,) float16 scales.
    """
    t = table.float()
    w = torch.ones_like(rows) if weight is None else weight.float()
    amax = rows.abs().amax(1).clamp_min(1e-12)

    def err_of(s):
        q = t[_nearest(rows / s[:, None], t)] * s[:, None]
        return ((q - rows) ** 2 * w).sum(1)

    # candidates (groups, 1 + len(grid)): the absmax, then each fraction of it
    cand = torch.stack(
        [amax.half().float()] + [(amax * f).clamp_min(1e-12).half().float() for f in grid], 1
    )
    errs = _grid_errors(rows, w, t, cand)
    best_s, best = cand[:, 0], errs[:, 0]
    for j in range(1, cand.shape[1]):  # in grid order, a later one only if strictly better
        better = errs[:, j] < best
        best = torch.where(better, errs[:, j], best)
        best_s = torch.where(better, cand[:, j], best_s)
    tq = t[_nearest(rows / best_s[:, None], t)]
    den = (w * tq * tq).sum(1)
    ls = torch.where(den > 0, (w * rows * tq).sum(1) / den.clamp_min(1e-30), best_s)
    ls = ls.abs().clamp_min(1e-12).half().float()
    e = err_of(ls)
    return torch.where(e < best, ls, best_s).half()


def _grid_errors(
    rows: torch.Tensor, w: torch.Tensor, table: torch.Tensor, cand: torch.Tensor
) -> torch.Tensor:
    """(groups, n) weighted squared error of each group at each candidate scale, codes
    nearest in ``table``: one fused pass per group (numba, compiled once and cached
    on disk) instead of a full-size temporary per candidate."""
    from ._scales import grid_errors

    mids = (0.5 * (table[1:] + table[:-1])).float().contiguous()
    out = grid_errors(
        rows.float().contiguous().numpy(),
        w.float().expand_as(rows).contiguous().numpy(),
        table.float().contiguous().numpy(),
        mids.numpy(),
        cand.float().contiguous().numpy(),
    )
    return torch.from_numpy(out).float()


def scaled_kmeans(
    x: torch.Tensor,
    bits: int,
    group_size: int = 64,
    sample_weight: torch.Tensor | None = None,
    method: str = "exact",
    anchors: bool = True,
    iters: int = 100,
    fit_scale: bool = False,
    rounds: int = 2,
) -> ScaledCodes:
    """One learned codebook per tensor over absmax-normalized groups (as in any4).

    Each group is divided by its absmax (float16 scale); the normalized values of the
    whole tensor are clustered into ``2**bits`` centroids minimizing the error of
    the *real* weights: weight ``scale**2`` (times ``sample_weight`` if given).

    Args:
        x: float tensor; ``group_size`` must divide its number of elements.
        bits: codebook size ``2**bits``.
        group_size: consecutive elements sharing one scale.
        sample_weight: importance of each weight (e.g. Fisher), x's shape.
        method: "exact" (optimal k-means of the normalized values) or "lloyd"
            (weighted Lloyd started from the NormalFloat table of that width).
        anchors: for "lloyd": keep -1, 0 and +1 as centroids, so every group's
            largest-magnitude weight and every zero stay exact (as in NF4).
        iters: for "lloyd": at most this many iterations.
        fit_scale: after learning the codebook, choose each group's scale to minimize
            its weighted error (``fit_scales``) instead of keeping the absmax, then
            learn the codebook again on the new normalization; ``rounds`` times.
            Lowers the weighted error; the largest weight of a group is then no
            longer exact.
        rounds: scale/codebook alternations when ``fit_scale``.
    """
    if method not in ("exact", "lloyd"):
        raise ValueError(f"method must be 'exact' or 'lloyd', got {method!r}")
    rows = _groups(x, group_size)
    sw = None if sample_weight is None else sample_weight.detach().float().reshape(rows.shape)
    # float16 scales floored at its smallest normal value: 1e-12 would round to 0
    # and a group of zeros (e.g. a padding embedding row) would divide 0 by 0
    floor = torch.finfo(torch.float16).tiny
    scale = rows.abs().amax(1).half().clamp_min(floor)
    table = None
    if method == "lloyd":
        nf = normal_float_table(bits)  # the start, and the centroids the anchors keep
        fixed = (nf == -1) | (nf == 0) | (nf == 1)
        if not anchors:
            fixed = torch.zeros_like(fixed)
    for r in range(rounds + 1 if fit_scale else 1):
        if r:
            scale = fit_scales(rows, table, sw).clamp_min(floor)
        s = scale.float()[:, None]
        normed = rows / s
        w = s.expand_as(rows) ** 2
        if sw is not None:
            w = w * sw
        if method == "exact":
            table = cluster_scalar(normed, bits=bits, method="exact", sample_weight=w).codebook[0]
        else:
            init = nf if table is None else table  # later rounds start where it ended
            order = argsort_f32(normed.reshape(-1))
            xs = normed.reshape(-1)[order].double()[None]
            ws = w.reshape(-1)[order].double()[None]
            table = lloyd_sorted(xs, ws, init.double()[None], iters, fixed[None])[0].float()
    codes = _nearest(normed, table)
    return _finish(x, rows, codes, table, scale, None, group_size, bits, weight=sw)
