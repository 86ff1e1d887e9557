"""Magnitude pruning, to combine with clustering (``keep_zeros=True``)."""

from __future__ import annotations

import torch
from torch import nn

from .api import _weight_owners

__all__ = ["prune_"]


def prune_(model: nn.Module, amount: float, *, scope: str = "layer", include=None) -> dict:
    """Zero the smallest-magnitude weights of supported layers, in place.

    Args:
        model: any module; the weights of Linear/Conv/Embedding/Conv1D layers are pruned.
        amount: fraction of weights to zero, in [0, 1).
        scope: "layer" (the fraction in every layer) or "global" (one threshold
            over all selected weights).
        include: optional predicate on the module name.

    Returns:
        ``{module name: fraction of zeros}``.
    """
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    groups = [
        (w, owners[0][0])
        for w, owners in _weight_owners(model)
        if include is None or include(owners[0][0])
    ]
    if scope == "global" and groups:
        mags = torch.cat([w.detach().abs().reshape(-1) for w, _ in groups])
        k = int(amount * mags.numel())
        thr = mags.kthvalue(k).values if k > 0 else None
    out = {}
    with torch.no_grad():
        for w, name in groups:
            if scope == "layer":
                k = int(amount * w.numel())
                thr = w.abs().reshape(-1).kthvalue(k).values if k > 0 else None
            if thr is not None:
                w.masked_fill_(w.abs() <= thr, 0.0)
            out[name] = float((w == 0).float().mean())
    return out
