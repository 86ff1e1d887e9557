"""Cluster-aware fine-tuning: trained weight sharing (Deep Compression, section 3.1).

The codes stay fixed and the centroids become trainable parameters. A weight is
``codebook[row, code]``, so autograd gives each centroid the sum of the gradients of
the weights that use it, which is exactly the paper's update rule. With
``keep_zeros`` the zero centroid (column 0, the pruned weights) gets no gradient and
is reset to 0.0 after every step, so pruned weights stay exactly zero.

Optional straight-through re-assignment: a full-precision shadow of each weight
follows the gradient of the clustered weight, and every few steps each weight moves
to the centroid nearest its shadow (pruned weights never move).

:func:`distill_` needs no labels or loss: the clustered model's codebooks and
per-group scales learn to reproduce the uncompressed model's output distributions
(knowledge distillation, KL divergence to the teacher), on a few examples of the
user's own data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import pack_codes
from ..core.quantizers import _nearest
from ..nn.modules import ClusteredWeight, clustered_parts
from ..nn.owners import clustered_weights

logger = logging.getLogger(__name__)

__all__ = ["distill_", "finetune", "split_holdout", "freeze_codebooks_", "trainable_codebooks_"]


def _keeps_zero(cw: ClusteredWeight) -> bool:
    return bool(cw.meta.get("keep_zeros"))


def _all_cws(model: nn.Module) -> list[ClusteredWeight]:
    """Every ClusteredWeight of the model (a row split's parts one by one)."""
    cws = [part for cw, _ in clustered_weights(model).values() for part in clustered_parts(cw)]
    if not cws:
        raise ValueError(
            "the model has no clustered weight to fine-tune; run wclust.compress_(model, cfg) first"
        )
    return cws


def trainable_codebooks_(model: nn.Module, *, scales: bool = False) -> list[nn.Parameter]:
    """Turn every codebook of a clustered model into a float32 ``nn.Parameter``.

    Codes stay fixed; ``model.parameters()`` then includes the centroids, so any
    training loop can update them. The zero centroid of ``keep_zeros`` codebooks gets
    no gradient. Call :func:`freeze_codebooks_` afterwards to return to storage dtype
    (``save`` also works while trainable and stores float32 codebooks).

    Args:
        model: a model processed by ``compress_``.
        scales: also make the per-group scales and offsets (``group_scale``,
            ``group_offset``, where a weight has them) float32 parameters;
            :func:`freeze_codebooks_` returns them to their stored dtype.

    Returns:
        The codebook parameters, one per clustered weight (shared weights once),
        followed by the scale and offset parameters when ``scales`` is set.

    Raises:
        ValueError: nothing in the model is clustered.
    """
    params, extra = [], []
    for cw, _ in clustered_weights(model).values():
        cw.set_cache(False)  # a row split's cached dense weight would hide the updates too
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
        for name in ("group_scale", "group_offset") if scales else ():
            t = getattr(cw, name)
            if t is None:
                continue
            if not isinstance(t, nn.Parameter):
                cw.__dict__.setdefault("_stored_dtypes", {})[name] = t.dtype
                del cw._buffers[name]
                setattr(cw, name, nn.Parameter(t.detach().float().clone()))
            extra.append(getattr(cw, name))
    return params + extra


def freeze_codebooks_(model: nn.Module) -> None:
    """Back to inference: codebooks become buffers in their storage dtype again
    (``meta["codebook_dtype"]``; int8 gets a fresh scale per codebook), and trained
    group scales and offsets return to the dtype they were stored in."""
    for cw in _all_cws(model):
        stored = cw.__dict__.pop("_stored_dtypes", {})
        for name in ("group_scale", "group_offset"):
            t = getattr(cw, name)
            if isinstance(t, nn.Parameter):
                del cw._parameters[name]
                cw.register_buffer(name, t.detach().to(stored.get(name, torch.float32)))
        if not isinstance(cw.codebook, nn.Parameter):
            continue
        cb = cw.codebook.detach().clone()
        if _keeps_zero(cw):
            cb[:, 0] = 0.0
        dtype = cw.meta.get("codebook_dtype", "float32")
        scale = None
        if dtype == "int8":  # one scale per codebook (2-D scalar, 3-D vector codebooks)
            amax = cb.abs().flatten(1).amax(1)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            per = scale.view(-1, *[1] * (cb.dim() - 1))
            cb = torch.round(cb / per).clamp(-127, 127).to(torch.int8)
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
    """Straight-through re-assignment of scalar codes.

    A float32 shadow of each clustered weight (its ``(n_codebooks, per)`` view) takes
    the gradient of the decoded weight and its own Adam steps; :meth:`reassign` moves
    every weight to the centroid nearest its shadow, measured in the units of its
    scale group where the weight has per-group scales and offsets (the grid is
    ``codebook * scale + offset``). Shadows start at ``originals`` (the uncompressed
    weights: those near a cell boundary then move first) or at the decoded weights.
    """

    def __init__(
        self, cws: list[ClusteredWeight], lr: float, originals: dict | None = None
    ) -> None:
        for cw in cws:
            if getattr(cw, "cluster_dim", 1) > 1:
                raise ValueError("re-assignment works on scalar codebooks (cluster_dim=1)")
        self.cws = cws
        originals = originals or {}
        with torch.no_grad():
            self.shadow = [
                self._view(cw, originals[id(cw)] if id(cw) in originals else cw.dense())
                .detach()
                .float()
                .clone()
                for cw in cws
            ]
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
            old = cw.codes().reshape(cw.n_codebooks, -1).long()  # (n_cb, per)
            new = nearest_codes(_normalized(cw, s), cw.codebook_float().detach(), _keeps_zero(cw))
            if _keeps_zero(cw):
                new = torch.where(old == 0, old, new)  # pruned weights stay pruned
            changed += int((new != old).sum())
            cw.set_packed(pack_codes(new, cw.bits))
        return changed


def _normalized(cw: ClusteredWeight, s: torch.Tensor) -> torch.Tensor:
    """The shadow ``s`` ((n_cb, per) view) in codebook units: ``(s - offset) / scale``
    per scale group; ``s`` itself without group scales."""
    if cw.group_scale is None:
        return s
    g = cw.group_scale.detach().float().reshape(-1, 1)
    t = s.reshape(g.shape[0], -1)
    if cw.group_offset is not None:
        t = t - cw.group_offset.detach().float().reshape(-1, 1)
    return (t / g.clamp_min(1e-12)).reshape(s.shape)


def nearest_codes(x: torch.Tensor, cb: torch.Tensor, skip_zero: bool = False) -> torch.Tensor:
    """Index of the centroid of ``cb[r]`` nearest each ``x[r, j]``.

    Args:
        x: (n_cb, per) values.
        cb: (n_cb, k) centroids, in any order.
        skip_zero: centroid 0 is never chosen (the pruned weights' zero).

    Returns:
        (n_cb, per) int64 codes (ties go to the lower centroid value).
    """
    vals = cb.float().clone()
    if skip_zero:
        vals[:, 0] = float("inf")
    order = vals.argsort(1)
    return order.gather(1, _nearest(x.float(), vals.gather(1, order)))


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


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "distillation matches output distributions: the model must return logits (a "
            f"tensor or an output with .logits), it returned {type(out).__name__}"
        )
    return logits


def _hidden_states(out) -> list[torch.Tensor]:
    """Every hidden state a ``transformers`` output carries (encoder's, then
    decoder's, for encoder-decoder models)."""
    states = []
    for name in ("encoder_hidden_states", "decoder_hidden_states", "hidden_states"):
        states += list(getattr(out, name, None) or ())
    if not states:
        raise ValueError(
            "hidden-state matching needs a model that returns hidden states when called "
            f"with output_hidden_states=True (a transformers model); it returned "
            f"{type(out).__name__}; use hidden=0"
        )
    return states


def _model_inputs(batch):
    """A batch without its labels: distillation needs no loss from the model."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch


def split_holdout(items: list, fraction: float) -> tuple[list, list]:
    """Split ``items`` into (training, held-out): every n-th item is held out, so an
    ordered set (e.g. clips by speaker) is spread over both. ``fraction`` 0 holds
    nothing out; otherwise at least one item on each side.

    Raises:
        ValueError: ``fraction`` outside [0, 1), or too few items to split.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction!r}")
    items = list(items)
    if fraction == 0:
        return items, []
    if len(items) < 2:
        raise ValueError(f"holding out a fraction needs at least 2 items, got {len(items)}")
    step = max(2, round(1 / fraction))
    val = items[step - 1 :: step] or items[-1:]
    held = {id(x) for x in val}
    return [x for x in items if id(x) not in held], val


def distill_(
    model: nn.Module,
    teacher: nn.Module,
    batches: list,
    *,
    epochs: int = 2,
    lr: float = 3e-5,
    dense_lr: float | None = None,
    scales: bool = True,
    val_batches: list | None = None,
    seed: int = 0,
    cache_bytes: float = 2e9,
    hidden: float = 0.0,
    reassign_every: int = 0,
    reassign_lr: float = 1e-4,
    log: Callable[[int, float, float | None, float], None] | None = None,
) -> dict:
    """Distill a clustered model toward its uncompressed original, in place.

    The codes stay fixed. Every codebook (and, with ``scales``, every per-group scale
    and offset) is trained with Adam at ``lr``, the model's other trainable parameters
    (norms, biases, layers kept dense) at ``dense_lr``, to minimize the KL divergence
    from the teacher's output distribution to the student's, summed over the output
    positions and averaged over the batch (for Whisper: next-token distributions,
    teacher-forced on the reference transcript). No labels are used, so any data of
    the model's domain serves; use real data, not synthetic (docs/experiments, whisper-base quality log, 1e/1g:
    distilling Whisper on synthesized speech made it worse, on 50 real clips it
    brought a 4.22-bit model from +1.7 to +0.4 WER of fp32). Dropout is off (``eval``
    mode) throughout.

    Args:
        model: a model processed by ``wclust.compress_`` (the student).
        teacher: the uncompressed model with the same outputs (e.g. a
            ``copy.deepcopy`` taken before ``compress_``); it is not changed.
        batches: a list of model inputs, each a dict of keyword arguments (a
            ``"labels"`` entry is ignored), a tuple of positional ones, or a tensor;
            for a task, ``task.calibration_batches(...)`` gives them.
        epochs: passes over ``batches``, in a random order per epoch.
        lr: learning rate of the codebooks, scales and offsets.
        dense_lr: learning rate of the other trainable parameters (default
            ``lr / 10``; 0 keeps them fixed).
        scales: also train the per-group scales and offsets.
        val_batches: held-out inputs (not in ``batches``): their mean KL is measured
            before training and after every epoch, and the model ends in the state
            with the lowest one (early stopping; never worse on them than before).
        seed: seed of the batch order.
        cache_bytes: keep the teacher's log-probabilities (and hidden states) in
            memory for as many items as fit in this many bytes; for the others the
            teacher runs again at every step.
        hidden: weight of a second loss term that also matches every hidden state
            (each layer's output, as ``output_hidden_states=True`` returns them): the
            sum over states of the mean squared difference to the teacher's, relative
            to the mean square of the teacher's (a per-layer reconstruction signal, far
            richer per example than the output distribution; dict inputs of a
            ``transformers`` model only). 0: the output KL alone. The reported KL
            stays the output KL.
        reassign_every: if > 0, the codes move too (scalar codebooks): a float32
            shadow of every clustered weight, started at the teacher's weight, follows
            the gradient of the decoded weight with its own Adam at ``reassign_lr``,
            and every that many steps each weight takes the centroid nearest its
            shadow (in its scale group's units). 0: codes fixed.
        reassign_lr: the shadows' learning rate (a step of about this size per
            weight; weights are stored in the model's units).
        log: optional callback ``(epoch, mean training KL, held-out KL or None,
            seconds)``.

    Returns:
        ``{"kl": [mean training KL per epoch], "hidden": [mean summed relative
        hidden-state error per epoch] (empty without ``hidden``), "val_kl": [held-out
        KL before training and after each epoch] (empty without ``val_batches``), "best_epoch":
        epochs trained in the kept state, "steps": int, "reassigned": codes changed
        (0 without ``reassign_every``), "seconds": float}``. The
        codebooks, scales and offsets end frozen in their storage dtypes, ready for
        ``wclust.save`` and the inference kernels.

    Raises:
        ValueError: nothing in the model is clustered, no batches, bad arguments,
            or a model without logits.
    """
    batches, val = list(batches), list(val_batches or [])
    dense_lr = _check_distill_args(model, teacher, batches, epochs, lr, dense_lr, hidden)
    if type(reassign_every) is not int or reassign_every < 0:
        raise ValueError(f"reassign_every must be a non-negative integer, got {reassign_every!r}")
    if reassign_every and not reassign_lr > 0:
        raise ValueError(f"reassign_lr must be positive, got {reassign_lr!r}")
    cws = _all_cws(model)
    teacher_mode = teacher.training
    teacher.eval()
    targets = _Targets(teacher, batches + val, len(batches), hidden, cache_bytes)
    opt, trained = _distill_optimizer(model, lr, dense_lr, scales)
    moves = (
        _Reassigner(cws, reassign_lr, _teacher_weights(model, teacher)) if reassign_every else None
    )
    positive = [cw.group_scale for cw in cws if isinstance(cw.group_scale, nn.Parameter)]
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: match the teacher's deterministic outputs

    @torch.no_grad()
    def held_out() -> float:
        return sum(
            float(targets.losses(model, len(batches) + j)[0]) for j in range(len(val))
        ) / len(val)

    def state() -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # parameters, codes
        return [p.detach().clone() for p in trained], [cw.packed.clone() for cw in cws]

    n_steps, changed = 0, 0

    def step(i: int) -> tuple[float, float]:
        nonlocal n_steps, changed
        if moves:
            moves.before_forward()
        out_kl, rel = targets.losses(model, i)
        loss = out_kl if rel is None else out_kl + hidden * rel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in positive:  # a scale stays a (positive) scale
                p.clamp_(min=1e-8)
        _zero_pruned_centroids(cws)
        n_steps += 1
        if moves:
            moves.after_backward()
            if n_steps % reassign_every == 0:
                changed += moves.reassign()
        return float(out_kl.detach()), 0.0 if rel is None else float(rel.detach())

    kls, val_kls, hid, t_start = [], [], [], time.perf_counter()
    best = (float("inf"), 0, None)  # (held-out KL, epoch, saved tensors)
    try:
        if val:
            val_kls.append(held_out())
            best = (val_kls[0], 0, state())
        for epoch in range(epochs):
            t0 = time.perf_counter()
            per_item = [step(i) for i in torch.randperm(len(batches), generator=gen).tolist()]
            kls.append(sum(k for k, _ in per_item) / len(batches))
            if hidden:
                hid.append(sum(h for _, h in per_item) / len(batches))
            if val:
                val_kls.append(held_out())
                if val_kls[-1] < best[0]:
                    best = (val_kls[-1], epoch + 1, state())
            secs, held = time.perf_counter() - t0, val_kls[-1] if val else None
            _log_epoch(epoch, kls[-1], held, hid[-1] if hidden else None, secs)
            if log:
                log(epoch, kls[-1], held, secs)
        if val and best[1] < epochs:  # an earlier state was better on the held-out data
            with torch.no_grad():
                params, codes = best[2]
                for p, saved in zip(trained, params, strict=True):
                    p.copy_(saved)
                for cw, packed in zip(cws, codes, strict=True):
                    cw.packed = packed
    finally:
        if moves:
            moves.clear()
        model.train(was_training)
        teacher.train(teacher_mode)
        freeze_codebooks_(model)
    return {
        "kl": kls,
        "hidden": hid,
        "val_kl": val_kls,
        "best_epoch": best[1] if val else epochs,
        "steps": epochs * len(batches),
        "reassigned": changed,
        "seconds": time.perf_counter() - t_start,
    }


def _teacher_weights(model: nn.Module, teacher: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(part): the teacher's weight rows it stands for}`` for every clustered
    weight (each part of a row split), in the module's layout."""
    out = {}
    for cw, owners in clustered_weights(model).values():
        w = teacher.get_submodule(owners[0][0]).weight.detach()
        parts = clustered_parts(cw)
        if len(parts) == 1:
            out[id(parts[0])] = w
            continue
        rows = w.t() if cw.transpose else w  # the parts split the (out, in) view
        for part, a, b in zip(parts, cw.bounds[:-1], cw.bounds[1:], strict=True):
            out[id(part)] = rows[a:b]
    return out


def _check_distill_args(model, teacher, batches, epochs, lr, dense_lr, hidden) -> float:
    """Refuses bad ``distill_`` arguments; returns the dense learning rate."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    dense_lr = lr / 10 if dense_lr is None else dense_lr
    if dense_lr < 0:
        raise ValueError(f"dense_lr must be >= 0, got {dense_lr!r}")
    if not batches:
        raise ValueError("distillation needs at least one batch of inputs")
    if teacher is model:
        raise ValueError(
            "the teacher must be a separate, uncompressed model (copy.deepcopy(model) "
            "before compress_)"
        )
    if not hidden >= 0:
        raise ValueError(f"hidden must be >= 0, got {hidden!r}")
    return dense_lr


def _log_epoch(epoch: int, kl: float, held: float | None, hid: float | None, secs: float):
    logger.info(
        "distillation epoch %d: mean KL %.4f, held-out %s%s (%.0f s)",
        epoch + 1,
        kl,
        "-" if held is None else f"{held:.4f}",
        "" if hid is None else f", hidden-state error {hid:.4f}",
        secs,
    )


def _distill_optimizer(model: nn.Module, lr: float, dense_lr: float, scales: bool):
    """Adam over the codebooks (and scales) at ``lr`` and the model's other trainable
    parameters at ``dense_lr`` (none at 0); returns it and the trained parameters."""
    params = trainable_codebooks_(model, scales=scales)
    ids = {id(p) for p in params}
    groups = [{"params": params, "lr": lr}]
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if dense and dense_lr > 0:
        groups.append({"params": dense, "lr": dense_lr})
    return torch.optim.Adam(groups), [p for g in groups for p in g["params"]]


class _Targets:
    """The teacher's outputs for ``items`` (the first ``n_train`` train, the rest are
    held out) and the student's losses against them.

    The teacher's log-probabilities (and, where ``hidden``, its hidden states in
    bfloat16: half the memory, rounding far below the errors being matched) are kept
    in memory for as many items as fit in ``cache_bytes``; the rest are computed again
    at every step.
    """

    def __init__(self, teacher, items: list, n_train: int, hidden: float, cache_bytes: float):
        self.teacher, self.items, self.n_train, self.hidden = teacher, items, n_train, hidden
        self.cache: list = []  # the first items' targets, while they fit
        used = 0
        for i in range(len(items)):
            t = self.target(i)
            used += _nbytes(t)
            if used > cache_bytes:
                break
            self.cache.append(t)

    def matched(self, i: int) -> bool:
        """Whether item ``i`` also matches hidden states (training items only: the
        held-out ones are scored by the output KL alone)."""
        return bool(self.hidden) and i < self.n_train

    def inputs(self, i: int):
        x = _model_inputs(self.items[i])
        if self.matched(i):
            if not isinstance(x, dict):
                raise ValueError("hidden-state matching needs dict inputs (keyword arguments)")
            x = {**x, "output_hidden_states": True}
        return x

    @torch.no_grad()
    def target(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = _forward(self.teacher, self.inputs(i))
        states = (
            [h.detach().to(torch.bfloat16) for h in _hidden_states(out)] if self.matched(i) else []
        )
        return F.log_softmax(_logits(out).float(), -1), states

    def losses(self, model, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output KL, summed relative hidden-state error or None) of item ``i``."""
        tgt, tgt_states = self.cache[i] if i < len(self.cache) else self.target(i)
        out = _forward(model, self.inputs(i))
        kl = F.kl_div(
            F.log_softmax(_logits(out).float(), -1), tgt, log_target=True, reduction="batchmean"
        )
        if not self.matched(i):
            return kl, None
        rel = sum(
            (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
            for s, t in zip(_hidden_states(out), tgt_states, strict=True)
        )
        return kl, rel


def _nbytes(target) -> int:
    return sum(x.numel() * x.element_size() for x in [target[0], *target[1]])
