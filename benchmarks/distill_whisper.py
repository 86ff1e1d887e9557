"""Does distillation fine-tuning of the codebooks and scales help a compressed Whisper?

An experiment, not a library feature (its result was negative: BENCHMARKS.md 1e).
Compresses whisper-base with a compare method (Fisher from the built-in clips), then
trains every clustered weight's codebook and per-group scales (codes fixed) and the
dense norms/biases (lr/10) to match the fp32 model's next-token distributions
(KL, teacher-forced on the reference text), on speech synthesized with Debian's
``flite`` from the package's built-in sentences (4 voices) plus the built-in clips:
no LibriSpeech audio is used for training. Then decodes the evaluation clips.

    python benchmarks/distill_whisper.py --data ../shared/data/speech/librispeech-test-other-100 \\
        --method fit-4b-enc64-g128-fisher --clips 159 --epochs 1 --lr 1e-4
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wclust.api import clustered_weights
from wclust.calibrate import calibrate
from wclust.methods import apply_method, get_method
from wclust.models import load_model
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


def _trainable(student):
    params = []
    for cw, _ in clustered_weights(student).values():
        cb = cw.codebook_float().detach().clone()
        del cw._buffers["codebook"]
        cw.codebook, cw.codebook_scale = torch.nn.Parameter(cb), None
        sc = cw.group_scale.detach().float().clone()
        del cw._buffers["group_scale"]
        cw.group_scale = torch.nn.Parameter(sc)
        params += [cw.codebook, cw.group_scale]
    return params


def _freeze(student):
    for cw, _ in clustered_weights(student).values():
        cb = cw.codebook.detach().clone()
        del cw._parameters["codebook"]
        cw.register_buffer("codebook", cb)
        sc = cw.group_scale.detach().half()
        del cw._parameters["group_scale"]
        cw.register_buffer("group_scale", sc)


def distill_(model, teacher, batches, epochs: int, lr: float) -> None:
    """Train ``model``'s codebooks and group scales (lr) and its dense parameters
    (lr/10) to match ``teacher``'s next-token distributions on ``batches``
    (teacher-forced KL), in place; the weights end frozen again."""
    with torch.no_grad():
        targets = [
            F.log_softmax(
                teacher(**{k: b[k] for k in ("input_features", "decoder_input_ids")}).logits, -1
            )
            for b in batches
        ]
    params = _trainable(model)
    ids = {id(p) for p in params}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": dense, "lr": lr / 10}])
    model.eval()  # no dropout
    for epoch in range(epochs):
        total, t0 = 0.0, time.perf_counter()
        for i in torch.randperm(len(batches)).tolist():
            b = batches[i]
            lg = model(
                input_features=b["input_features"], decoder_input_ids=b["decoder_input_ids"]
            ).logits
            loss = F.kl_div(
                F.log_softmax(lg, -1), targets[i], log_target=True, reduction="batchmean"
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p in params[1::2]:
                    p.clamp_(min=1e-8)
            total += float(loss.detach())
        print(
            f"epoch {epoch}: mean KL {total / len(batches):.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    _freeze(model)


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
    method = get_method(args.method)
    sw = None
    if method.calibrate:
        calib = task.calibration_batches(teacher, base.processor, task.load_data(None, 16))
        sw = calibrate(teacher, calib, kind=method.calibrate)
    student = copy.deepcopy(base)
    _, report = apply_method(method, student, sample_weights=sw)
    print(f"{args.method}: {report.bits_per_weight:.3f} bits/weight", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train = load_audio_dir(synthesize(args.clips, Path(tmp))) + task.load_data(None, None)
        batches = task.calibration_batches(teacher, base.processor, train)
    distill_(student.model, teacher, batches, args.epochs, args.lr)
    model = student.model
    data = task.load_data(args.data, None, 1)
    with torch.inference_mode():
        r = evaluate(model, base.processor, data)
    print(f"after distillation: WER {r['wer']:.2f}% CER {r['cer']:.2f}%", flush=True)


if __name__ == "__main__":
    from wclust.cli import quiet_third_party

    quiet_third_party()
    main()
