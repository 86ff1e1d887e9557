"""Fast screening of compression methods on Whisper: teacher-forced loss, no decoding.

Greedy decoding of 100 LibriSpeech clips takes minutes per method on 2 cores; the
teacher-forced cross-entropy of the reference transcripts takes seconds and moves
with WER. This script applies each method in-process (same code as ``wclust
compare``'s prepare step, Fisher computed once and reused), then reports for each:

- bits per weight, everything counted (the compression report);
- mean token cross-entropy on the evaluation clips and its increase over fp32;
- mean KL divergence of the next-token distribution from fp32's;
- optionally greedy WER/CER on a few clips (``--wer-clips``).

Use it to choose what to measure with ``wclust compare``; the table in
docs/results.md comes from ``compare``, not from this proxy.

    python benchmarks/proxy_loss.py --model whisper-base \\
        --data wclust/data/speech/test-other --every 5 \\
        --methods nf4,kmeans-4b-channel,scaled-4b
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

import wclust
from wclust.models import load_model
from wclust.recipes import resolve_method
from wclust.stages.calibrate import calibrate
from wclust.tasks import get_task


def _logits(model, batches):
    out = []
    with torch.inference_mode():
        for b in batches:
            r = model(input_features=b["input_features"], decoder_input_ids=b["decoder_input_ids"])
            keep = b["labels"][0] != -100
            out.append(r.logits[0][keep].float())
    return out


def _scores(logits, ref_logits, batches):
    ce, kl, n = 0.0, 0.0, 0
    for lg, rf, b in zip(logits, ref_logits, batches, strict=True):
        y = b["labels"][0][b["labels"][0] != -100]
        ce += float(F.cross_entropy(lg, y, reduction="sum"))
        lp, rp = F.log_softmax(lg, -1), F.log_softmax(rf, -1)
        kl += float((rp.exp() * (rp - lp)).sum())
        n += len(y)
    return ce / n, kl / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--data", required=True, help="evaluation clips folder")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--methods", required=True, help="comma-separated compare methods")
    ap.add_argument("--wer-clips", type=int, default=0, help="also decode this many clips")
    ap.add_argument(
        "--wer-every",
        type=int,
        default=None,
        help="decode every n-th clip of --data (all with 1) instead of the screened ones",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        default=None,
        help="JSON merged into every method's ClusterConfig, e.g. "
        '\'{"overrides": {"model.decoder.embed_tokens": {"method": "nf4"}}}\'',
    )
    ap.add_argument(
        "--set-method",
        default=None,
        help="JSON of CompareMethod fields to replace in every method, e.g. "
        '\'{"extra": {"gptq": {"damp": 0.1, "exclude": ["model.decoder.*"]}}}\'',
    )
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.model)
    task = get_task(base.task)
    data = task.load_data(args.data, None, args.every)
    batches = task.calibration_batches(base.model, base.processor, data)
    ref = _logits(base.model, batches)
    fp_ce, _ = _scores(ref, ref, batches)
    print(f"{'method':34s} {'bits':>6s} {'CE':>7s} {'dCE':>7s} {'KL':>7s} {'s':>6s}")
    print(f"{'fp32':34s} {32.0:6.2f} {fp_ce:7.4f} {0.0:7.4f} {0.0:7.4f}")
    fisher: dict[str, dict] = {}
    rows = []
    for name in args.methods.split(","):
        recipe = resolve_method(name).recipe
        if args.set and recipe is not None:
            recipe = recipe.replace(
                quantizer=dataclasses.replace(recipe.quantizer, **json.loads(args.set))
            )
        if args.set_method:
            recipe = recipe.replace(**json.loads(args.set_method))
        loaded = copy.deepcopy(base)
        sw = None
        cal = recipe.calibration if recipe is not None else None
        if cal:
            if cal.kind not in fisher:
                calib = task.load_data(None, cal.items)
                cb = task.calibration_batches(base.model, base.processor, calib)
                fisher[cal.kind] = calibrate(base.model, cb, kind=cal.kind)
            sw = fisher[cal.kind]
        t0 = time.perf_counter()
        report = wclust.compress_(
            loaded.model, recipe or wclust.ClusterConfig(include=()), sample_weights=sw
        )
        secs = time.perf_counter() - t0
        ce, kl = _scores(_logits(loaded.model, batches), ref, batches)
        row = {
            "method": name,
            "bits_per_weight": report.bits_per_weight,
            "ce": ce,
            "dce": ce - fp_ce,
            "kl": kl,
            "compress_s": secs,
        }
        if args.wer_clips or args.wer_every:
            clips = (
                data if args.wer_every is None else task.load_data(args.data, None, args.wer_every)
            )
            with torch.inference_mode():
                r = task.evaluate(loaded.model, loaded.processor, clips[: args.wer_clips or None])
            row["quality"] = r["quality"]
        rows.append(row)
        extra = f"  {row['quality']}" if "quality" in row else ""
        print(
            f"{name:34s} {report.bits_per_weight:6.2f} {ce:7.4f} {ce - fp_ce:7.4f} {kl:7.4f} "
            f"{secs:6.1f}{extra}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fp32_ce": fp_ce, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    from wclust._env import quiet_third_party

    quiet_third_party()
    main()
