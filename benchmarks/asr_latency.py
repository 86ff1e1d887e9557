"""Seconds per clip of Whisper transcription for one or more .wclust files, in one
process each time it is invoked (quick latency check, first clip as warm-up).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/asr_latency.py FILE.wclust [--source whisper-tiny.en] [--clips 3]
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = wclust.load(args.file)
    proc = load_processor(args.source, model)
    clips = load_audio_dir(builtin_clips_dir(), limit=args.clips)
    with torch.inference_mode():
        transcribe(model, proc, clips[0].audio)
        t = time.perf_counter()
        for c in clips:
            transcribe(model, proc, c.audio)
    print(f"{args.file}: {(time.perf_counter() - t) / len(clips):.2f} s per clip")


if __name__ == "__main__":
    main()
