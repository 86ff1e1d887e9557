"""Writes a model's own transcripts of the built-in calibration clips into
wclust/data/speech/train-clean/clips/machine_transcripts.tsv (columns file, model,
text; the rows of other models are kept).

The calibration clips come without reference transcripts; calibration and
distillation teacher-force the uncompressed model's own transcript, so each run
transcribed its clips first (1-4 s per clip for whisper-base on 2 cores). The file
holds them once per built-in model: float32, greedy, English, exactly as
``wclust.tasks.asr.transcribe`` writes them, so the Fisher weights are the same as
from transcribing. Only the model named in a row uses that row; other models still
transcribe the clips themselves (another model's transcripts make worse labels:
whisper-tiny.en calibrated on whisper-base's transcripts lost 2.9 WER points on the
demo's clips).

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
    clips = load_audio_dir(args.clips, transcripts=False)
    t0 = time.time()
    rows = []
    for i, clip in enumerate(clips):
        rows.append((clip.name, transcribe(loaded.model, loaded.processor, clip.audio)))
        print(f"[{i + 1}/{len(clips)}] {clip.name}: {rows[-1][1]}", flush=True)
    kept = []  # other models' rows, as they were
    if out.is_file():
        lines = out.read_text(encoding="utf-8").splitlines()[1:]
        kept = [ln for ln in lines if ln.split("\t")[1:2] != [args.model]]
    # written next to the target, then renamed: an interrupted run leaves the old file;
    # plain tab-separated lines, quotes literal (as load_audio_dir reads them)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("file\tmodel\ttext\n")
        f.writelines(ln + "\n" for ln in kept)
        for name, text in rows:
            text = text.replace("\t", " ").replace("\n", " ")
            f.write(f"{name}\t{args.model}\t{text}\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {len(rows)} clips in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
