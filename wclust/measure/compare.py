"""``wclust compare``: every method through the same measurement, one table.

For each method: a ``prepare`` process applies it and writes the artifact; then a
fresh ``measure`` process loads only that artifact and runs the task. Every cell
is thus measured in a process that never held another variant of the model.

Tasks scored against the original model rather than ground truth (embed, vision) get
one ``reference`` process per run: it loads the source model, runs it on the evaluation
data and writes the outputs to ``out_dir/reference/<model>.<task>.safetensors``; every
measure cell (fp32 included) reads that file. With ``reuse`` the file is kept when its
metadata (model, task, data, limit, every) matches.

The cells run through an executor (``wclust.measure.executors``): locally one after
another (the default), or as Ray tasks that run at once where the cluster has room.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .executors import LocalExecutor, run_cell

__all__ = ["CompareError", "run_cell", "run_compare"]


class CompareError(RuntimeError):
    """A cell of the grid failed; the message carries the worker's error."""


def _safe_name(model: str) -> str:
    """A model name or path as a file-name part."""
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in model)


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def _machine() -> dict:
    import numpy
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("transformers", "numba", "torchao", "wclust"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            info[mod] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info


def run_compare(
    model: str,
    methods: list[str],
    out_dir: str | os.PathLike,
    *,
    data: str | None = None,
    limit: int | None = None,
    every: int = 1,
    threads: int = 2,
    reuse: bool = False,
    plots: bool = True,
    on_event: Callable[[str, str], None] | None = None,
    command: str | None = None,
    executor=None,
    calib_data: str | None = None,
    calib_items: int | None = None,
) -> tuple[list[dict], dict]:
    """Run the grid for one model and write ``table.md``, ``results.csv``,
    ``results.json`` and plots into ``out_dir``.

    Three phases, each a batch of independent cells for the executor: prepare every
    distinct artifact; the original's reference outputs (tasks scored against it);
    measure every method.

    Args:
        model: model name/path (see ``wclust.models.load_model``).
        methods: presets, baselines, spec strings or recipe files (``wclust.recipes``).
        out_dir: output folder; artifacts go to ``out_dir/artifacts``.
        data: task data folder (default: the task's built-in data).
        limit, every: take every n-th item, at most ``limit`` of them.
        threads: torch threads in the measuring processes (and CPUs a cell reserves).
        reuse: keep an existing artifact instead of preparing it again.
        plots: write the Pareto and histogram plots (needs matplotlib).
        on_event: progress callback ``(method, stage)``.
        command: the command line, recorded in results.json.
        executor: where cells run (``wclust.measure.executors``); default: local,
            one after another.
        calib_data, calib_items: what the calibrated methods calibrate on (default:
            the task's built-in data, each method's own item count).

    Returns:
        (rows, meta). Failed cells are rows with ``error`` set.
    """
    from ..models import resolve_model
    from ..recipes import resolve_method

    resolved = [resolve_method(m) for m in methods]  # unknown names fail before any work
    # Likewise the model and the data: once here, not once per cell (every cell would
    # load the model, and a hub id would try the network in each).
    resolve_model(model)
    for flag, d in (("data", data), ("calib_data", calib_data)):
        if d is not None and ":" not in d and not _exists(d):
            raise FileNotFoundError(f"{flag} {d}: no such file or folder")
    if "fp32" not in methods and any(m.runtime for m in resolved):
        resolved.insert(0, resolve_method("fp32"))
    grid = _Grid(
        model=model,
        resolved=resolved,
        out=Path(out_dir),
        executor=executor if executor is not None else LocalExecutor(),
        data=data,
        limit=limit,
        every=every,
        threads=threads,
        reuse=reuse,
        calib_data=calib_data,
        calib_items=calib_items,
        on_event=on_event,
    )
    meta = {
        "model": model,
        "task": None,
        "data": data or "(built-in)",
        "calib_data": calib_data or "(built-in)",
        "calib_items": calib_items,
        "limit": limit,
        "every": every,
        "threads": threads,
        "executor": getattr(grid.executor, "name", type(grid.executor).__name__),
        "methods": [m.name for m in resolved],
        "command": command,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    preps = grid.prepare()
    rows = {
        i: {**_row_head(model, m), "error": prep.get("error")}
        for i, (m, prep) in enumerate(zip(resolved, preps, strict=True))
        if not prep.get("ok")
    }
    task_name = next((p["task"] for p in preps if p.get("ok") and p.get("task")), None)
    pending = [i for i in range(len(resolved)) if i not in rows]
    ref_path, ref_error = grid.reference(task_name, pending)
    grid.measure(preps, rows, pending, task_name, ref_path, ref_error, meta)
    meta["task"] = task_name
    ordered = [rows[i] for i in sorted(rows)]
    _write(ordered, grid.out, meta, plots, model, resolved)
    return ordered, meta


@dataclass
class _Grid:
    """The cells of one compare run: prepare every distinct artifact, the original's
    reference outputs where the task scores against them, measure every method."""

    model: str
    resolved: list
    out: Path
    executor: object
    data: str | None
    limit: int | None
    every: int
    threads: int
    reuse: bool
    calib_data: str | None
    calib_items: int | None
    on_event: Callable[[str, str], None] | None

    def __post_init__(self):
        self.safe = _safe_name(self.model)
        (self.out / "artifacts").mkdir(parents=True, exist_ok=True)
        self.by_base = {m.artifact_name: m for m in self.resolved if not m.runtime}

    def _announce(self, names: list[str], stage: str):
        """An ``on_start`` hook: cell ``i`` of a batch is method ``names[i]`` at ``stage``."""
        return (lambda i: self.on_event(names[i], stage)) if self.on_event else None

    def artifact(self, base: str) -> Path:
        return self.out / "artifacts" / f"{self.safe}.{base}.wclust"

    def _base(self, m) -> str:
        return "fp32" if m.runtime else m.artifact_name  # runtime methods share fp32's

    def _kept(self, base: str) -> dict | None:
        """An artifact prepared before for the same recipe (and, if it calibrates, the
        same calibration data), to reuse."""
        meta_path = self.artifact(base).with_suffix(".prepare.json")
        if not (self.reuse and self.artifact(base).exists() and meta_path.exists()):
            return None
        from ..recipes import resolve_method

        kept = json.loads(meta_path.read_text())
        m = self.by_base.get(base) or resolve_method("fp32")
        want = (self.calib_data, self.calib_items)
        same_data = (kept.get("calib_data"), kept.get("calib_items")) == want
        same_recipe = kept.get("recipe") == (m.recipe.to_dict() if m.recipe else None)
        return kept if same_recipe and (same_data or not m.calibrated) else None

    def _recipe(self, base: str) -> dict | None:
        m = self.by_base.get(base)
        return m.recipe.to_dict() if m is not None and m.recipe is not None else None

    def prepare(self) -> list[dict]:
        """Phase 1: one cell per distinct artifact. Returns each method's result."""
        bases = list(dict.fromkeys(self._base(m) for m in self.resolved))
        prepared = {b: k for b in bases if (k := self._kept(b)) is not None}
        todo = [b for b in bases if b not in prepared]

        def prepared_one(i: int, result: dict) -> None:
            if result.get("ok"):  # kept at once: an interrupted run resumes with --reuse
                result = {**result, "recipe": self._recipe(todo[i])}
                self.artifact(todo[i]).with_suffix(".prepare.json").write_text(json.dumps(result))

        specs = [
            {
                "mode": "prepare",
                "model": self.model,
                "method": b,
                "recipe": self._recipe(b),
                "artifact": str(self.artifact(b)),
                "threads": self.threads,
                "calib_data": self.calib_data,
                "calib_items": self.calib_items,
            }
            for b in todo
        ]
        results = self.executor.map(
            specs, on_start=self._announce(todo, "compressing"), on_done=prepared_one
        )
        prepared.update(zip(todo, results, strict=True))
        return [prepared[self._base(m)] for m in self.resolved]

    def reference(self, task_name: str | None, pending: list[int]):
        """Phase 2: the original's outputs, once per run, for tasks scored against
        them. Returns (path or None, error or None)."""
        from ..tasks import get_task

        task = get_task(task_name) if task_name else None
        if task is None or task.reference is None or not pending:
            return None, None
        ref_path = self.out / "reference" / f"{self.safe}.{task_name}.safetensors"
        want = {"model": self.model, "task": task_name, "data": self.data or task.default_data()}
        want.update({"limit": self.limit, "every": self.every})
        if self.reuse and _reference_matches(ref_path, want):
            return ref_path, None
        spec = {"mode": "reference", "path": str(ref_path), "threads": self.threads, **want}
        stage = "computing the original's reference outputs"
        first = [self.resolved[pending[0]].name]
        r = self.executor.map([spec], on_start=self._announce(first, stage))[0]
        return ref_path, None if r.get("ok") else str(r.get("error"))

    def measure(self, preps, rows, pending, task_name, ref_path, ref_error, meta) -> None:
        """Phase 3: one cell per method, each loading only its artifact; ``rows``
        filled in place (and written as they come: an interrupted run keeps them)."""
        from ..tasks import get_task

        task = get_task(task_name) if task_name else None
        specs, cells = [], []
        for i in pending:
            m = self.resolved[i]
            if task is None:
                rows[i] = {
                    **_row_head(self.model, m),
                    "error": f"no task known for model {self.model!r}",
                }
            elif ref_error is not None:
                rows[i] = {
                    **_row_head(self.model, m),
                    "error": f"reference outputs failed: {ref_error}",
                }
            else:
                cells.append(i)
                specs.append(
                    {
                        "mode": "measure",
                        "artifact": str(self.artifact(self._base(m))),
                        "source": self.model,
                        "task": task_name,
                        "data": self.data or task.default_data(),
                        "limit": self.limit,
                        "every": self.every,
                        "threads": self.threads,
                        "runtime": m.runtime,
                        "reference": str(ref_path) if ref_path else None,
                    }
                )

        def measured(k: int, meas: dict) -> None:
            i = cells[k]
            rows[i] = _row(self.model, self.resolved[i], preps[i], meas)
            partial = {**meta, "task": task_name, "partial": True}
            _write(
                [rows[j] for j in sorted(rows)], self.out, partial, False, self.model, self.resolved
            )

        names = [self.resolved[i].name for i in cells]
        self.executor.map(specs, on_start=self._announce(names, "measuring"), on_done=measured)


def _row_head(model: str, m) -> dict:
    return {
        "model": model,
        "method": m.name,
        "recipe": m.spec,
        "label": m.label,
        "family": m.family,
        "notes": m.notes,
    }


def _row(model: str, m, prep: dict, meas: dict) -> dict:
    """A table row from a method's prepare and measure results."""
    row = _row_head(model, m)
    if not meas.get("ok"):
        return {**row, "error": meas.get("error")}
    lat_ms = [1000 * x for x in meas["latency_s"]]
    row.update(
        {
            "bits_per_weight": prep["bits_per_weight"],
            "ratio": prep["ratio"],
            "compress_s": prep["compress_s"] if not m.runtime else None,
            "file_mb": prep["file_mb"] if not m.runtime else None,
            "gzip_mb": prep["gzip_mb"] if not m.runtime else None,
            "load_s": meas["load_s"],
            "latency_ms_mean": statistics.fmean(lat_ms),
            "latency_ms_median": statistics.median(lat_ms),
            "latency_ms_p10": _pct(lat_ms, 0.1),
            "latency_ms_p90": _pct(lat_ms, 0.9),
            "n_clips": meas["n_items"],
            "gpu_latency_ms_mean": (
                statistics.fmean(meas["gpu_latency_s"]) * 1000
                if meas.get("gpu_latency_s")
                else None
            ),
            "vram_mb": meas.get("vram_mb"),
            "model_tensor_mb": meas["model_tensor_mb"],
            "rss_model_mb": meas["rss_model_mb"],
            "peak_rss_mb": meas["peak_rss_mb"],
            "quality": meas["quality"],
            "hypotheses": meas.get("details", {}).get("hypotheses"),
            # per-item misses (clips: word edits, images: 0/1, text windows: NLL):
            # paired intervals in the reading
            "item_errors": meas.get("details", {}).get("item_errors"),
        }
    )
    if m.runtime:
        fp32_bytes = prep["bytes_before"]
        row["bits_per_weight"] = 8 * meas["model_tensor_mb"] * 1e6 / prep["numel"]
        row["ratio"] = fp32_bytes / (meas["model_tensor_mb"] * 1e6)
    return row


def _reference_matches(path: Path, want: dict) -> bool:
    """Whether the reference file at ``path`` was written for ``want``'s settings."""
    if not path.exists():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        have = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return have == want


def _write(rows, out: Path, meta: dict, plots: bool, model: str, resolved) -> None:
    from ..report.table import write_results

    table_rows = [{k: v for k, v in r.items() if k != "hypotheses"} for r in rows]
    notes = [f"{r['method']}: FAILED: {r['error']}" for r in rows if r.get("error")]
    meta = {**meta, "notes": notes}
    write_results(table_rows, out, meta=meta)
    if not plots:
        return
    try:
        from ..report.plots import pareto_plot

        lower = True
        if meta.get("task"):
            from ..tasks import get_task

            lower = get_task(meta["task"]).lower_is_better
        pareto_plot(
            [r for r in rows if not r.get("error")], out / "pareto.png", lower_is_better=lower
        )
        _histogram(out, model, resolved)
    except ImportError as e:
        (out / "plots-skipped.txt").write_text(f"plots not written: {e}\n")


def _histogram(out: Path, model: str, resolved) -> None:
    """Weight histogram with centroids for the largest clustered layer of the first
    clustering method, from its artifact."""
    from ..formats import load
    from ..nn.modules import RowSplitWeight
    from ..nn.owners import clustered_weights
    from ..report.plots import histogram_plot

    safe = _safe_name(model)
    orig_path = out / "artifacts" / f"{safe}.fp32.wclust"
    from ..recipes import KMeans

    for m in resolved:
        if m.recipe is None or not isinstance(m.recipe.quantizer, KMeans):
            continue
        path = out / "artifacts" / f"{safe}.{m.artifact_name}.wclust"
        if not path.exists():
            continue
        from ..models import architecture_for

        factory = architecture_for(model)
        cms = load(path, model_factory=factory)
        cws = sorted(
            (t for t in clustered_weights(cms).values() if not isinstance(t[0], RowSplitWeight)),
            key=lambda t: -t[0].numel,
        )  # one codebook shape to draw: a row split's parts have several
        if not cws:
            return
        cw, owners = cws[0]
        name = owners[0][0]
        weights = cw.dense().detach()
        if orig_path.exists():  # the original weights, not their clustered values
            weights = load(orig_path, model_factory=factory).get_submodule(name).weight.detach()
        if cw.transpose:
            weights = weights.t()
        histogram_plot(
            weights,
            cw.codebook_float().detach(),
            out / "histogram.png",
            title=f"{model}: {name}, {m.label}",
        )
        return
