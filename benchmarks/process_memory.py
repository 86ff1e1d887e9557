"""Whole-process memory and time of fp32 and compressed Whisper models.

For each method, one fresh process: import, load the model (fp32: the saved
unclustered file; others: the .wclust file), transcribe the first clip (time to
first transcription), then N more; it reports the peak resident set of the whole
process (VmHWM: everything, the interpreter, torch, kernels and temporaries
included), the peak and the resident set right after loading, load time, first-clip time and the
median per-clip time. Files are made first (``wclust.measure.worker`` prepare,
each in its own process) and reused when present in ``--workdir``.

    python benchmarks/process_memory.py -m whisper-base \\
        --methods fp32,kmeans-4b-channel,scaled-4b --clips 5 [--busy]

``--busy`` runs a ``while 1: pass`` process beside each measurement (the speed of
a compressed model next to another busy process). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DEFAULT_DATA = None  # the built-in LibriSpeech evaluation clips

CHILD = textwrap.dedent("""
    import json, statistics, sys, time
    t0 = time.perf_counter()
    import torch
    import wclust
    from wclust.models import architecture_for, load_processor
    from wclust.tasks.asr import load_audio_dir, transcribe

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # kB -> MiB
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    clips = load_audio_dir(spec["data"], spec["clips"] + 1)
    processor = load_processor(spec["model"])
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    model = wclust.load(spec["artifact"], model_factory=architecture_for(spec["model"]))
    load_s = time.perf_counter() - t1
    rss_loaded, peak_loaded = vm("VmRSS:"), vm("VmHWM:")
    t2 = time.perf_counter()
    transcribe(model, processor, clips[0].audio)
    first_s = time.perf_counter() - t2
    times = []
    for c in clips[1:]:
        t = time.perf_counter()
        transcribe(model, processor, c.audio)
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({
        "import_s": t_import, "load_s": load_s, "first_s": first_s,
        "clip_s": statistics.median(times) if times else None,
        "rss_loaded_mb": rss_loaded, "peak_load_mb": peak_loaded, "peak_rss_mb": vm("VmHWM:"),
        "numba": "numba" in sys.modules,
    }))
""")


def prepare(model: str, method: str, path: Path) -> None:
    from wclust.measure.executors import run_cell

    if path.exists():
        return
    r = run_cell({"mode": "prepare", "model": model, "method": method, "artifact": str(path)})
    if not r.get("ok"):
        raise SystemExit(f"{method}: {r.get('error')}")


def measure(spec: dict, busy: bool) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{spec['method']} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="whisper-base")
    ap.add_argument("--methods", default="fp32,kmeans-4b-channel,scaled-4b")
    ap.add_argument("--clips", type=int, default=5, help="clips after the first")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="results/process_memory")
    ap.add_argument("--busy", action="store_true", help="a busy process runs beside each")
    a = ap.parse_args()
    from wclust.recipes import resolve_method
    from wclust.tasks.asr import builtin_eval_dir

    a.data = a.data or str(builtin_eval_dir())
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in a.methods.split(","):
        path = work / f"{a.model}-{resolve_method(method).artifact_name}.wclust"
        prepare(a.model, method, path)
        spec = dict(
            model=a.model,
            method=method,
            artifact=str(path),
            data=a.data,
            clips=a.clips,
            threads=a.threads,
        )
        r = measure(spec, a.busy)
        rows.append((method, r))
        print(method, json.dumps(r), file=sys.stderr, flush=True)
    print(f"\n{a.model}, {a.clips} clips after the first, {a.threads} threads, busy={a.busy}\n")
    print(
        "| method | peak RSS MB | peak RSS during load MB | RSS after load MB | load s "
        "| first clip s | per clip s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in rows:
        clip = f"{r['clip_s']:.2f}" if r["clip_s"] is not None else "-"
        print(
            f"| {method} | {r['peak_rss_mb']:.0f} | {r.get('peak_load_mb', 0):.0f} | "
            f"{r['rss_loaded_mb']:.0f} | "
            f"{r['load_s']:.2f} | {r['first_s']:.2f} | {clip} |"
        )


if __name__ == "__main__":
    main()
