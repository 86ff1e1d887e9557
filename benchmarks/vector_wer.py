"""WER of whisper-base with scalar vs vector codebooks at equal bits per weight.

    python benchmarks/vector_wer.py --runs vec-d2-3b scalar-3b [--limit N] [--out FILE]

Each run compresses whisper-base with one uniform configuration (every matrix,
positional tables excluded, no calibration: unweighted errors), then transcribes
the evaluation clips greedily. Runs: ``scalar-<b>b`` (scaled-fit: one fitted codebook
per tensor over float16-scaled groups of 64) and ``vec-d<d>-<b>b`` (the same groups,
vector codebooks of ``d`` weights started from that scalar codebook, float16
centroids). Prints bits per weight (everything counted), WER and CER per run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

EVAL = str(Path(__file__).resolve().parents[1] / "wclust/data/speech/test-other")


def config_for(run: str):
    from wclust.config import ClusterConfig

    m = re.fullmatch(r"(scalar|vec-d(\d))-(\d)b", run)
    if not m:
        raise SystemExit(f"unknown run {run!r}: use scalar-<bits>b or vec-d<dim>-<bits>b")
    dim = int(m.group(2) or 1)
    return ClusterConfig(
        bits=int(m.group(3)),
        method="scaled-fit",
        group_size=64,
        cluster_dim=dim,
        codebook_dtype="float16" if dim > 1 else "float32",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["vec-d2-3b", "scalar-3b"])
    ap.add_argument("--data", default=EVAL)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", help="append one JSON line per run here")
    args = ap.parse_args()
    # benchmarks/kernels.py would shadow the ``kernels`` package transformers imports
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]
    import wclust
    from wclust.api import clustered_weights
    from wclust.models import load_model
    from wclust.tasks.asr import evaluate, load_audio_dir

    clips = load_audio_dir(args.data, limit=args.limit)
    for run in args.runs:
        cfg = config_for(run)
        loaded = load_model("whisper-base")
        t = time.perf_counter()
        rep = wclust.compress_(loaded.model, cfg)
        t_compress = time.perf_counter() - t
        for cw, _ in clustered_weights(loaded.model).values():
            cw.set_cache(True)  # decode each weight once: quality, not speed, is measured
        with torch.inference_mode():
            res = evaluate(loaded.model, loaded.processor, clips, warmup=False)
        row = {
            "run": run,
            "config": cfg.to_dict(),
            "bits_per_weight": rep.bits_per_weight,
            "wer": res["wer"],
            "cer": res["cer"],
            "n_clips": res["n_clips"],
            "compress_s": round(t_compress),
        }
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
