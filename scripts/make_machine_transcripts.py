"""Writes machine transcripts of the built-in calibration clips
(wclust/data/speech/train-clean/clips/machine_transcripts.tsv).

The calibration clips come without reference transcripts; calibration and
distillation teacher-force a transcript, so each run used to transcribe its clips
with the uncompressed model first (about 1.5 s per clip for whisper-base on 2 cores).
This file holds those transcripts once: whisper-base in float32, greedy, English,
exactly as ``wclust.tasks.asr.transcribe`` writes them. They are pseudo-labels (not
checked by a person); a folder without the file falls back to the model's own.

Usage:
    python scripts/make_machine_transcripts.py [--model whisper-base] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from wclust.models import load_model
from wclust.tasks.asr import (
    MACHINE_TRANSCRIPTS,
    builtin_calibration_dir,
    load_audio_dir,
    transcribe,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="whisper-base")
    p.add_argument("--clips", default=str(builtin_calibration_dir()))
    p.add_argument("--out", default=None, help=f"default: CLIPS/{MACHINE_TRANSCRIPTS}")
    args = p.parse_args()
    out = Path(args.out or Path(args.clips) / MACHINE_TRANSCRIPTS)
    loaded = load_model(args.model)
    clips = load_audio_dir(args.clips, transcripts=False, machine=False)
    t0 = time.time()
    rows = []
    for i, clip in enumerate(clips):
        rows.append((clip.name, transcribe(loaded.model, loaded.processor, clip.audio)))
        print(f"[{i + 1}/{len(clips)}] {clip.name}: {rows[-1][1]}", flush=True)
    # written next to the target, then renamed: an interrupted run leaves the old file;
    # plain tab-separated lines, quotes literal (as load_audio_dir reads them)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("file\ttext\n")
        for name, text in rows:
            f.write(f"{name}\t{text.replace(chr(9), ' ').replace(chr(10), ' ')}\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {len(rows)} clips in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
