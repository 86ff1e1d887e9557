"""Does distillation fine-tuning of the codebooks and scales help a compressed Whisper?

An experiment (its result was negative: docs/experiments, whisper-base quality log, 1e); the distillation itself is
``wclust.distill_`` (the library's; run 1e used this script's own copy
of the same loop, with the batch order drawn from torch's global generator).
Compresses whisper-base with a compare method (Fisher from the built-in clips), then
trains every clustered weight's codebook and per-group scales (codes fixed) and the
dense norms/biases (lr/10) to match the fp32 model's next-token distributions
(KL, teacher-forced on the reference text), on speech synthesized with Debian's
``flite`` from the package's built-in sentences (4 voices) plus the built-in clips:
no LibriSpeech audio is used for training. Then decodes the evaluation clips.

    python benchmarks/distill_whisper.py --data wclust/data/speech/test-other \\
        --method fit-4b-enc64-g128-fisher --clips 159 --epochs 1 --lr 1e-4
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import tempfile
from pathlib import Path

import torch

import wclust
from wclust.models import load_model
from wclust.recipes import resolve_method
from wclust.stages.calibrate import calibrate
from wclust.stages.train import distill_
from wclust.tasks import get_task
from wclust.tasks.asr import evaluate, load_audio_dir
from wclust.tasks.embed import builtin_sentences

VOICES = ("awb", "rms", "slt", "kal16")  # flite's 16 kHz voices


def synthesize(n: int, out: Path) -> Path:
    rows = ["file\ttext"]
    lines = [t for t in builtin_sentences().read_text().splitlines() if t and t[0] != "#"]
    for i, text in enumerate(lines[:n]):
        name = f"s{i:03d}.wav"
        voice = VOICES[(i + 1) % len(VOICES)]  # as in the recorded run: rms first
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(out / name)], check=True)
        rows.append(f"{name}\t{text}")
    (out / "transcripts.tsv").write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="evaluation clips")
    ap.add_argument("--method", default="fit-4b-enc64-g128-fisher")
    ap.add_argument("--clips", type=int, default=159, help="synthesized training clips")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = load_model("whisper-base")
    task = get_task(base.task)
    teacher = base.model.eval()
    recipe = resolve_method(args.method).recipe
    sw = None
    if recipe.calibration:
        calib = task.calibration_batches(teacher, base.processor, task.load_data(None, 16))
        sw = calibrate(teacher, calib, kind=recipe.calibration.kind)
    student = copy.deepcopy(base)
    report = wclust.compress_(student.model, recipe, sample_weights=sw)
    print(f"{args.method}: {report.bits_per_weight:.3f} bits/weight", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train = load_audio_dir(synthesize(args.clips, Path(tmp))) + task.load_data(None, None)
        batches = task.calibration_batches(teacher, base.processor, train)
    distill_(
        student.model,
        teacher,
        batches,
        epochs=args.epochs,
        lr=args.lr,
        log=lambda e, kl, _, secs: print(f"epoch {e}: mean KL {kl:.4f} ({secs:.0f} s)", flush=True),
    )
    model = student.model
    data = task.load_data(args.data, None, 1)
    with torch.inference_mode():
        r = evaluate(model, base.processor, data)
    print(f"after distillation: WER {r['wer']:.2f}% CER {r['cer']:.2f}%", flush=True)


if __name__ == "__main__":
    from wclust._env import quiet_third_party

    quiet_third_party()
    main()
