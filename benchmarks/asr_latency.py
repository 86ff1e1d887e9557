"""Seconds per clip of Whisper transcription for one or more .wclust files, in one
process each time it is invoked (quick latency check, first clip as warm-up).

    python benchmarks/asr_latency.py FILE.wclust [--source whisper-tiny.en] [--clips 3] [--data DIR]

Whole-process memory, load time and time to first transcription:
``benchmarks/process_memory.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

import wclust
from wclust.models import load_processor
from wclust.tasks.asr import builtin_clips_dir, load_audio_dir, transcribe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--source", default="whisper-tiny.en", help="model the file came from")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", help="folder of clips (default: the built-in clips)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = wclust.load(args.file)
    proc = load_processor(args.source, model)
    clips = load_audio_dir(args.data or builtin_clips_dir(), limit=args.clips + 1)
    with torch.inference_mode():
        transcribe(model, proc, clips[0].audio)  # warm-up, not timed
        t = time.perf_counter()
        for c in clips[1:]:
            transcribe(model, proc, c.audio)
    n = len(clips) - 1
    print(f"{args.file}: {(time.perf_counter() - t) / max(n, 1):.2f} s per clip ({n} clips)")


if __name__ == "__main__":
    main()
