"""Bits where they matter: per-layer bit widths (and scale groups) under an
average-bits budget.

Each selected layer is clustered with every candidate setting (a width, or a
width and a scale-group size); its predicted loss increase is the
importance-weighted squared error ``sum_i F_i (w_i - q(w_i))^2`` (a second-order
Taylor estimate when F is the Fisher diagonal; plain squared error without
calibration). Starting from the cheapest setting everywhere, the change with the
largest predicted-loss reduction per extra byte is taken until the budget, counted
over *every* tensor of the model (codes, codebooks, scales, outliers, layers left
dense, biases, norms), is spent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from ..api import TENSOR_METHODS, _row_ranges, _skip_reason, memo_key
from ..config import ClusterConfig
from ..nn.owners import layer_type, weight_owners

__all__ = ["EMBED_ROWS", "GROUP_CANDIDATES", "WIDTHS", "allocate_bits", "token_embedding_split"]

WIDTHS = (2, 3, 4, 5, 6, 8)  # default candidates: bits only

# (bits, group size) settings for methods with per-group scales: the default of
# ``wclust compress --target-bits`` (docs/experiments, whisper-base quality log, 1e).
GROUP_CANDIDATES = ((3, 128), (4, 128), (4, 64), (5, 64), (8, 64))


# Where ``token_embedding_split`` cuts a token embedding: token ids follow BPE merge
# order, so the first rows are the frequent tokens (docs/experiments, whisper-base quality log, 1g).
EMBED_ROWS = (4000, 16000, 32000)


def token_embedding_split(model: nn.Module, rows: tuple[int, ...] = EMBED_ROWS) -> dict:
    """``row_split`` overrides for the model's token embeddings (modules named
    ``*embed_tokens``, ``*word_embeddings``, ``*.wte``), cut at those of ``rows``
    below their number of rows, so that ``allocate_bits`` can give the frequent
    tokens' rows more bits than the rare ones'. Empty when none is large enough."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Embedding) or not any(
            fnmatch.fnmatchcase(name, g) for g in ("*embed_tokens", "*word_embeddings", "*.wte")
        ):
            continue
        cuts = [r for r in rows if r < mod.num_embeddings]
        if cuts:
            out[name] = {"row_split": [{"until": r} for r in cuts]}
    return out


def allocate_bits(
    model: nn.Module,
    target_bits: float,
    config: ClusterConfig | None = None,
    *,
    sample_weights: dict[str, torch.Tensor] | None = None,
    candidates: tuple[int | tuple[int, int], ...] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    memo: dict | None = None,
) -> tuple[ClusterConfig, dict]:
    """Choose bits per layer so the whole model averages at most ``target_bits``.

    Args:
        model: the uncompressed model (not modified).
        target_bits: average bits per weight over all parameters, everything counted.
        config: base settings (granularity, method, outliers, selection, ...).
        sample_weights: importance per weight (from ``calibrate``); uniform if None.
        candidates: settings to choose from: widths, or ``(bits, group_size)`` pairs
            (for methods with per-group scales: fewer, larger groups cost less), or
            ``(bits, group_size, cluster_dim)`` triples (vector codebooks of that many
            weights per code; group_size may be None); default ``WIDTHS``.
        progress: callback ``(layer name, index, total)``.
        memo: if given, filled with the clustering of each layer (or row range) at the
            setting chosen for it, keyed as ``compress_(..., _memo=memo)`` looks it
            up, so the clustering stage does not compute it again.

    A layer with a ``row_split`` override chooses a setting for each of its row
    ranges (``bits`` and ``summary`` name them ``layer[start:end]``).

    Returns:
        (config with one ``bits`` (and ``group_size``) override per selected layer,
        summary dict with the chosen widths (``bits``), group sizes (``group_size``,
        when candidates give them), predicted loss and the bits per weight it will
        cost).

    Raises:
        ValueError: the budget is below what the smallest width already costs.
    """
    cfg = config or ClusterConfig()
    # every candidate as (bits, group size or None, cluster_dim or None)
    cands = [
        (*c, None)[:3] if isinstance(c, tuple) else (c, None, None) for c in candidates or WIDTHS
    ]
    tried: dict = {}  # (unit, setting) -> (memo key, ClusteredWeight, stats)
    options, splits, fixed, total_numel = _options(
        model, cfg, cands, sample_weights or {}, progress, tried if memo is not None else None
    )
    budget = target_bits * total_numel / 8 - fixed
    used = sum(o[0][1] for o in options.values())
    if used > budget:
        b, gs, dim = cands[0]
        cheapest = f"{b}-bit" + (f" in groups of {gs}" if gs else "")
        cheapest += f" with cluster_dim {dim}" if dim else ""
        raise ValueError(
            f"target {target_bits} bits/weight is below what {cheapest} everywhere "
            f"costs ({8 * (used + fixed) / total_numel:.3f} bits/weight)"
        )
    choice, used = _greedy(options, used, budget)
    chosen = {n: options[n][j][0] for n, j in choice.items()}
    if memo is not None:
        for n, setting in chosen.items():
            key, cw, st = tried[n, setting]
            memo[key] = (cw, st)
    tried.clear()
    summary = {
        "bits": {n: b for n, (b, _, _) in chosen.items()},
        "predicted_loss": sum(options[n][j][2] for n, j in choice.items()),
        "bits_per_weight": 8 * (used + fixed) / total_numel,
        "target_bits": target_bits,
    }
    if any(gs is not None for _, gs, _ in cands):
        summary["group_size"] = {n: gs for n, (_, gs, _) in chosen.items()}
    if any(dim is not None for _, _, dim in cands):
        summary["cluster_dim"] = {n: dim or 1 for n, (_, _, dim) in chosen.items()}
    return _with_choices(cfg, chosen, splits), summary


def _options(model, cfg, cands, sample_weights, progress, tried):
    """Each selectable unit (a layer, or a row range of a split layer) clustered at
    every candidate setting.

    Returns ``(options, splits, fixed, total_numel)``: per unit its candidates as
    ``(setting, bytes, predicted loss)`` sorted by bytes; the split layers' unit
    names; the bytes of everything not chosen for (other tensors, layers left dense);
    the model's number of parameters. ``tried`` (if not None) gets every clustering,
    keyed ``(unit, setting)``.
    """
    groups = weight_owners(model)
    total_numel = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layer_ids = {id(w) for w, _ in groups}
    fixed = 0  # bytes of everything that is not a selected layer weight
    for t in {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values():
        if id(t) not in layer_ids:
            fixed += t.numel() * t.element_size()
    options: dict[str, list[tuple[tuple[int, int | None, int | None], int, float]]] = {}
    splits: dict[str, list[str]] = {}  # split layer: its ranges' unit names
    for i, (w, owners) in enumerate(groups):
        name = owners[0][0]
        settings = cfg.for_layer(name)
        reason = _skip_reason(cfg, owners, layer_type(owners[0][1]), w) or (
            "skip" if settings["skip"] else ""
        )
        if reason:
            fixed += w.numel() * w.element_size()
            continue
        if progress:
            progress(name, i, len(groups))
        conv1d = layer_type(owners[0][1]) == "Conv1D"
        data = w.detach().t() if conv1d else w.detach()
        sw = sample_weights.get(name)
        if sw is not None and conv1d:
            sw = sw.t()
        units = [(name, data, sw, settings)]
        if settings.get("row_split"):  # each row range chooses its own setting
            units = [
                (f"{name}[{a}:{e}]", part, part_sw, seg)
                for a, e, seg, part, part_sw in _row_ranges(data, sw, settings, name)
            ]
            splits[name] = [u for u, *_ in units]
        unit_opts = {
            u: _unit_options(u, d, usw, seg, cands, cfg.seed, tried) for u, d, usw, seg in units
        }
        if not all(unit_opts.values()):  # no candidate fits a unit: the layer stays dense
            fixed += w.numel() * w.element_size()
            splits.pop(name, None)
            continue
        options.update(unit_opts)
    return options, splits, fixed, total_numel


def _unit_options(unit, data, sw, settings, cands, seed, tried) -> list:
    """``(setting, bytes, predicted loss)`` of each candidate that applies to one
    unit, sorted by bytes (then loss)."""
    opts = []
    total_w = float(sw.double().sum()) if sw is not None else float(data.numel())
    for b, gs, dim in cands:
        s = {**settings, "bits": b, "n_clusters": None}
        if gs is not None:
            s["group_size"] = gs
        if dim is not None:
            s["cluster_dim"] = dim
        try:
            cw, st = TENSOR_METHODS.get(s["method"])(data, s, sw, seed)
        except ValueError:
            continue
        opts.append(((b, gs, dim), cw.nbytes, st["mse"] * total_w))
        if tried is not None:
            tried[unit, (b, gs, dim)] = (memo_key(unit, s), cw, st)
    return sorted(opts, key=lambda o: (o[1], o[2]))


def _greedy(options: dict, used: int, budget: float) -> tuple[dict, int]:
    """From the cheapest setting everywhere, take the move with the largest
    predicted-loss drop per extra byte until none fits the budget; returns each
    unit's chosen option index and the bytes used."""
    choice = {n: 0 for n in options}
    while True:
        best, best_gain = None, 0.0
        for n, opts in options.items():
            j = choice[n]
            for jj in range(j + 1, len(opts)):
                extra = opts[jj][1] - opts[j][1]
                if used + extra > budget:
                    break  # sorted by bytes: the rest cost more
                gain = (opts[j][2] - opts[jj][2]) / max(extra, 1)
                if gain > best_gain:
                    best, best_gain = (n, jj), gain
        if best is None:
            return choice, used
        n, jj = best
        used += options[n][jj][1] - options[n][choice[n]][1]
        choice[n] = jj


def _with_choices(cfg: ClusterConfig, chosen: dict, splits: dict) -> ClusterConfig:
    """``cfg`` with each chosen setting as a per-layer override (a split layer's
    ranges inside its ``row_split``, the user's other fields kept)."""
    overrides = dict(cfg.overrides)

    def _setting(b, gs, dim):
        out = {"bits": b} if gs is None else {"bits": b, "group_size": gs}
        return out if dim is None else {**out, "cluster_dim": dim}

    in_split = {u for units in splits.values() for u in units}
    for n, setting in chosen.items():
        if n not in in_split:
            overrides[n] = {**overrides.get(n, {}), **_setting(*setting)}
    for n, units in splits.items():
        user = cfg.for_layer(n)["row_split"]  # the user's ranges (their other fields kept)
        split = [{**seg, **_setting(*chosen[u])} for seg, u in zip(user, units[:-1], strict=True)]
        overrides[n] = {**overrides.get(n, {}), **_setting(*chosen[units[-1]]), "row_split": split}
    return cfg.replace(overrides=overrides)
