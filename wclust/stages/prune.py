"""Magnitude pruning, to combine with clustering (``keep_zeros=True``).

Deep Compression prunes, retrains with the pruned weights held at zero, then
clusters. ``prune_(..., mask=True)`` keeps ``torch.nn.utils.prune`` masks on the
layers so that retraining cannot revive a pruned weight; ``remove_masks_`` makes the
zeros permanent before ``compress_``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from ..nn.owners import weight_owners

__all__ = ["has_masks", "prune_", "remove_masks_", "sparsity"]


def _amount_for(amount, name: str) -> float | None:
    if not isinstance(amount, dict):
        return amount
    for pat, a in amount.items():  # first matching glob wins
        if pat == name or fnmatch.fnmatchcase(name, pat):
            return a
    return None


def prune_(
    model: nn.Module,
    amount: float | dict[str, float],
    *,
    scope: str = "layer",
    include=None,
    mask: bool = False,
) -> dict:
    """Zero the smallest-magnitude weights of supported layers, in place.

    Args:
        model: any module; the weights of Linear/Conv/Embedding/Conv1D layers are pruned.
        amount: fraction of weights to zero, in [0, 1); for ``scope="layer"`` also
            ``{module-name glob: fraction}`` (first match wins; unmatched layers are
            left alone), as Deep Compression prunes each layer by its own rate.
        scope: "layer" (the fraction in every layer) or "global" (one threshold
            over all selected weights).
        include: optional predicate on the module name.
        mask: keep a ``torch.nn.utils.prune`` mask on each pruned layer, so that the
            pruned weights stay zero while the model is retrained; call
            :func:`remove_masks_` before ``compress_``.

    Returns:
        ``{module name: fraction of zeros}``.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(amount, dict) and scope != "layer":
        raise ValueError("a per-layer amount {glob: fraction} needs scope='layer'")
    for a in amount.values() if isinstance(amount, dict) else [amount]:
        if not isinstance(a, (int, float)) or not 0 <= a < 1:
            raise ValueError(f"amount must be in [0, 1), got {a}")
    groups = [
        (w, owners)
        for w, owners in weight_owners(model)
        if include is None or include(owners[0][0])
    ]
    if mask:
        shared = [owners[0][0] for _, owners in groups if len(owners) > 1]
        if shared:
            raise ValueError(
                f"{shared[0]} shares its weight with another module; a pruning mask "
                "would untie it: use mask=False for tied weights"
            )
    todo = [(w, owners[0], _amount_for(amount, owners[0][0])) for w, owners in groups]
    todo = [t for t in todo if t[2] is not None]
    thr = None
    if scope == "global" and todo:
        mags = torch.cat([w.detach().abs().reshape(-1) for w, _, _ in todo])
        k = int(amount * mags.numel())
        thr = mags.kthvalue(k).values if k > 0 else None
    out = {}
    with torch.no_grad():
        for w, (name, mod), a in todo:
            if scope == "layer":
                k = int(a * w.numel())
                thr = w.abs().reshape(-1).kthvalue(k).values if k > 0 else None
            keep = w.abs() > thr if thr is not None else torch.ones_like(w, dtype=torch.bool)
            if mask:
                tprune.custom_from_mask(mod, "weight", keep)
            else:
                w.masked_fill_(~keep, 0.0)
            out[name] = float((~keep).float().mean())
    return out


def has_masks(model: nn.Module) -> bool:
    """Whether any module still carries a ``torch.nn.utils.prune`` mask."""
    return any(
        isinstance(h, tprune.BasePruningMethod)
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
    )


def remove_masks_(model: nn.Module) -> int:
    """Make pruning masks permanent (weight = weight_orig * mask); returns how many."""
    n = 0
    for mod in model.modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(mod, hook._tensor_name)
                n += 1
    return n


def sparsity(model: nn.Module) -> dict[str, float]:
    """``{module name: fraction of exact zeros}`` of every supported layer weight
    (clustered weights included: their rebuilt values are counted)."""
    from ..nn.owners import clustered_weights

    out = {}
    for w, owners in weight_owners(model):
        out[owners[0][0]] = float((w == 0).float().mean())
    for cw, owners in clustered_weights(model).values():
        with torch.no_grad():
            out[owners[0][0]] = float((cw.dense() == 0).float().mean())
    return out
