"""Cluster-aware fine-tuning: trained weight sharing (Deep Compression, section 3.1).

The codes stay fixed and the centroids become trainable parameters. A weight is
``codebook[row, code]``, so autograd gives each centroid the sum of the gradients of
the weights that use it, which is exactly the paper's update rule. With
``keep_zeros`` the zero centroid (column 0, the pruned weights) gets no gradient and
is reset to 0.0 after every step, so pruned weights stay exactly zero.

Optional straight-through re-assignment: a full-precision shadow of each weight
follows the gradient of the clustered weight, and every few steps each weight moves
to the centroid nearest its shadow (pruned weights never move).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .api import clustered_weights
from .core.packing import pack_codes
from .nn.modules import ClusteredWeight

__all__ = ["finetune", "freeze_codebooks_", "trainable_codebooks_"]


def _keeps_zero(cw: ClusteredWeight) -> bool:
    return bool(cw.meta.get("keep_zeros"))


def _all_cws(model: nn.Module) -> list[ClusteredWeight]:
    cws = [cw for cw, _ in clustered_weights(model).values()]
    if not cws:
        raise ValueError(
            "the model has no clustered weight to fine-tune; run wclust.compress_(model, cfg) first"
        )
    return cws


def trainable_codebooks_(model: nn.Module) -> list[nn.Parameter]:
    """Turn every codebook of a clustered model into a float32 ``nn.Parameter``.

    Codes stay fixed; ``model.parameters()`` then includes the centroids, so any
    training loop can update them. The zero centroid of ``keep_zeros`` codebooks gets
    no gradient. Call :func:`freeze_codebooks_` afterwards to return to storage dtype
    (``save`` also works while trainable and stores float32 codebooks).

    Args:
        model: a model processed by ``compress_``.

    Returns:
        The codebook parameters, one per clustered weight (shared weights once).

    Raises:
        ValueError: nothing in the model is clustered.
    """
    params = []
    for cw in _all_cws(model):
        if not isinstance(cw.codebook, nn.Parameter):
            cb = cw.codebook_float().detach().clone()  # (n_codebooks, n_clusters)
            del cw._buffers["codebook"]
            cw.codebook = nn.Parameter(cb)
            cw.codebook_scale = None  # folded into the float32 centroids
            cw.set_cache(False)  # a cached dense weight would hide the updates
            if _keeps_zero(cw):
                if cb[:, 0].any():
                    raise ValueError("a keep_zeros codebook has a non-zero centroid 0")
                mask = torch.ones_like(cb)
                mask[:, 0] = 0.0
                cw.codebook.register_hook(lambda g, m=mask: g * m)
        params.append(cw.codebook)
    return params


def freeze_codebooks_(model: nn.Module) -> None:
    """Back to inference: codebooks become buffers in their storage dtype again
    (``meta["codebook_dtype"]``; int8 gets a fresh scale per codebook)."""
    for cw in _all_cws(model):
        if not isinstance(cw.codebook, nn.Parameter):
            continue
        cb = cw.codebook.detach().clone()
        if _keeps_zero(cw):
            cb[:, 0] = 0.0
        dtype = cw.meta.get("codebook_dtype", "float32")
        scale = None
        if dtype == "int8":
            amax = cb.abs().amax(1)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            cb = torch.round(cb / scale[:, None]).clamp(-127, 127).to(torch.int8)
        elif dtype in ("float16", "bfloat16"):
            cb = cb.to(getattr(torch, dtype))
        del cw._parameters["codebook"]
        cw.register_buffer("codebook", cb)
        cw.codebook_scale = scale


def _zero_pruned_centroids(cws: list[ClusteredWeight]) -> None:
    with torch.no_grad():
        for cw in cws:
            if _keeps_zero(cw):
                cw.codebook[:, 0] = 0.0


def _forward(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class _Reassigner:
    """Straight-through re-assignment: shadows of the (out, in) clustered views."""

    def __init__(self, cws: list[ClusteredWeight], lr: float):
        for cw in cws:
            if cw.group_scale is not None or cw.outlier_idx is not None:
                raise ValueError(
                    "re-assignment works on plain codebooks (no group scales, no outliers)"
                )
        self.cws = cws
        with torch.no_grad():
            self.shadow = [self._view(cw, cw.dense()).detach().float().clone() for cw in cws]
        self.opt = torch.optim.Adam(self.shadow, lr=lr)

    @staticmethod
    def _view(cw: ClusteredWeight, w: torch.Tensor) -> torch.Tensor:
        return (w.t() if cw.transpose else w).reshape(cw.n_codebooks, -1)  # (n_cb, per)

    def before_forward(self) -> None:
        for cw in self.cws:  # one decode per step; keep it to read its gradient
            w = cw.dense()
            w.retain_grad()
            cw._dense = w

    def after_backward(self) -> None:
        for cw, s in zip(self.cws, self.shadow, strict=True):
            g = cw._dense.grad
            s.grad = None if g is None else self._view(cw, g).float()
            cw._dense = None
        self.opt.step()

    def clear(self) -> None:
        for cw in self.cws:
            cw._dense = None

    @torch.no_grad()
    def reassign(self) -> int:
        """Move each weight to the centroid nearest its shadow; returns codes changed."""
        changed = 0
        for cw, s in zip(self.cws, self.shadow, strict=True):
            cb = cw.codebook_float().detach()  # (n_cb, k)
            old = cw.codes().reshape(cw.n_codebooks, -1).long()  # (n_cb, per)
            new = torch.empty_like(old)
            for r in range(0, old.shape[0], 64):  # (rows, per, k) distances in chunks
                d = (s[r : r + 64, :, None] - cb[r : r + 64, None, :]).abs()
                if _keeps_zero(cw):
                    d[..., 0] = float("inf")  # live weights never become pruned
                new[r : r + 64] = d.argmin(2)
            if _keeps_zero(cw):
                new = torch.where(old == 0, old, new)  # pruned weights stay pruned
            changed += int((new != old).sum())
            cw.set_packed(pack_codes(new, cw.bits))
        return changed


def finetune(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    train_dense: bool = True,
    reassign_every: int = 0,
    freeze: bool = True,
    log: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune the centroids of a clustered model (codes fixed), in place.

    Args:
        model: a model processed by ``wclust.compress_`` (any architecture).
        loader: iterable of ``(inputs, targets)`` batches; ``inputs`` is a tensor, a
            tuple (passed as positional arguments) or a dict (keyword arguments).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar tensor``.
        epochs: passes over ``loader``.
        lr: Adam learning rate (ignored when ``optimizer`` is given).
        optimizer: optional optimizer; it must hold the codebook parameters, which
            :func:`trainable_codebooks_` returns (call it first).
        train_dense: also train the model's other parameters (biases, norms,
            unclustered layers), as Deep Compression retrains the whole network.
        reassign_every: if > 0, straight-through re-assignment of the codes every
            that many steps (0: codes fixed, the paper's method).
        freeze: return the codebooks to buffers in their storage dtype at the end
            (ready for ``wclust.save`` and the inference kernels).
        log: optional callback ``(epoch, mean loss)``.

    Returns:
        ``{"loss": [mean loss per epoch], "steps": int, "reassigned": codes changed}``.

    Raises:
        ValueError: nothing in the model is clustered, or bad arguments.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    cws = _all_cws(model)
    cb_params = trainable_codebooks_(model)
    if optimizer is None:
        cb_ids = {id(p) for p in cb_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in cb_ids]
        optimizer = torch.optim.Adam(cb_params + (others if train_dense else []), lr=lr)
    reassigner = _Reassigner(cws, lr) if reassign_every > 0 else None
    was_training = model.training
    model.train()
    losses, steps, changed = [], 0, 0
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                if reassigner:
                    reassigner.before_forward()
                loss = loss_fn(_forward(model, inputs), targets)
                loss.backward()
                optimizer.step()
                _zero_pruned_centroids(cws)
                steps += 1
                if reassigner:
                    reassigner.after_backward()
                    if steps % reassign_every == 0:
                        changed += reassigner.reassign()
                total += float(loss.detach())
                count += 1
            losses.append(total / max(count, 1))
            if log:
                log(epoch, losses[-1])
    finally:
        if reassigner:
            reassigner.clear()
        model.train(was_training)
        if freeze:
            freeze_codebooks_(model)
    return {"loss": losses, "steps": steps, "reassigned": changed}
