"""Synthesizes the built-in ASR test clips (wclust/data/clips) with Debian's flite.

The sentences are written for this project (no copyright); numbers are spelled out as a
speaker would say them. Output: 16 kHz mono 16-bit FLAC files plus transcripts.tsv
(columns file, text), readable by ``wclust.tasks.asr.load_audio_dir``.

Usage (needs ``apt-get install flite``):
    python scripts/make_clips.py [--voice slt] [--out wclust/data/clips]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening.",
    "Please bring three apples and a loaf of bread.",
    "The last train to the coast leaves before midnight.",
    "She painted the kitchen door a bright shade of yellow.",
    "Our team finished the project two weeks ahead of schedule.",
    "A cold wind blew across the empty field.",
    "He counted forty two boats in the harbor this morning.",
    "The library closes early on Sundays.",
    "Could you turn down the music a little?",
    "Fresh snow covered the mountain road overnight.",
    "The children planted sunflowers along the garden fence.",
    "My grandmother was born in nineteen fifty one.",
    "The museum opens at nine and closes at five.",
    "She kept one hundred and twelve copper coins in a jar.",
    "The doctor asked him to rest for a few days.",
    "We walked home slowly after the concert ended.",
    "The recipe needs two cups of flour and one egg.",
    "A small dog barked at the delivery truck.",
    "The meeting has been moved to Thursday afternoon.",
    "Birds build their nests in early spring.",
    "The bridge is about six hundred meters long.",
    "He forgot his umbrella and got soaked in the rain.",
    "The price of coffee went up again last month.",
    "Turn left at the second traffic light.",
]

RATE = 16_000
PAD_S = 0.25  # silence around each sentence, as in real recordings; flite starts abruptly


def synthesize(text: str, voice: str) -> np.ndarray:
    """Returns flite's rendering of text as float32 mono at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != RATE:  # kal is 8 kHz
        g = math.gcd(RATE, rate)
        audio = resample_poly(audio, RATE // g, rate // g).astype(np.float32)
    pad = np.zeros(int(PAD_S * RATE), np.float32)
    return np.concatenate([pad, audio, pad])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voice", default="rms", help="flite voice (flite -lv lists them)")
    ap.add_argument("--out", type=Path, default=Path("wclust/data/clips"))
    args = ap.parse_args()
    if shutil.which("flite") is None:
        raise SystemExit("flite not found: apt-get install flite")

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("clip_*.flac"):  # a shorter list must not leave stale clips
        old.unlink()
    rows = ["file\ttext"]
    for i, text in enumerate(SENTENCES, 1):
        name = f"clip_{i:02d}.flac"
        sf.write(args.out / name, synthesize(text, args.voice), RATE, subtype="PCM_16")
        rows.append(f"{name}\t{text}")
    (args.out / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{len(SENTENCES)} clips, voice {args.voice}, {size / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
