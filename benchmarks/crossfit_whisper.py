"""Calibrate on real speech without touching the evaluation clips: cross-fitting.

The issue allows calibration on "a disjoint part of the LibriSpeech set"; with only
the 100 evaluation clips here, every clip can still be scored by a model that never
saw it. The clips are split into ``--folds`` contiguous blocks (the 100-clip set is
10 speakers x 10 clips in file order, so two folds are speaker-disjoint); for each
block, whisper-base is compressed with a compare method calibrated (Fisher, GPTQ
Hessians; the ``*-distill`` methods also distil) on the *other* blocks' audio and
transcripts, then
decodes that block. The hypotheses of all blocks are scored together, so the WER/CER
cover all clips, same decoding and counting as ``wclust compare``.

    python benchmarks/crossfit_whisper.py --data wclust/data/speech/test-other \\
        --methods budget-4.25,nf4
    # distillation on the calibration block (KL to fp32), as `wclust compare --calib-data` does:
    python benchmarks/crossfit_whisper.py --data wclust/data/speech/test-other \
        --methods fit-4b-enc64-g128-distill
    # other distillation settings than the methods': --distill-epochs 2 --lr 1e-4
    # --pseudo-labels: calibrate/distil without the transcripts (fp32 transcribes the clips)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import wclust
from wclust.models import load_model
from wclust.recipes import resolve_method
from wclust.stages.train import distill_
from wclust.tasks import TaskData, get_task
from wclust.tasks.asr import evaluate, wer_cer


def folds(n: int, k: int) -> list[range]:
    """``k`` contiguous blocks covering ``range(n)``, sizes differing by at most one."""
    if not 2 <= k <= n:
        raise ValueError(f"--folds must be between 2 and the number of clips ({n}), got {k}")
    edges = [round(i * n / k) for i in range(k + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="clips with transcripts (evaluation set)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--methods", default="fit-4b-enc64-g128-fisher")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument(
        "--only-fold",
        type=int,
        help="screen: run this block only (0-based) and score its clips alone",
    )
    ap.add_argument(
        "--distill-epochs", type=int, default=0, help="distil a method that does not (epochs)"
    )
    ap.add_argument("--lr", type=float, default=3e-5, help="with --distill-epochs")
    ap.add_argument(
        "--distill-opts",
        type=json.loads,
        default={},
        help="override a *-distill method's options, JSON: '{\"hidden\": 10}'",
    )
    ap.add_argument("--fp32", action="store_true", help="also decode the fp32 model")
    ap.add_argument(
        "--pseudo-labels",
        action="store_true",
        help="drop the calibration clips' transcripts: the fp32 model transcribes them",
    )
    ap.add_argument(
        "--before", action="store_true", help="with --distill-epochs: also score before distilling"
    )
    ap.add_argument("--out", help="write every row's transcripts to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(format="    %(message)s")
    logging.getLogger("wclust.stages.train").setLevel(logging.INFO)  # distillation epochs
    base = load_model(args.model)
    task = get_task(base.task)
    clips = task.load_data(args.data, None, 1)
    blocks = folds(len(clips), args.folds)
    scored = range(len(clips))
    if args.only_fold is not None:
        blocks = [blocks[args.only_fold]]
        scored = blocks[0]
    refs = [c.text for c in clips]
    print(f"{len(clips)} clips, folds {[(b.start, b.stop) for b in blocks]}", flush=True)
    rows = {"names": [c.name for c in clips], "references": refs}
    if args.fp32:
        with torch.inference_mode():
            r = evaluate(base.model, base.processor, clips)
        print(f"fp32: WER {r['wer']:.2f}% CER {r['cer']:.2f}%", flush=True)
        rows["fp32"] = r["hypotheses"]
    for name in args.methods.split(","):
        recipe = resolve_method(name).recipe
        if args.distill_opts:
            if recipe.distill is None:
                raise SystemExit(f"--distill-opts: {name} does not distil")
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in args.distill_opts.items()}
            recipe = recipe.replace(distill=dataclasses.replace(recipe.distill, **opts))
            name += " " + json.dumps(args.distill_opts)
        hyps: list[str | None] = [None] * len(clips)
        before: list[str | None] = [None] * len(clips)
        bits, secs = [], 0.0
        for block in blocks:
            calib = [c for i, c in enumerate(clips) if i not in block]
            if args.pseudo_labels:
                calib = [dataclasses.replace(c, text="") for c in calib]
            torch.manual_seed(0)
            student = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = wclust.compress_(student.model, recipe, TaskData(student, calib))
            for layer in report.layers:
                if layer.row_split:  # where the allocator put the bits of a split layer
                    ranges = ", ".join(
                        f"{a}-{b}: {r['bits']}-bit/{r['group_size']}"
                        for r in layer.row_split
                        for a, b in [r["rows"]]
                    )
                    print(f"  {layer.name} rows {ranges}", flush=True)
            if args.distill_epochs and args.before:
                with torch.inference_mode():
                    r = evaluate(student.model, base.processor, [clips[i] for i in block])
                for i, h in zip(block, r["hypotheses"], strict=True):
                    before[i] = h
                print(f"  before distillation: WER {r['wer']:.2f}% on its block", flush=True)
            if args.distill_epochs:
                batches = task.calibration_batches(base.model, base.processor, calib)
                distill_(student.model, base.model, batches, epochs=args.distill_epochs, lr=args.lr)
            secs += time.perf_counter() - t0
            bits.append(report.bits_per_weight)
            with torch.inference_mode():
                r = evaluate(student.model, base.processor, [clips[i] for i in block])
            for i, h in zip(block, r["hypotheses"], strict=True):
                hyps[i] = h
            print(
                f"  {name} fold {block.start}-{block.stop}: {report.bits_per_weight:.3f} "
                f"bits/weight, WER {r['wer']:.2f}% CER {r['cer']:.2f}% on its block",
                flush=True,
            )
            del student
            if args.out:  # partial: the folds done so far (None for the others)
                Path(args.out).write_text(json.dumps({**rows, name + " (partial)": hyps}, indent=1))
        if args.distill_epochs and args.before:
            s = wer_cer([refs[i] for i in scored], [before[i] for i in scored])
            rows[name] = before
            print(
                f"{name} before distillation: WER {s['wer']:.2f}% CER {s['cer']:.2f}%", flush=True
            )
        s = wer_cer([refs[i] for i in scored], [hyps[i] for i in scored])
        tag = f" + distill {args.distill_epochs} ep lr {args.lr:g}" if args.distill_epochs else ""
        tag += " (pseudo-labels)" if args.pseudo_labels else ""
        rows[name + tag] = hyps
        print(
            f"{name}{tag}: {max(bits):.3f} bits/weight, WER {s['wer']:.2f}% CER {s['cer']:.2f}% "
            f"({len(scored)} of {len(clips)} clips, cross-fitted), compress "
            f"{secs / len(blocks):.0f} s per fold",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from wclust._env import quiet_third_party

    quiet_third_party()
    main()
