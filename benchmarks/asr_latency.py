"""Seconds per clip of Whisper transcription for one or more .wclust files (and the
uncompressed source with ``--fp32``), side by side in one process: each round
transcribes the clips with every model in turn, the first clip a warm-up.

    python benchmarks/asr_latency.py FILE.wclust [FILE2.wclust ...] [--fp32] [--rounds 3] \
        [--source whisper-tiny.en] [--clips 3] [--data DIR]

Whole-process memory, load time and time to first transcription:
``benchmarks/process_memory.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

import wclust
from wclust.models import load_model, load_processor
from wclust.tasks.asr import builtin_clips_dir, load_audio_dir, transcribe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", metavar="file")
    ap.add_argument("--source", default="whisper-tiny.en", help="model the files came from")
    ap.add_argument("--fp32", action="store_true", help="also time the uncompressed source")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over every model, alternating")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", help="folder of clips (default: the built-in clips)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"fp32": load_model(args.source).model} if args.fp32 else {}
    models.update({f: wclust.load(f) for f in args.files})
    proc = load_processor(args.source, next(iter(models.values())))
    clips = load_audio_dir(args.data or builtin_clips_dir(), limit=args.clips + 1)
    n = max(len(clips) - 1, 1)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            transcribe(model, proc, clips[0].audio)  # warm-up, not timed
        for _ in range(args.rounds):
            for name, model in models.items():
                t = time.perf_counter()
                for c in clips[1:]:
                    transcribe(model, proc, c.audio)
                times[name].append((time.perf_counter() - t) / n)
    for name, ts in times.items():
        line = f"{name}: " + ", ".join(f"{t:.2f}" for t in ts) + f" s per clip ({n} clips)"
        if args.fp32:
            line += f"; fastest {min(times['fp32']) / min(ts):.2f}x fp32's speed"
        print(line)


if __name__ == "__main__":
    main()
