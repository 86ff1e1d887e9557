"""The one pipeline: run a recipe on a model, each stage once and only where needed.

prune -> calibrate -> allocate bits -> cluster -> GPTQ -> distil. The command line,
``wclust compare`` and Python users all come through :func:`compress_`.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Iterable

from torch import nn

from ..config import ClusterConfig, ConfigError
from ..report.layers import CompressionReport
from .recipe import Recipe
from .settings import ScaledCodebook

__all__ = ["compress_"]

# (stage, layer name, index, total): what runs now, for progress displays
Progress = Callable[[str, str, int, int], None]


def _scaled_candidates():
    from ..stages.allocate import GROUP_CANDIDATES

    return GROUP_CANDIDATES


def compress_(
    model: nn.Module,
    recipe=None,
    data=None,
    *,
    sample_weights=None,
    progress: Progress | Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> CompressionReport:
    """Compress ``model`` in place as ``recipe`` says.

    Args:
        model: any ``nn.Module`` (supported layers: Linear, Conv1d/2d, Embedding,
            transformers' Conv1D).
        recipe: a :class:`Recipe`, a preset name (``wclust recipes``), a spec string
            (``"scaled:bits=4+fisher"``), a JSON file, or a :class:`ClusterConfig`
            (clustering only); default: plain 4-bit k-means per channel.
        data: what calibration, GPTQ and distillation run on: a list of model inputs
            (dicts for ``model(**batch)``, with ``labels`` for Fisher calibration and
            distillation), or an object with ``batches(model) -> list`` (and
            ``augment(positions, speeds, teacher) -> list`` for speed perturbation),
            as ``wclust.tasks.TaskData`` is. Calibration takes the first
            ``calibration.items`` (unset: 16, or all of them when the recipe distils).
        sample_weights: importance per weight to use instead of calibrating.
        progress: callback ``(stage, layer name, index, total)``; a 3-argument
            callback ``(layer name, index, total)`` gets the clustering only.
        log: callback for one line per finished stage (e.g. ``print``).

    Returns:
        The per-layer :class:`CompressionReport`; ``report.stages`` holds the seconds
        each stage took and ``report.recipe`` the recipe as a dict (``None`` for a
        ClusterConfig).

    Raises:
        ConfigError: a bad recipe.
        ValueError: the recipe needs data that was not given, or a weight cannot be
            compressed as asked.
    """
    from ..api import compress_ as cluster_

    if isinstance(recipe, ClusterConfig) or recipe is None and sample_weights is not None:
        report = cluster_(
            model, recipe, sample_weights=sample_weights, progress=_tick(progress, "cluster")
        )
        report.stages = {"cluster": round(report.seconds, 2)}
        report.config = recipe
        return report
    from .presets import get_recipe

    r = get_recipe(recipe if recipe is not None else Recipe())
    return _Run(model, r, data, sample_weights, progress, log).run()


def _tick(progress, stage: str):
    """A ``(layer, i, n)`` callback for ``stage`` from a pipeline progress callback: a
    4-argument one gets the stage name; a 3-argument one sees the clustering only."""
    if progress is None:
        return None
    if progress.__code__.co_argcount - (1 if hasattr(progress, "__self__") else 0) == 3:
        return progress if stage == "cluster" else None
    return lambda name, i, n: progress(stage, name, i, n)


class _Run:
    def __init__(self, model, recipe: Recipe, data, sample_weights, progress, log):
        self.model, self.recipe, self.data = model, recipe, data
        self.sample_weights = sample_weights
        self.progress = progress
        self.log = log or (lambda line: None)
        self.stages: dict[str, float] = {}
        self.batches: list | None = None
        self.teacher = None

    def _stage(self, name: str, t0: float, what: str = "") -> None:
        secs = time.perf_counter() - t0
        self.stages[name] = round(secs, 2)
        self.log(f"{name}: {secs:.1f} s" + (f" ({what})" if what else ""))

    def _tick(self, stage: str):
        return _tick(self.progress, stage)

    def run(self) -> CompressionReport:
        r = self.recipe
        needs_data = r.calibration is not None and self.sample_weights is None
        needs_data = needs_data or r.gptq is not None or r.distill is not None
        if needs_data:
            self._load_batches()
        if r.distill is not None:
            self.teacher = copy.deepcopy(self.model)  # the original, before anything changes
        if r.prune is not None:
            self._prune()
        sw = self.sample_weights
        if sw is None and r.calibration is not None:
            sw = self._calibrate()
        hessians = originals = None
        if r.gptq is not None:
            hessians, originals = self._hessians()
        cfg, memo = self._allocate(sw, hessians)
        t0 = time.perf_counter()
        from ..api import compress_ as cluster_

        report = cluster_(
            self.model, cfg, sample_weights=sw, progress=self._tick("cluster"), _memo=memo
        )
        self._stage("cluster", t0, f"{len(report.clustered)} weights")
        if r.gptq is not None:
            self._gptq(report, hessians, originals)
        if r.distill is not None:
            report.distill = self._distill(report)
        if r.int8_matmul:
            from ..nn.modules import set_int8_matmul

            set_int8_matmul(self.model)
        report.stages = self.stages
        report.recipe = r.to_dict()
        report.config = cfg
        return report

    # -- stages ---------------------------------------------------------------------
    def _load_batches(self) -> None:
        r = self.recipe
        if self.data is None:
            what = "calibration" if r.distill is None else "distillation"
            raise ValueError(
                f"this recipe needs {what} data: pass data= a list of model inputs (dicts "
                "with labels); the command line uses --calib-data DIR or --distill-data DIR "
                "(default: the task's built-in calibration data)"
            )
        t0 = time.perf_counter()
        batches = self.data.batches(self.model) if hasattr(self.data, "batches") else None
        if batches is None:
            batches = list(self.data) if isinstance(self.data, Iterable) else None
        if not batches:
            raise ValueError("the calibration data holds no items")
        if r.data_items is not None:
            batches = batches[: r.data_items]
        self.batches = batches
        self._stage("data", t0, f"{len(batches)} items")

    def _prune(self) -> None:
        from ..stages.prune import prune_

        t0 = time.perf_counter()
        prune_(self.model, self.recipe.prune)
        self._stage("prune", t0, f"{self.recipe.prune:.0%} of each weight")

    def _calibrate(self):
        from ..stages.calibrate import calibrate

        t0 = time.perf_counter()
        c = self.recipe.calibration
        batches = self._stage_items(c.items)
        sw = calibrate(self.model, batches, kind=c.kind)
        self._stage("calibrate", t0, f"{c.kind}, {len(batches)} items")
        return sw

    def _distill_items(self) -> list:
        """The items distillation trains on (and, without their own counts, the Fisher
        weights and GPTQ Hessians come from): the first ``distill.items``, else all."""
        n = self.recipe.distill.items
        return self.batches if n is None else self.batches[:n]

    def _stage_items(self, own: int | None) -> list:
        """The items a calibration stage (Fisher weights, GPTQ Hessians) runs on: its
        own count, else the distillation's items, else the calibration count (16)."""
        if own is not None:
            return self.batches[:own]
        if self.recipe.distill is not None:
            return self._distill_items()
        return self.batches[: self.recipe.calibration_items]

    def _hessians(self):
        from ..nn.owners import weight_owners
        from ..stages.gptq import collect_hessians

        t0 = time.perf_counter()
        batches = self._stage_items(self.recipe.gptq.items)
        hessians = collect_hessians(self.model, batches)
        originals = {owners[0][0]: w.detach() for w, owners in weight_owners(self.model)}
        skip = self.recipe.gptq.exclude
        hessians = {
            k: h for k, h in hessians.items() if not any(fnmatch.fnmatch(k, g) for g in skip)
        }
        self._stage("hessians", t0, f"{len(hessians)} layers, {len(batches)} items")
        return hessians, originals

    def _vector_reserve(self, cands, hessians) -> float:
        """Bits per weight a budget keeps free for the vector codebooks ``gptq:dim``
        will put in place of scalar ones: each Hessian's layer at the widest candidate
        that is turned into vectors (the allocator does not know which it will take)."""
        g = self.recipe.gptq
        if g is None or g.dim == 1 or not hessians:
            return 0.0
        from ..stages.gptq import VECTOR_MAX_CODE_BITS, vector_codebook_extra

        widths = [c[0] if isinstance(c, tuple) else c for c in cands]
        widths = [b for b in widths if b * g.dim <= VECTOR_MAX_CODE_BITS]
        if not widths:
            return 0.0
        numel = sum(p.numel() for p in self.model.parameters())
        return 8 * len(hessians) * vector_codebook_extra(max(widths), g.dim) / numel

    def _allocate(self, sw, hessians=None) -> tuple[ClusterConfig, dict | None]:
        r = self.recipe
        cfg = r.cluster_config()
        if r.budget is None:
            return cfg, None
        from ..stages.allocate import WIDTHS, allocate_bits, token_embedding_split

        if r.budget.rows == "auto":
            split = token_embedding_split(self.model)
            cfg = cfg.replace(overrides={**split, **cfg.overrides})
        cands = r.budget.candidates or (
            _scaled_candidates() if isinstance(r.quantizer, ScaledCodebook) else WIDTHS
        )
        t0 = time.perf_counter()
        memo: dict = {}
        try:
            cfg, summary = allocate_bits(
                self.model,
                r.budget.bits - self._vector_reserve(cands, hessians),
                cfg,
                sample_weights=sw,
                candidates=cands,
                progress=self._tick("allocate"),
                memo=memo,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._stage("allocate", t0, f"{summary['bits_per_weight']:.3f} bits/weight")
        return cfg, memo

    def _gptq(self, report, hessians, originals) -> None:
        from ..api import _mean_square
        from ..nn.owners import clustered_weights
        from ..nn.vector import VectorWeight
        from ..stages.gptq import gptq_refine_

        t0 = time.perf_counter()
        g = self.recipe.gptq
        changed = gptq_refine_(self.model, hessians, originals, **g.refine_kwargs())
        weights = {o[0][0]: cw for cw, o in clustered_weights(self.model).values()}
        for entry in report.layers:  # the report shows the weight error of the new codes
            if entry.name in changed:
                ms = _mean_square(originals[entry.name])
                entry.mse = changed[entry.name][1]  # unweighted, like rel_error below
                entry.rel_error = entry.mse / ms if ms else 0.0
                entry.method = f"{entry.method}+gptq"
                cw = weights.get(entry.name)
                if isinstance(cw, VectorWeight):  # vectorized by gptq:dim
                    entry.method = entry.method.replace("+gptq", "+gptvq")
                    entry.bits, entry.n_clusters = cw.bits, cw.n_clusters
                    entry.cluster_dim = cw.cluster_dim
                    entry.codebook_dtype = cw.meta.get("codebook_dtype")
                    entry.bytes_after = cw.nbytes
                    entry.distinct_values = int(cw.codes().unique().numel())
        # a clustered weight GPTQ could not re-code (no single codebook with scales per
        # group of inputs) keeps its nearest codes; say which
        kept = [
            e.name
            for e in report.layers
            if e.status == "clustered" and e.name in hessians and e.name not in changed
        ]
        note = f"; nearest codes kept (no GPTQ grid): {', '.join(kept)}" if kept else ""
        self._stage("gptq", t0, f"{len(changed)} layers{note}")

    def _distill(self, report) -> dict:
        from ..stages.train import distill_, split_holdout

        d = self.recipe.distill
        t0 = time.perf_counter()
        items = self._distill_items()
        keep, held = split_holdout(list(range(len(items))), d.holdout)
        train = [items[i] for i in keep]
        val = [items[i] for i in held]
        if d.speeds:
            if not hasattr(self.data, "augment"):
                raise ValueError(
                    "distill speeds need task data that can be augmented (speech clips), "
                    "not a plain list of model inputs"
                )
            train += list(self.data.augment(keep, d.speeds, self.teacher))

        def log(epoch, kl, val_kl, secs):
            held_kl = f", held-out {val_kl:.4f}" if val_kl is not None else ""
            self.log(f"distillation epoch {epoch + 1}: mean KL {kl:.4f}{held_kl} ({secs:.0f} s)")

        done = distill_(
            self.model,
            self.teacher,
            train,
            val_batches=val,
            epochs=d.epochs,
            lr=d.lr,
            hidden=d.hidden,
            reassign_every=d.reassign,
            reassign_lr=d.reassign_lr,
            log=log,
        )
        self.teacher = None
        for entry in report.clustered:
            entry.method = f"{entry.method}+distill"
        self._stage("distill", t0, f"{d.epochs} epochs on {len(train)} items")
        return {
            "items": len(train),
            "held_out": len(val),
            "epochs": d.epochs,
            "lr": d.lr,
            "hidden": d.hidden,
            "speeds": list(d.speeds),
            "kept_epoch": done["best_epoch"],
            "reassigned": done["reassigned"],
            "kl": done["kl"],
            "val_kl": done["val_kl"],
            "hidden_error": done["hidden"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
