"""Model-level API: ``compress_`` (in place), ``strip``, ``model_nbytes``."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from .config import ClusterConfig, row_segments
from .core.cluster import cluster_tensor
from .core.quantizers import nf4, rtn, scaled_kmeans
from .nn.modules import (
    ClusteredWeight,
    RowSplitWeight,
    is_clustered,
    swap_weight,
    unswap_weight,
)
from .nn.owners import clustered_weights, layer_type, set_module, weight_owners
from .registry import Registry
from .report.layers import CompressionReport, LayerReport

__all__ = ["clustered_weights", "compress_", "layer_type", "model_nbytes", "strip"]


def _distinct_codes(codes: torch.Tensor, n_cb: int, k: int, chunk: int = 1 << 22) -> int:
    """Most distinct codes used by any one codebook (batches of rows: bounded memory)."""
    rows = codes.reshape(n_cb, -1)
    step = max(1, chunk // max(1, rows.shape[1]))
    most = 0
    for i in range(0, n_cb, step):
        n = min(step, n_cb - i)
        part = rows[i : i + n].long() + (torch.arange(n) * k)[:, None]
        used = torch.bincount(part.reshape(-1), minlength=n * k).view(n, k) > 0
        most = max(most, int(used.sum(1).max()))
    return most


TENSOR_METHODS: Registry = Registry("tensor method")


@TENSOR_METHODS.register("exact", "optimal 1-D k-means per codebook")
@TENSOR_METHODS.register("kmeans", "Lloyd k-means per codebook")
def _cluster(data, s, sw, seed):
    if s.get("cluster_dim", 1) > 1:
        return _cluster_vector(data, s, sw, seed)
    frac = s.get("outliers") or 0.0
    idx = None
    if frac > 0:
        # Dense-and-sparse: the largest (importance-weighted) weights are kept exactly
        # and take no part in the clustering (zero weight).
        score = data.detach().float().abs().reshape(-1)
        if sw is not None:
            score = score * sw.detach().float().reshape(-1).sqrt()
        n_out = int(frac * data.numel())
        idx = score.topk(n_out).indices.sort().values if n_out else None
    fit_w = sw
    if idx is not None:
        fit_w = torch.ones_like(data, dtype=torch.float32) if sw is None else sw.float().clone()
        fit_w.view(-1)[idx] = 0.0
    ct = cluster_tensor(
        data,
        n_clusters=s["n_clusters"],
        bits=s["bits"],
        granularity=s["granularity"],
        group_size=s["group_size"],
        method=s["method"],
        init=s["init"],
        sample_weight=fit_w,
        keep_zeros=s["keep_zeros"],
        codebook_dtype=s["codebook_dtype"],
        seed=seed,
    )
    cw = ClusteredWeight.from_clustered(ct)
    mse = ct.mse
    if idx is not None:
        cw.outlier_idx = idx.to(torch.int32)
        cw.outlier_val = data.detach().reshape(-1)[idx].to(torch.float16)
        err = (cw.dense().double() - data.double()) ** 2  # cw.transpose is still False here
        w = sw.double() if sw is not None else torch.ones_like(err)
        mse = float((err * w).sum() / w.sum())
    st = {
        "mse": mse,
        "distinct": _distinct_codes(ct.codes, ct.n_codebooks, ct.n_clusters),
        "n_clusters": ct.n_clusters,
        "keep_zeros": ct.keep_zeros,
        "outliers": frac,
        "group_size": ct.group_size,
        "granularity": ct.granularity,
    }
    return cw, st


def _cluster_vector(data, s, sw, seed, scalar=None):
    """Vector codebooks (``cluster_dim`` > 1): laid out by granularity, or over
    float16-scaled groups (``scalar``: the scaled method's scalar codebook)."""
    from .core.vector import cluster_vectors
    from .nn.vector import VectorWeight

    scaled = scalar is not None
    vc = cluster_vectors(
        data,
        s["n_clusters"],
        cluster_dim=s["cluster_dim"],
        bits=s["bits"],
        granularity="tensor" if scaled else s["granularity"],
        group_size=None if scaled else s["group_size"],
        scale_group_size=(s["group_size"] or 64) if scaled else None,
        scalar=scalar or "exact",
        sample_weight=sw,
        codebook_dtype=s["codebook_dtype"],
        seed=seed,
    )
    st = {
        "mse": vc.mse,
        "distinct": _distinct_codes(vc.codes, vc.n_codebooks, vc.n_clusters),
        "n_clusters": vc.n_clusters,
        "cluster_dim": vc.cluster_dim,
        "granularity": "group" if scaled else vc.granularity,
        "group_size": vc.scale_group_size if scaled else vc.group_size,
    }
    return VectorWeight.from_clustered(vc), st


def _scaled_stats(sc, data):
    n_g = sc.scale.numel()
    codes = sc.codes.reshape(n_g, -1)
    st = {
        "mse": sc.mse,
        "distinct": _distinct_codes(codes, n_g, sc.codebook.shape[1]),
        "granularity": "group",
        "group_size": sc.group_size,
        "codebook_dtype": "float32",
    }
    return ClusteredWeight.from_scaled(sc), st


@TENSOR_METHODS.register("nf4", "NF4: fixed 16-value table, absmax scale per group (default 64)")
def _nf4(data, s, sw, seed):
    return _scaled_stats(nf4(data, s["group_size"] or 64), data)


@TENSOR_METHODS.register("rtn", "asymmetric round-to-nearest integers per group (default 128)")
def _rtn(data, s, sw, seed):
    return _scaled_stats(rtn(data, _bits(s), s["group_size"] or 128), data)


@TENSOR_METHODS.register("rtn-sym", "symmetric round-to-nearest integers per group (default 128)")
def _rtn_sym(data, s, sw, seed):
    return _scaled_stats(rtn(data, _bits(s), s["group_size"] or 128, symmetric=True), data)


@TENSOR_METHODS.register(
    "scaled-exact", "one k-means codebook per tensor over absmax-normalized groups"
)
def _scaled_exact(data, s, sw, seed):
    if s.get("cluster_dim", 1) > 1:
        return _cluster_vector(data, s, sw, seed, scalar="exact")
    return _scaled_stats(scaled_kmeans(data, _bits(s), s["group_size"] or 64, sw), data)


@TENSOR_METHODS.register(
    "scaled-lloyd",
    "one codebook per tensor over absmax-normalized groups: Lloyd from NormalFloat, -1/0/+1 kept",
)
def _scaled_lloyd(data, s, sw, seed):
    if s.get("cluster_dim", 1) > 1:
        return _cluster_vector(data, s, sw, seed, scalar="lloyd")
    return _scaled_stats(
        scaled_kmeans(data, _bits(s), s["group_size"] or 64, sw, method="lloyd"), data
    )


@TENSOR_METHODS.register(
    "scaled-fit",
    "scaled-lloyd, then each group's scale fitted to its weighted error (not the absmax), "
    "codebook learned again; twice",
)
def _scaled_fit(data, s, sw, seed):
    if s.get("cluster_dim", 1) > 1:
        return _cluster_vector(data, s, sw, seed, scalar="fit")
    return _scaled_stats(
        scaled_kmeans(data, _bits(s), s["group_size"] or 64, sw, method="lloyd", fit_scale=True),
        data,
    )


def _bits(s) -> int:
    return s["bits"] if s["bits"] is not None else max(1, (s["n_clusters"] - 1).bit_length())


def compress_(
    model: nn.Module,
    config: ClusterConfig | None = None,
    *,
    sample_weights: dict[str, torch.Tensor] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    _memo: dict | None = None,
) -> CompressionReport:
    """Cluster the selected layer weights of ``model`` in place.

    Args:
        model: any ``nn.Module``; supported layers are Linear, Conv1d, Conv2d
            (grouped/depthwise too), Embedding and transformers' Conv1D.
        config: a :class:`ClusterConfig` (default: 4 bits, per channel, exact).
        sample_weights: optional ``{module name: importance tensor of the weight's
            shape}`` for importance-weighted clustering.
        progress: optional callback ``(layer name, index, total)``.

    Returns:
        A :class:`CompressionReport` listing every layer weight (clustered or not,
        and why) with its error and bytes before/after.

    Raises:
        ValueError: a selected weight is not finite, or the model is already
            clustered.
    """
    cfg = config or ClusterConfig()
    sample_weights = sample_weights or {}
    t_start = time.perf_counter()
    report = CompressionReport()
    for name, mod in model.named_modules():
        if is_clustered(mod):
            raise ValueError(f"{name} is already clustered; compress the original model")
        if "weight_orig" in mod._parameters:  # torch.nn.utils.prune reparametrization
            raise ValueError(
                f"{name} still has a pruning mask; call wclust.stages.prune.remove_masks_(model) "
                "before compress_"
            )
    if next(model.parameters(), None) is None:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters to cluster")
    groups = weight_owners(model)
    layer_params = {id(w) for w, _ in groups}
    for i, (w, owners) in enumerate(groups):
        if progress:
            progress(owners[0][0], i, len(groups))
        entry, cw = _compress_weight(w, owners, cfg, sample_weights.get(owners[0][0]), memo=_memo)
        report.layers.append(entry)
        if cw is not None:
            for owner_name, owner in owners:
                set_module(model, owner_name, swap_weight(owner, cw))
    _count_other(model, report, layer_params)
    report.seconds = time.perf_counter() - t_start
    return report


def _compress_weight(
    w: torch.Tensor,
    owners: list,
    cfg: ClusterConfig,
    sw: torch.Tensor | None,
    materialize: Callable[[], torch.Tensor] | None = None,
    memo: dict | None = None,
) -> tuple[LayerReport, ClusteredWeight | None]:
    """Cluster one layer weight (used by all ``owners``) as ``cfg`` says.

    ``materialize``, if given, returns the weight's values once it is known to be
    clustered (``w`` may then be a meta tensor: the streaming path). ``memo`` holds
    clusterings already computed (by ``allocate_bits``), keyed by :func:`memo_key`.

    Returns:
        (its report entry, the ClusteredWeight or None when it stays dense; the
        entry's ``reason`` then says why).
    """
    name, mod = owners[0]
    ltype = layer_type(mod)
    entry = LayerReport(
        name=name,
        type=type(mod).__name__,
        shape=list(w.shape),
        status="dense",
        shared_with=[n for n, _ in owners[1:]],
        numel=w.numel(),
        bytes_before=w.numel() * w.element_size(),
        bytes_after=w.numel() * w.element_size(),
    )
    reason = _skip_reason(cfg, owners, ltype, w)
    settings = cfg.for_layer(name)
    if not reason and settings["skip"]:
        reason = "skipped by override"
    if reason:
        entry.reason = reason
        return entry, None
    if materialize is not None:
        w = materialize()
    if w.is_meta:
        raise ValueError(
            f"weight of {name} is on the meta device (no values); load the real "
            "weights (e.g. from_pretrained without device_map='meta') before clustering"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of {name} has NaN/Inf values; fix the model before clustering")
    transpose = ltype == "Conv1D"  # stored (in, out); cluster the (out, in) view
    data = w.detach().t() if transpose else w.detach()
    if sw is not None and transpose:
        sw = sw.t()
    t0 = time.perf_counter()
    try:
        if settings.get("row_split"):
            cw, st = _cluster_row_split(data, settings, sw, cfg.seed, name, memo)
        else:
            cw, st = _cluster_settings(data, settings, sw, cfg.seed, name, memo)
    except ValueError as e:
        entry.reason = f"cannot cluster: {e}"
        return entry, None
    cw.transpose = transpose
    if isinstance(cw, RowSplitWeight):
        entry.row_split = st["row_split"]
    ms = _mean_square(data)
    entry.status = "clustered"
    entry.method = settings["method"]
    entry.granularity = st.get("granularity", settings["granularity"])
    entry.group_size = st.get("group_size")
    entry.codebook_dtype = st.get("codebook_dtype", settings["codebook_dtype"])
    entry.bits = cw.bits
    entry.n_clusters = cw.n_clusters
    entry.n_codebooks = cw.n_codebooks
    entry.cluster_dim = st.get("cluster_dim")
    entry.distinct_values = st["distinct"]
    entry.mse = st["mse"]
    entry.rel_error = st["mse"] / ms if ms > 0 else 0.0
    entry.bytes_after = cw.nbytes
    entry.seconds = time.perf_counter() - t0
    return entry, cw


def memo_key(unit: str, settings: dict) -> tuple:
    """The key of one layer's (or row range's, ``unit`` = ``name[a:b]``) clustering
    with ``settings``: equal keys give equal results (the seed is the config's)."""
    return (unit, tuple(sorted((k, repr(v)) for k, v in settings.items() if k != "rows")))


def _cluster_settings(data, settings, sw, seed, unit: str = "", memo: dict | None = None):
    """One tensor clustered with one layer's settings: (ClusteredWeight, stats)."""
    meta = {k: settings[k] for k in ("method", "granularity", "group_size", "codebook_dtype")}
    if settings.get("cluster_dim", 1) > 1:
        meta["cluster_dim"] = settings["cluster_dim"]
    hit = memo.pop(memo_key(unit, settings), None) if memo else None
    cw, st = hit or TENSOR_METHODS.get(settings["method"])(data, settings, sw, seed)
    cw.meta = {**meta, **st}
    return cw, st


def _row_ranges(data, sw, settings, name):
    """``(start, end, range settings, rows of data, rows of sw or None)`` for each
    row range of a ``row_split`` layer (the (out, in) view ``data``), checked
    against its number of rows."""
    n_rows = data.shape[0]
    for seg in row_segments(settings, where=name):
        start, end = seg["rows"]
        end = n_rows if end is None else end
        if end > n_rows or start >= end:
            raise ValueError(
                f"{name}: row_split needs rows below {n_rows} (the weight's rows), got up to "
                f"{max(start, end)}"
            )
        yield start, end, seg, data[start:end], sw[start:end] if sw is not None else None


def _cluster_row_split(data, settings, sw, seed, name, memo=None):
    """The rows of ``data`` clustered range by range (``row_split``), each range as
    its own tensor: (RowSplitWeight, stats combined over the ranges, weighted)."""
    parts, stats, split = [], [], []
    for start, end, seg, part, part_sw in _row_ranges(data, sw, settings, name):
        cw, st = _cluster_settings(part, seg, part_sw, seed, f"{name}[{start}:{end}]", memo)
        total = float(part_sw.double().sum()) if part_sw is not None else float(cw.numel)
        parts.append(cw)
        stats.append((st, total))
        split.append(
            {
                "rows": [start, end],
                "bits": cw.bits,
                "group_size": st.get("group_size"),
                "method": seg["method"],
            }
        )
    weight = sum(t for _, t in stats) or 1.0
    st = {
        "mse": sum(s["mse"] * t for s, t in stats) / weight,
        "distinct": max(s["distinct"] for s, _ in stats),
        "granularity": stats[-1][0].get("granularity", settings["granularity"]),
        "group_size": stats[-1][0].get("group_size"),
        "row_split": split,
    }
    meta = {"method": settings["method"], "row_split": split}
    return RowSplitWeight(parts, meta=meta), st


def _mean_square(t: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Mean of t**2 in float64, a chunk at a time (no full float64 copy)."""
    flat = t.reshape(-1)
    total = sum(
        float(flat[i : i + chunk].double().square().sum()) for i in range(0, flat.numel(), chunk)
    )
    return total / max(1, flat.numel())


def _skip_reason(cfg: ClusterConfig, owners, ltype, w) -> str:
    for owner_name, owner in owners:
        t = layer_type(owner)
        if t not in cfg.layer_types:
            return f"layer type {t} not in layer_types"
        ok, why = cfg.selects(owner_name)
        if not ok:
            return why if owner_name == owners[0][0] else f"shared with {owner_name}: {why}"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    if w.numel() < cfg.min_numel:
        return f"smaller than min_numel={cfg.min_numel}"
    return ""


def _count_other(model: nn.Module, report: CompressionReport, layer_params: set[int]) -> None:
    """Tensors that are not layer weights; >=2-D parameters of unsupported layers are
    reported as dense layers so that nothing large goes unmentioned."""
    seen = set(layer_params)
    from .nn.vector import VectorWeight

    for mod_name, mod in model.named_modules():
        if isinstance(mod, (ClusteredWeight, VectorWeight)):
            continue
        for pname, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            if isinstance(t, nn.Parameter) and t.dim() >= 2:
                full = f"{mod_name}.{pname}" if mod_name else pname
                report.layers.append(
                    LayerReport(
                        name=full,
                        type=type(mod).__name__,
                        shape=list(t.shape),
                        status="dense",
                        reason=f"unsupported layer type {type(mod).__name__}",
                        numel=t.numel(),
                        bytes_before=nbytes,
                        bytes_after=nbytes,
                    )
                )
            elif isinstance(t, nn.Parameter):
                report.other_numel += t.numel()
                report.other_bytes += nbytes
            else:
                report.other_bytes += nbytes  # buffers: bytes, not weights


def strip(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model with dense weights (at most k distinct values per codebook).

    Shared clustered weights become one shared dense parameter.
    """
    m = model if inplace else copy.deepcopy(model)
    for _cw, owners in clustered_weights(m).values():
        param = None
        for name, mod in owners:
            plain = unswap_weight(mod)
            if param is None:
                param = plain.weight
            else:
                plain._parameters["weight"] = param
            set_module(m, name, plain)
    return m


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters and buffers the model holds in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
