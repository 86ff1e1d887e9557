"""``wclust compare``: every method through the same measurement, one table.

For each method: a ``prepare`` process applies it and writes the artifact; then a
fresh ``measure`` process loads only that artifact and runs the task. Every cell
is thus measured in a process that never held another variant of the model.

Tasks scored against the original model rather than ground truth (embed, vision) get
one ``reference`` process per run: it loads the source model, runs it on the evaluation
data and writes the outputs to ``out_dir/reference/<model>.<task>.safetensors``; every
measure cell (fp32 included) reads that file. With ``reuse`` the file is kept when its
metadata (model, task, data, limit, every) matches.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .worker import MARK

__all__ = ["CompareError", "run_cell", "run_compare"]


class CompareError(RuntimeError):
    """A cell of the grid failed; the message carries the worker's error."""


def run_cell(spec: dict, timeout: float | None = None) -> dict:
    """Run one worker process on ``spec`` and return its result dict."""
    env = {
        # torch's OpenMP threads spin-wait after each op; with numba's kernel threads
        # between ops (and other processes on a 2-core machine) spinning costs several
        # times the work. Every cell runs with passive waiting, the original included.
        "OMP_WAIT_POLICY": "PASSIVE",
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "wclust.measure.worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"ok": False, "error": f"worker exited with {proc.returncode}: {tail}"}


def _safe_name(model: str) -> str:
    """A model name or path as a file-name part."""
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in model)


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
) -> tuple[list[dict], dict]:
    """Run the grid for one model and write ``table.md``, ``results.csv``,
    ``results.json`` and plots into ``out_dir``.

    Args:
        model: model name/path (see ``wclust.models.load_model``).
        methods: names from ``wclust.registry.METHODS``.
        out_dir: output folder; artifacts go to ``out_dir/artifacts``.
        data: task data folder (default: the task's built-in data).
        limit, every: take every n-th item, at most ``limit`` of them.
        threads: torch threads in the measuring processes.
        reuse: keep an existing artifact instead of preparing it again.
        plots: write the Pareto and histogram plots (needs matplotlib).
        on_event: progress callback ``(method, stage)``.
        command: the command line, recorded in results.json.

    Returns:
        (rows, meta). Failed cells are rows with ``error`` set.
    """
    from ..methods import get_method
    from ..tasks import get_task

    out = Path(out_dir)
    art_dir = out / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    resolved = [get_method(m) for m in methods]  # unknown names fail before any work
    if "fp32" not in methods and any(m.runtime for m in resolved):
        resolved.insert(0, get_method("fp32"))
    safe = _safe_name(model)
    prepared: dict[str, dict] = {}
    rows: list[dict] = []
    task_name = None
    reference_ok: bool | str = False  # True once the reference file exists; str: its error
    meta = {
        "model": model,
        "task": None,
        "data": data or "(built-in)",
        "limit": limit,
        "every": every,
        "threads": threads,
        "methods": [m.name for m in resolved],
        "command": command,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for i, m in enumerate(resolved):
        if i:  # partial results survive an interrupted run
            _write(rows, out, {**meta, "task": task_name, "partial": True}, False, model, resolved)
        base = "fp32" if m.runtime else m.name
        artifact = art_dir / f"{safe}.{base}.wclust"
        if base not in prepared:
            if on_event:
                on_event(m.name, "compressing")
            meta_path = artifact.with_suffix(".prepare.json")
            if reuse and artifact.exists() and meta_path.exists():
                prepared[base] = json.loads(meta_path.read_text())
            else:
                prepared[base] = run_cell(
                    {"mode": "prepare", "model": model, "method": base, "artifact": str(artifact)}
                )
                if prepared[base].get("ok"):
                    meta_path.write_text(json.dumps(prepared[base]))
        prep = prepared[base]
        row = {
            "model": model,
            "method": m.name,
            "label": m.label,
            "family": m.family,
            "notes": m.notes,
        }
        if not prep.get("ok"):
            rows.append({**row, "error": prep.get("error")})
            continue
        task_name = task_name or prep.get("task")
        if task_name is None:
            rows.append({**row, "error": f"no task known for model {model!r}"})
            continue
        task = get_task(task_name)
        ref_path = None
        if task.reference is not None:
            ref_path = out / "reference" / f"{safe}.{task_name}.safetensors"
            if not reference_ok:
                if on_event:
                    on_event(m.name, "computing the original's reference outputs")
                reference_ok = _reference(
                    model,
                    task_name,
                    data or task.default_data(),
                    limit,
                    every,
                    threads,
                    ref_path,
                    reuse,
                )
            if reference_ok is not True:
                rows.append({**row, "error": f"reference outputs failed: {reference_ok}"})
                continue
        if on_event:
            on_event(m.name, "measuring")
        meas = run_cell(
            {
                "mode": "measure",
                "artifact": str(artifact),
                "source": model,
                "task": task_name,
                "data": data or task.default_data(),
                "limit": limit,
                "every": every,
                "threads": threads,
                "runtime": m.runtime,
                "reference": str(ref_path) if ref_path else None,
            }
        )
        if not meas.get("ok"):
            rows.append({**row, "error": meas.get("error")})
            continue
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
            }
        )
        if m.runtime:
            fp32_bytes = prep["bytes_before"]
            row["bits_per_weight"] = 8 * meas["model_tensor_mb"] * 1e6 / prep["numel"]
            row["ratio"] = fp32_bytes / (meas["model_tensor_mb"] * 1e6)
        rows.append(row)
    meta["task"] = task_name
    _write(rows, out, meta, plots, model, resolved)
    return rows, meta


def _reference(model, task_name, data, limit, every, threads, path: Path, reuse: bool):
    """Write the original model's outputs for reference-scored tasks; True or an error."""
    want = {"model": model, "task": task_name, "data": data, "limit": limit, "every": every}
    if reuse and path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            have = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        if have == want:
            return True
    r = run_cell({"mode": "reference", "path": str(path), "threads": threads, **want})
    return True if r.get("ok") else str(r.get("error"))


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
    from ..api import clustered_weights
    from ..formats import load
    from ..report.plots import histogram_plot

    safe = _safe_name(model)
    orig_path = out / "artifacts" / f"{safe}.fp32.wclust"
    for m in resolved:
        if m.config is None or m.config.method not in ("exact", "kmeans"):
            continue
        path = out / "artifacts" / f"{safe}.{m.name}.wclust"
        if not path.exists():
            continue
        from ..models import architecture_for

        factory = architecture_for(model)
        cms = load(path, model_factory=factory)
        cws = sorted(clustered_weights(cms).values(), key=lambda t: -t[0].numel)
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
