"""GPTQ-style error feedback for codebook-quantized weights (Frantar et al. 2022).

Clustering picks each weight's code independently. GPTQ instead quantizes the input
columns of a layer one at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse of the layer's input Hessian
``H = X^T X`` (from calibration inputs), so the *layer output* error is minimized.
Here the grid is the layer's own learned codebook times its per-group scales (a
non-uniform grid, as in GPTQ's "any grid" form). The codebook and scales stay as
clustering chose them, unless ``refit`` asks for scales least-squares fitted to the
layer's output error for the new codes (``refit_scales``), and ``refit_codebook`` for the
codebook too (``refit_codebook``).

Use: ``hessians = collect_hessians(model, batches)`` on the original model; keep the
original weights; ``compress_`` with a per-tensor codebook method (scaled-lloyd,
scaled-exact, nf4); then ``gptq_refine_(model, hessians, originals)``.

``collect_hessians`` also takes a compressed model (the inputs its decoded weights
produce), and ``collect_cross_hessians`` the statistics for rounding toward the
original model's outputs (``gptq_refine_(..., cross=)``). Applied to every layer at
once, neither helped whisper-base at 3.25 bits (experiment log 16): the cross target
raised the KL to the original from 0.064 to 0.19-1.2, each layer making up for errors
the layers before it were re-coded to remove. In a layer-by-layer pass
(``benchmarks/gptq_sequential.py``, experiment log 17) the cross target gave a KL
28-34% below that of GPTQ on the original's statistics at 4.25 and 3.25 bits, but the
test WER stayed (4.25) or rose by 0.9 points (3.25), so the recipes do not run it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.packing import pack_codes
from ..nn.modules import ClusteredWeight, RowSplitWeight
from ..nn.owners import clustered_weights, layer_type, weight_owners
from ..nn.vector import VectorWeight
from .calibrate import input_sums

__all__ = [
    "collect_cross_hessians",
    "collect_hessians",
    "cross_target",
    "gptq_codes",
    "gptq_refine_",
    "gptvq_codes",
    "refit_codebook",
    "refit_scales",
    "vectorize_",
]


def _linear_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """``{first owner name: a Linear (or transformers Conv1D) module using the weight}``
    for every weight (original or clustered) read by such a layer."""
    mods = {}
    for _w, owners in weight_owners(model):
        linear = [m for _, m in owners if layer_type(m) in ("Linear", "Conv1D")]
        if linear:  # one Linear owner per weight is enough
            mods[owners[0][0]] = linear[0]
    for _cw, owners in clustered_weights(model).values():
        linear = [m for _, m in owners if layer_type(m) in ("Linear", "Conv1D")]
        if linear:  # a clustered module is a subclass of the layer it replaced
            mods.setdefault(owners[0][0], linear[0])
    return mods


def collect_hessians(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """``{first owner name: H = mean of x x^T over input rows}`` for every weight used
    by a Linear (or transformers Conv1D) layer; each batch is passed as
    ``model(**batch)``."""
    mods = _linear_inputs(model)
    # each batch's product in float32 (a fast GEMM; one clip's rows lose nothing that
    # GPTQ's damping would keep), summed over batches in float64
    sums = input_sums(model, batches, mods, lambda x: (x.float().T @ x.float()).double())
    return {name: (total / max(rows, 1)).float() for name, (total, rows) in sums.items()}


def collect_cross_hessians(
    model: nn.Module, reference: nn.Module, batches: Iterable
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Input statistics for GPTQ toward the original layer outputs (GPTAQ's
    asymmetric calibration, Li et al. 2025).

    A compressed model's layers see inputs that the layers before them have already
    changed. Matching ``W x`` of the original (``reference``) on its inputs ``x`` by
    ``W^ x~`` on the compressed ``model``'s inputs ``x~`` lets each layer make up for
    the error upstream instead of adding its own to it. Both models run every batch.
    The upstream error must be final when a layer's statistics are taken (a
    layer-by-layer pass): re-coding every layer at once from one model's statistics
    compensates errors that change meanwhile (see the module's docstring).

    Returns:
        ``(hessians, cross)``: ``{name: mean of x~ x~^T}`` and ``{name: mean of
        x~ x^T}`` over input rows, for every weight read by a Linear (or Conv1D)
        layer of both models (names as in :func:`collect_hessians`).
    """
    mods, ref_mods = _linear_inputs(model), _linear_inputs(reference)
    names = [n for n in mods if n in ref_mods]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sums: dict[str, tuple] = {}
    hooks = []

    def keep(m, inp, out, key):
        seen[key].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float())

    def accumulate(m, inp, out, key):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        if not seen[key]:
            raise RuntimeError(f"{key} ran in the compressed model but not in the original")
        x0 = seen[key].pop(0)
        if x0.shape != x.shape:
            raise RuntimeError(f"{key}: the two models' inputs differ in shape")
        h, c, rows = sums.get(key, (0, 0, 0))
        sums[key] = (h + (x.T @ x).double(), c + (x.T @ x0).double(), rows + x.shape[0])

    for n in names:
        hooks.append(ref_mods[n].register_forward_hook(lambda m, i, o, k=n: keep(m, i, o, k)))
        hooks.append(mods[n].register_forward_hook(lambda m, i, o, k=n: accumulate(m, i, o, k)))
    try:
        with torch.no_grad():
            for batch in batches:
                reference(**batch)
                model(**batch)
                for n in names:
                    seen[n].clear()
    finally:
        for h in hooks:
            h.remove()
    hessians = {n: (h / max(r, 1)).float() for n, (h, _c, r) in sums.items()}
    cross = {n: (c / max(r, 1)).float() for n, (_h, c, r) in sums.items()}
    return hessians, cross


def cross_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose output on the compressed model's inputs best matches the
    original's: ``argmin_v |x~ v^T - x w^T|^2 + lam |v - w|^2`` over calibration rows,
    i.e. ``v = (w c^T + lam w) (h + lam I)^-1`` (``h``: mean x~ x~^T, ``c``: mean
    x~ x^T, ``lam``: ``damp`` times the mean of ``h``'s diagonal, pulling directions
    the inputs do not pin toward ``w``). GPTQ with Hessian ``h`` then rounds toward
    it: ``|x~ w^^T - x w^T|^2`` equals ``|x~ (w^ - v)^T|^2`` plus a constant."""
    H = h.double()
    lam = damp * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    rhs = w.double() @ c.double().T + lam * w.double()  # (out, in)
    return torch.linalg.solve(H + lam * eye, rhs.T).T.float()


def _dead_inputs_zeroed(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of ``w`` and ``h`` where an input that never fired (zero Hessian
    diagonal) has a zero weight column and a unit diagonal, so the factorization holds."""
    W = w.detach().double().clone()
    H = h.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """A float64 copy of ``h`` with ``damp`` times its mean diagonal added to the diagonal."""
    H = h.detach().double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return H


def _upper_inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of ``H`` damped by ``damp`` times its mean
    diagonal: the rows GPTQ spreads each error along."""
    L = torch.linalg.cholesky(_damped(H, damp))
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    table: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """Codes of ``w`` on the grid ``table * scale`` chosen column by column with
    GPTQ error feedback.

    Args:
        w: (out, in) weight.
        h: (in, in) input Hessian (``X^T X`` / rows).
        table: (k,) ascending codebook of normalized values.
        scale: (out * in // group_size,) per-group scale, groups consecutive along in.
        group_size: must divide ``in``.
        damp: added to the diagonal, times its mean (GPTQ's percdamp).
        block: columns per lazy-update block.
        act_order: quantize the columns in order of decreasing Hessian diagonal (GPTQ's
            ``desc_act``): the inputs with the most energy are rounded first, while
            the most columns remain to absorb their error. The groups stay those of
            ``scale``, so the codes keep the layout they had.

    Returns:
        (out, in) uint8 codes into ``table``.
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_f} input columns")
    W, H = _dead_inputs_zeroed(w, h)
    group = torch.arange(in_f) // group_size  # each column's scale group
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H, group = W[:, perm], H[perm][:, perm], group[perm]
    hinv = _upper_inverse_factor(H, damp)
    s = scale.double().reshape(out_f, in_f // group_size)  # (out, groups)
    t = table.double()
    mids = 0.5 * (t[1:] + t[:-1])
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = W[:, i1:i2].clone()  # (out, b)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            sc = s[:, group[i1 + i]]
            c = torch.searchsorted(mids, (col / sc).contiguous())
            codes[:, i1 + i] = c.to(torch.uint8)
            e = (col - t[c] * sc) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes[:, perm] = codes.clone()
    return codes


def gptvq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """Codes of ``w`` on the vector grid ``codebook * scale``, ``d`` input columns at a
    time, with GPTQ error feedback (GPTVQ, van Baalen et al. 2024).

    With ``U`` the upper Cholesky factor of the damped inverse Hessian, rounding the
    ``d`` columns ``B`` of a row to ``q`` costs ``|(w_B - q) U_BB^-1|^2`` given the
    columns still free, so each d-tuple takes the centroid nearest in that metric;
    the error then flows column by column into the columns not yet rounded, as in
    :func:`gptq_codes`. With a diagonal Hessian this is the nearest centroid.

    Args:
        w: (out, in) weight.
        h: (in, in) input Hessian.
        codebook: (k, d) centroids of normalized d-tuples.
        scale: (out * in // group_size,) per-group scale, groups consecutive along in.
        group_size: a multiple of ``d`` that divides ``in``.
        damp: added to the diagonal, times its mean.
        block: columns per lazy-update block (rounded down to a multiple of ``d``).

    Returns:
        (out, in // d) int64 codes into ``codebook``.
    """
    out_f, in_f = w.shape
    d = codebook.shape[1]
    if in_f % group_size or group_size % d:
        raise ValueError(
            f"group size {group_size} must divide {in_f} input columns and be a multiple of {d}"
        )
    block = max(d, block - block % d)
    W, H = _dead_inputs_zeroed(w, h)
    hinv = _upper_inverse_factor(H, damp)
    s = scale.double().reshape(out_f, in_f // group_size)
    c = codebook.double()
    codes = torch.empty(out_f, in_f // d, dtype=torch.int64)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(0, i2 - i1, d):
            u_inv = torch.linalg.inv(h1[i : i + d, i : i + d])
            z = w1[:, i : i + d] @ u_inv  # (out, d): the tuple in the whitened metric
            cz = c @ u_inv  # (k, d): every centroid in it
            sc = s[:, (i1 + i) // group_size, None]
            # |z - s cz|^2 without the |z|^2 every centroid shares
            best = (sc * sc * (cz * cz).sum(1) - 2 * sc * (z @ cz.T)).argmin(1)
            codes[:, (i1 + i) // d] = best
            q = c[best] * sc
            for j in range(i, i + d):
                e = (w1[:, j] - q[:, j - i]) / h1[j, j]
                w1[:, j:] -= e[:, None] * h1[j, j:][None, :]
                err1[:, j] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    table: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
) -> torch.Tensor:
    """Per-group scales that minimize the layer's output error for fixed codes.

    With the codes fixed, row ``i``'s decoded weight ``table[codes[i]] * scale[i, g(j)]``
    is linear in its scales, so the scales minimizing ``(w_i - w^_i) H (w_i - w^_i)^T``
    solve one small least-squares system per row (groups x groups). Clustering fit the
    scales to the weights with nearest codes; after GPTQ has moved the codes, these
    are the scales that fit what the layer computes.

    Args:
        w: (out, in) original weight.
        h: (in, in) input Hessian.
        codes: (out, in) codes into ``table``.
        table: (k,) codebook of normalized values.
        group_size: inputs per scale group (divides ``in``).
        damp: added to the Hessian's diagonal, times its mean, as in :func:`gptq_codes`
            (a small pull toward the weight error, which keeps every system solvable).

    Returns:
        (out, in // group_size) float32 scales.
    """
    return _refit_to_values(w, h, table.double()[codes.long()], group_size, damp)


def _refit_to_values(
    w: torch.Tensor, h: torch.Tensor, t: torch.Tensor, group_size: int, damp: float
) -> torch.Tensor:
    """:func:`refit_scales` for given normalized values ``t`` ((out, in): each weight's
    codebook value, or its coordinate of a vector centroid)."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_f} input columns")
    n_groups = in_f // group_size
    t = t.double()
    H = _damped(h, damp)
    # normal equations per row: M_i[g, g'] = sum over j in g, j' in g' of
    # t_ij H_jj' t_ij', and r_i[g] = sum over j in g of t_ij (H w_i)_j
    m = torch.empty(out_f, n_groups, n_groups, dtype=torch.float64)
    for g in range(n_groups):
        cols = slice(g * group_size, (g + 1) * group_size)
        y = t[:, cols] @ H[cols, :]  # (out, in): H times row i's group-g part
        m[:, :, g] = (t * y).view(out_f, n_groups, group_size).sum(-1)
    r = (t * (w.double() @ H)).view(out_f, n_groups, group_size).sum(-1)
    eye = torch.eye(n_groups, dtype=torch.float64)
    m += 1e-12 * m.diagonal(dim1=1, dim2=2).mean() * eye  # a group whose codes are all 0
    return torch.linalg.solve(m, r).float()


def refit_codebook(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
    iters: int = 64,
) -> torch.Tensor:
    """The shared codebook that minimizes the layer's output error for fixed codes and
    scales (GPTVQ's codebook update, solved exactly rather than by gradient steps).

    Row ``i``'s decoded weight ``codebook[codes[i]] * scale[i, g(j)]`` is linear in the
    centroids, so the error ``sum_i (w_i - w^_i) H (w_i - w^_i)^T`` is a quadratic in
    them. Its normal equations (one unknown per centroid coordinate) are solved by
    conjugate gradients with a diagonal preconditioner, starting from ``codebook``: each
    step costs one (out, in) x (in, in) product, and the error never rises above the
    start's. After GPTQ has moved the codes, clustering's centroids (fit to the
    weights) are no longer the ones that fit what the layer computes.

    Args:
        w: (out, in) target weight.
        h: (in, in) input Hessian.
        codes: (out, in // d) codes into ``codebook``.
        codebook: (k,) scalar or (k, d) vector centroids of normalized weights.
        scale: (out * in // group_size,) per-group scale, groups consecutive along in.
        group_size: inputs per scale group (divides ``in``).
        damp: added to the Hessian's diagonal, times its mean, as in
            :func:`gptq_codes`.
        iters: conjugate-gradient steps at most (exact after ``k * d``).

    Returns:
        float64 centroids shaped like ``codebook``.
    """
    out_f, in_f = w.shape
    c0 = codebook.detach().double().reshape(codebook.shape[0], -1)
    k, d = c0.shape
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_f} input columns")
    H = _damped(h, damp)
    s = scale.detach().double().reshape(out_f, -1).repeat_interleave(group_size, 1)
    # every weight's index into the flattened (k, d) codebook
    idx = (codes.long().reshape(out_f, in_f // d, 1) * d + torch.arange(d)).reshape(-1)

    def expand(c):  # (k * d,) -> (out, in) decoded weight
        return c[idx].reshape(out_f, in_f) * s

    def gather(y):  # (out, in) -> (k * d,): the adjoint of expand
        return torch.zeros(k * d, dtype=torch.float64).index_add_(0, idx, (y * s).reshape(-1))

    def apply(c):  # the normal equations' matrix times c
        return gather(expand(c) @ H)

    def error(c) -> float:
        e = w.double() - expand(c)
        return float(((e @ H) * e).sum())

    b = gather(w.double() @ H)
    diag = gather(s * torch.diag(H)[None, :]).clamp_min(0)
    # a centroid no weight uses has no equation: it keeps its value
    used = diag > 0
    pre = torch.where(used, 1 / diag.clamp_min(1e-300), torch.zeros_like(diag))
    x = c0.reshape(-1).clone()
    r = b - apply(x)
    z = pre * r
    p = z.clone()
    rz = float(r @ z)
    start = error(x)
    for _ in range(iters):
        if rz <= 1e-30 * max(float(b @ (pre * b)), 1e-300):
            break
        ap = apply(p)
        alpha = rz / float(p @ ap)
        x += alpha * p
        r -= alpha * ap
        z = pre * r
        rz, rz_old = float(r @ z), rz
        p = z + (rz / rz_old) * p
    if not error(x) < start:  # rounding noise past convergence
        return c0.reshape(codebook.shape).clone()
    return x.reshape(codebook.shape)


def gptq_refine_(
    model: nn.Module,
    hessians: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    *,
    refit: int = 0,
    embed_damp: float | None = None,
    cross: dict[str, torch.Tensor] | None = None,
    cross_damp: float | None = None,
    cluster_dim: int = 1,
    refit_codebook: bool = False,
    **kw,
) -> dict[str, tuple[float, float]]:
    """Re-choose the codes of every clustered weight that has a Hessian, a shared
    codebook and per-group scales (scaled-lloyd, scaled-exact, nf4, and vector
    codebooks over scaled groups), in place.

    Args:
        model: compressed by ``compress_``.
        hessians: from :func:`collect_hessians` on the original model.
        originals: ``{first owner name: original weight}`` (as stored by the module).
        refit: rounds of re-fitting each row's scales to the layer's output error
            (:func:`refit_scales`) for the codes just chosen, each but the last
            followed by new GPTQ codes on the new grid (0: the clustering's scales).
        embed_damp: the damping for a weight that is also read as an embedding table
            (a token table tied to the output projection). Its Hessian is that of its
            use as a Linear layer, but its rows are also looked up directly, where the
            raw weight error counts; a larger damping keeps its codes nearer the
            weights. None: ``kw``'s damping.
        cross: ``{name: mean of x~ x^T}`` from :func:`collect_cross_hessians` (whose
            Hessians ``hessians`` are then): each layer rounds toward
            :func:`cross_target`, the original layer's output on the original's
            inputs, not its own weight. A weight also read as an embedding table keeps
            its own weight as the target (its rows are looked up as they are).
        cross_damp: :func:`cross_target`'s pull toward the weight. None: ``kw``'s
            damping.
        cluster_dim: above 1, first :func:`vectorize_` (scalar scaled codebooks of up to
            ``VECTOR_MAX_CODE_BITS // cluster_dim`` bits become vector codebooks of that
            many weights per code at the same
            bits); vector codebooks take :func:`gptvq_codes`.
        refit_codebook: in each ``refit`` round, after the scales, also re-fit the
            shared codebook to the layer's output error (:func:`refit_codebook`) for
            float codebooks (not a token table's: its rows are also looked up).
        kw: passed to :func:`gptq_codes` (of them, ``damp`` and ``block`` to
            :func:`gptvq_codes`).

    Returns:
        ``{name: (weight MSE before, after)}`` for every refined weight (the weight
        error grows: GPTQ trades it for a smaller output error).
    """
    if cluster_dim > 1:
        vectorize_(model, hessians, originals, cluster_dim=cluster_dim)
    done = {}
    for cw, owners in clustered_weights(model).values():
        name = owners[0][0]
        if name not in hessians or name not in originals or len(cw.shape) != 2:
            continue
        w = originals[name].detach().float()
        w = w.t() if cw.transpose else w  # (out, in) as clustered
        # a row-split weight (a token table whose row ranges have their own widths)
        # is refined part by part: rows are independent given the shared Hessian
        parts = (
            list(zip(cw.parts, cw.bounds[:-1], strict=True))
            if isinstance(cw, RowSplitWeight)
            else [(cw, 0)]
        )
        groups = [_group_size(part, w.shape[1]) for part, _ in parts]
        if None in groups:
            continue
        embedding = any(layer_type(m) == "Embedding" for _, m in owners)
        kw_w = {**kw, "damp": embed_damp} if embedding and embed_damp is not None else kw
        target = w
        if cross is not None and name in cross and not embedding:
            lam = kw.get("damp", 0.01) if cross_damp is None else cross_damp
            target = cross_target(w, hessians[name], cross[name], lam)
        before = after = 0.0
        for (part, r0), gs in zip(parts, groups, strict=True):
            rows = slice(r0, r0 + part.shape[0])
            b, a = _refine(
                part,
                w[rows],
                hessians[name],
                gs,
                refit,
                kw_w,
                target[rows],
                refit_codebook and not embedding and len(parts) == 1,
            )
            before, after = before + b * part.shape[0], after + a * part.shape[0]
        cw._dense = None  # a split's cached dense weight would be stale too
        done[name] = (before / w.shape[0], after / w.shape[0])
    return done


def _group_size(cw, in_f: int) -> int | None:
    """Inputs per scale group of a ``ClusteredWeight`` with a GPTQ grid (one codebook,
    scales per group of inputs, nothing beside), else None."""
    if cw.n_codebooks != 1 or cw.group_scale is None or cw.group_offset is not None:
        return None
    if cw.outlier_idx is not None:
        return None
    gs = cw.numel // cw.group_scale.numel()
    return gs if gs and in_f % gs == 0 else None


def _refine(
    cw, w, h, gs: int, refit: int, kw, target, codebook: bool = False
) -> tuple[float, float]:
    """GPTQ codes (and ``refit`` rounds of scales, and of the codebook if ``codebook``)
    for one ``ClusteredWeight`` or ``VectorWeight`` whose (out, in) original is ``w``
    and whose scale groups hold ``gs`` inputs, in place, rounding toward ``target``
    (``w`` itself, or :func:`cross_target`'s); ``(weight MSE to w before, after)``."""
    if isinstance(cw, VectorWeight):
        if gs % cw.cluster_dim:
            raise ValueError(f"scale groups of {gs} split the {cw.cluster_dim}-weight vectors")
        table = cw.codebook_float()[0]  # (k, d)
        vkw = {k: kw[k] for k in ("damp", "block") if k in kw}

        def choose():
            return gptvq_codes(target, h, table, cw.group_scale, gs, **vkw)
    else:
        table = cw.codebook[0].float()

        def choose():
            return gptq_codes(target, h, table, cw.group_scale, gs, **kw)

    def values(codes):  # (out, in) normalized value of every weight
        return table[codes.long()].reshape(w.shape)

    def mse(codes) -> float:
        scale = cw.group_scale.float().repeat_interleave(gs).view(w.shape)
        return float(((values(codes) * scale - w) ** 2).mean())

    before = mse(cw.codes())
    codes = choose()
    for r in range(refit):  # new scales for these codes, then new codes on them
        old = cw.group_scale.float().reshape(-1)
        new = _refit_to_values(target, h, values(codes), gs, kw.get("damp", 0.01)).reshape(-1)
        # a scale the solve cannot pin (a group whose codes are all zero) stays
        new = torch.where(torch.isfinite(new) & (new.abs() > 1e-8 * old.abs()), new, old)
        with torch.no_grad():
            cw.group_scale.copy_(new.reshape(cw.group_scale.shape))
        if codebook and cw.codebook_scale is None and cw.codebook.dtype.is_floating_point:
            damp = kw.get("damp", 0.01)
            c = refit_codebook(target, h, codes, table, cw.group_scale, gs, damp=damp)
            with torch.no_grad():
                cw.codebook[0].copy_(c.reshape(cw.codebook[0].shape).to(cw.codebook.dtype))
                table.copy_(cw.codebook[0].float().reshape(table.shape))
        if r < refit - 1:
            codes = choose()
    cw.set_packed(pack_codes(codes, cw.bits))
    cw._dense = None  # a cached dense weight would be stale
    return before, mse(codes)


# scalar methods whose codebook a vector codebook can start from (``cluster_vectors``'
# ``scalar``), and the widest vector code made: 256 centroids (pairs of 4-bit weights,
# quads of 2-bit ones), the most the compiled kernel keeps in registers
_VECTOR_START = {"scaled-fit": "fit", "scaled-exact": "exact", "scaled-lloyd": "lloyd"}
VECTOR_MAX_CODE_BITS = 8


def vector_codebook_extra(bits: int, cluster_dim: int) -> int:
    """Bytes a float16 vector codebook of ``bits`` per weight and ``cluster_dim``
    weights per code takes beyond the float32 scalar codebook it replaces (what
    :func:`vectorize_` adds to a layer)."""
    return 2 ** (bits * cluster_dim) * cluster_dim * 2 - 2**bits * 4


def vectorize_(
    model: nn.Module,
    hessians: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    *,
    cluster_dim: int = 2,
) -> list[str]:
    """Turn scalar scaled codebooks into vector codebooks at the same bits, in place.

    Every 2-D weight with a Hessian, one scalar codebook of at most
    ``VECTOR_MAX_CODE_BITS // cluster_dim`` bits from a scaled method and scales per group of inputs (a
    multiple of ``cluster_dim``) is clustered again from its original: ``cluster_dim``
    consecutive weights per code, ``2**(bits * cluster_dim)`` float16 centroids, the
    same scale groups, each weight weighted by its input's energy (the Hessian's
    diagonal). Weights read as embedding tables keep their scalar codebooks.

    Returns:
        The names of the weights turned into vectors.
    """
    from ..core.vector import cluster_vectors

    done = []
    for cw, owners in clustered_weights(model).values():
        name = owners[0][0]
        if type(cw) is not ClusteredWeight or len(cw.shape) != 2:
            continue  # row-split, vector, or not a matrix
        if cw.bits * cluster_dim > VECTOR_MAX_CODE_BITS:
            continue
        start = _VECTOR_START.get(cw.meta.get("method"))
        if start is None or name not in hessians or name not in originals:
            continue
        if any(layer_type(m) == "Embedding" for _, m in owners):
            continue
        w = originals[name].detach().float()
        w = w.t() if cw.transpose else w
        gs = _group_size(cw, w.shape[1])
        if gs is None or gs % cluster_dim:
            continue
        h = hessians[name]
        energy = torch.diag(h).float().clamp_min(0)[None, :].expand_as(w).contiguous()
        dtype = cw.meta.get("codebook_dtype", "float32")
        dtype = "float16" if dtype == "float32" else dtype  # halves the larger codebook
        vc = cluster_vectors(
            w,
            cluster_dim=cluster_dim,
            bits=cw.bits,
            scale_group_size=gs,
            scalar=start,
            sample_weight=energy,
            codebook_dtype=dtype,
        )
        meta = {**cw.meta, "cluster_dim": cluster_dim, "codebook_dtype": dtype}
        vw = VectorWeight.from_clustered(vc, transpose=cw.transpose, meta=meta)
        for _, mod in owners:
            mod._modules["clustered"] = vw
        done.append(name)
    return done
