"""One cell of the compare grid, run in its own fresh process.

``python -m wclust.measure.worker`` reads a JSON spec on stdin and prints one line
``WCLUST_RESULT <json>`` on stdout. Three modes:

- ``prepare``: load the source model, apply the method (timed), write the .wclust
  artifact and measure its size and gzip size;
- ``reference``: for tasks scored against the original model (embed, vision), load
  the source model and write its outputs on the evaluation data to a safetensors file
  (once per run; every ``measure`` cell reads the same file);
- ``measure``: in a process that has never held the original model, load the
  artifact (timed), apply a runtime transform if the method is one, then run the
  task: quality, latency per item (after a warm-up), memory.

Memory is reported three ways: ``model_tensor_mb`` (bytes of the parameters and
buffers the loaded model holds), ``rss_model_mb`` (growth of the process's resident
set from just before loading to just after), ``peak_rss_mb`` (peak resident set of
the whole process: interpreter, libraries, activations, temporaries).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import sys
import time

MARK = "WCLUST_RESULT "


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r * 1024 if sys.platform != "darwin" else r


def runtime_nbytes(model) -> int:
    """Bytes the model's weights occupy, counting packed quantized weights that are
    neither parameters nor buffers (torch dynamic int8, torchao tensor subclasses)."""
    import torch

    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__"):  # torchao tensor subclass: its inner tensors
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t)
    for mod in model.modules():
        packed = getattr(mod, "_packed_params", None)
        if packed is not None and hasattr(mod, "weight") and callable(mod.weight):
            w = mod.weight()
            total += w.numel() * w.element_size()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += (
                    w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
                )
            b = mod.bias()
            if b is not None:
                total += b.numel() * b.element_size()
    return total


def cell_resources(spec: dict) -> dict:
    """What a cell uses, for executors that reserve it.

    Args:
        spec: a worker cell.

    Returns:
        ``{"cpus": int, "gpu": bool}``: ``threads`` CPUs (1 when absent); ``gpu`` for
        ``measure`` cells without a runtime transform, which also time the model on the
        GPU when one is visible.
    """
    gpu = spec.get("mode") == "measure" and not spec.get("runtime")
    return {"cpus": max(1, int(spec.get("threads") or 1)), "gpu": gpu}


def _apply_runtime(model, runtime: str):
    from wclust.recipes import BASELINES

    return BASELINES.get(runtime).apply(model)


def prepare(spec: dict) -> dict:
    """Load the source model, run the cell's recipe (none: the original as it is),
    save the artifact, measure its sizes."""
    import wclust
    from wclust.config import ClusterConfig
    from wclust.measure.sizes import file_sizes
    from wclust.models import load_model
    from wclust.recipes import Recipe

    if "recipe" in spec:
        recipe = Recipe.from_dict(spec["recipe"]) if spec["recipe"] else None
    else:  # a name: a preset, a spec string or a JSON file
        from wclust.recipes import resolve_method

        recipe = resolve_method(spec["method"]).recipe
    loaded = load_model(spec["model"])
    calib_data, calib_items = spec.get("calib_data"), spec.get("calib_items")
    if calib_items and recipe is not None and recipe.calibration and recipe.distill is None:
        # the recipe calibrates on its own count of items unless told otherwise
        recipe = dataclasses.replace(
            recipe, calibration=dataclasses.replace(recipe.calibration, items=calib_items)
        )
    data = None
    if recipe is not None and (recipe.calibration or recipe.gptq or recipe.distill):
        from wclust.tasks import TaskData

        if recipe.distill is not None:
            limit = calib_items  # a distilling recipe trains on all of the data by default
        else:
            limit = calib_items or recipe.data_items
        data = TaskData.load(loaded, calib_data, limit)
    t0 = time.perf_counter()
    report = wclust.compress_(loaded.model, recipe or ClusterConfig(include=()), data)
    compress_s = time.perf_counter() - t0 if recipe is not None else 0.0
    wclust.save(
        loaded.model, spec["artifact"], report=report, config=report.config, source=spec["model"]
    )
    sizes = file_sizes(spec["artifact"])
    return {
        "compress_s": compress_s,
        "stages": report.stages,
        "bits_per_weight": report.bits_per_weight,
        "ratio": report.ratio,
        "numel": report.numel,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "layers_clustered": len(report.clustered),
        "layers_dense": len(report.layers) - len(report.clustered),
        "file_mb": sizes["file_bytes"] / 1e6,
        "gzip_mb": sizes["gzip_bytes"] / 1e6,
        "task": loaded.task,
        "calib_data": calib_data,
        "calib_items": calib_items,
    }


def reference(spec: dict) -> dict:
    """Outputs of the source model on the evaluation data, saved atomically."""
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from wclust.models import load_model
    from wclust.tasks import get_task

    torch.set_num_threads(spec["threads"])
    task = get_task(spec["task"])
    data = task.load_data(spec.get("data"), spec.get("limit"), spec.get("every", 1))
    loaded = load_model(spec["model"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = task.reference(loaded.model, loaded.processor, data)
    path = Path(spec["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        meta = {k: json.dumps(spec.get(k)) for k in ("model", "task", "data", "limit", "every")}
        save_file({k: v.contiguous() for k, v in ref.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(path), "seconds": time.perf_counter() - t0}


def measure(spec: dict) -> dict:
    import torch

    import wclust
    from wclust.models import architecture_for, load_processor
    from wclust.tasks import get_task

    torch.set_num_threads(spec["threads"])
    task = get_task(spec["task"])
    data = task.load_data(spec.get("data"), spec.get("limit"), spec.get("every", 1))
    processor = load_processor(spec.get("source"))
    kwargs = {}
    if spec.get("reference"):
        from safetensors.torch import load_file

        kwargs["reference"] = load_file(spec["reference"])
    factory = architecture_for(spec.get("source"))
    gc.collect()
    rss0 = current_rss()
    t0 = time.perf_counter()
    model = wclust.load(spec["artifact"], model_factory=factory)
    if spec.get("runtime"):
        model = _apply_runtime(model, spec["runtime"])
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1 = current_rss()
    tensor_bytes = runtime_nbytes(model)
    with torch.inference_mode():
        r = task.evaluate(model, processor, data, **kwargs)
    lat = sorted(r["latency_s"])
    out = {
        "load_s": load_s,
        "model_tensor_mb": tensor_bytes / 1e6,
        "rss_model_mb": (rss1 - rss0) / 1e6,
        "peak_rss_mb": peak_rss() / 1e6,
        "quality": r["quality"],
        "latency_s": r["latency_s"],
        "n_items": len(lat),
        "details": r.get("details", {}),
        "threads": spec["threads"],
        "gpu_latency_s": None,
        "vram_mb": None,
    }
    if torch.cuda.is_available() and not spec.get("runtime"):
        model = model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            g = task.evaluate(model, processor, data, **kwargs)
        torch.cuda.synchronize()
        out["gpu_latency_s"] = g["latency_s"]
        out["vram_mb"] = torch.cuda.max_memory_allocated() / 1e6
    return out


def main() -> None:
    from wclust._env import quiet_third_party

    quiet_third_party()
    spec = json.loads(sys.stdin.read())
    fn = {"prepare": prepare, "reference": reference, "measure": measure}[spec["mode"]]
    try:
        result = {"ok": True, **fn(spec)}
    except Exception as e:  # reported to the parent, which shows it in the table
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
