"""Sensitivity of each weight, from a few calibration examples.

``calibrate`` returns ``{module name: importance tensor of the weight's shape}`` for
``compress_(..., sample_weights=...)``: clustering then minimizes the
importance-weighted error instead of the plain weight error.

- ``"fisher"``: the diagonal of the empirical Fisher information, the mean squared
  gradient of the model's own loss (SqueezeLLM, Kim et al. 2023): a second-order
  estimate of how much the loss grows when a weight moves.
- ``"activation"``: the mean squared input of each input column (the diagonal of
  X^T X, as in GPTQ/AWQ): how much a column's error reaches the layer output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..nn.owners import layer_type, weight_owners

__all__ = ["calibrate", "input_sums"]


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    kind: str = "fisher",
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-weight importance from calibration batches.

    Args:
        model: the uncompressed model.
        batches: iterable of inputs; each is passed to ``loss_fn(model, batch)`` or,
            by default, as keyword arguments ``model(**batch).loss`` (so it must hold
            labels) for "fisher", and ``model(**batch)`` for "activation".
        kind: "fisher" or "activation".
        loss_fn: optional custom loss.

    Returns:
        ``{module name: float32 tensor of the weight's shape}``, keyed by the first
        owner of each (possibly shared) weight, averaged over batches.
    """
    if kind not in ("fisher", "activation"):
        raise ValueError(f"kind must be 'fisher' or 'activation', got {kind!r}")
    groups = weight_owners(model)
    if kind == "fisher":
        return _fisher(model, batches, loss_fn, groups)
    return _activation(model, batches, groups)


def _fisher(model, batches, loss_fn, groups):
    was_training = model.training
    model.eval()
    params = [w for w, _ in groups]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = 0
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            loss.backward()
            for a, p in zip(acc, params, strict=True):
                if p.grad is not None:
                    a += p.grad.detach().float() ** 2
            n += 1
    finally:
        for p in params:
            p.grad = None
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration needs at least one batch")
    return {owners[0][0]: a / n for a, (_, owners) in zip(acc, groups, strict=True)}


def input_sums(
    model: nn.Module,
    batches: Iterable,
    modules: dict[str, nn.Module],
    stat: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, tuple[torch.Tensor, int]]:
    """Run ``model(**batch)`` on every batch (no gradients) and sum ``stat(x)`` over the
    inputs ``x`` (detached, reshaped to rows x features) of each named module.

    Returns:
        ``{name: (sum of stat, number of input rows)}`` for the modules that ran.
    """
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    hooks = []
    for name, mod in modules.items():

        def hook(m, inp, out, key=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            total, rows = sums.get(key, (0, 0))
            sums[key] = (total + stat(x), rows + x.shape[0])

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return sums


def _activation(model, batches, groups):
    # Column statistics of the first owner of each weight, where it is a Linear/Conv1D.
    mods = {
        owners[0][0]: owners[0][1]
        for _, owners in groups
        if layer_type(owners[0][1]) in ("Linear", "Conv1D")
    }
    sums = input_sums(model, batches, mods, lambda x: (x.float() ** 2).sum(0))
    out = {}
    for w, owners in groups:
        name, mod = owners[0]
        if name not in sums:  # embeddings, convs: no column statistics, uniform
            out[name] = torch.ones_like(w, dtype=torch.float32)
            continue
        total, rows = sums[name]
        col = total / max(rows, 1)  # (in,)
        imp = (
            col[None, :].expand(w.shape[0], -1)
            if layer_type(mod) == "Linear"
            else col[:, None].expand(-1, w.shape[1])
        )
        out[name] = imp.contiguous()
    return out
