"""WER and time of a compressed Whisper with and without int8 many-row products.

``wclust.nn.modules.set_int8_matmul`` runs the products with more than 64 rows (the
encoder's 1500 frames, cross-attention keys and values) as int8 GEMMs: inputs
quantized per row, decoded weights per output row. This script transcribes the same
clips with the fp32 model, the compressed model as it loads, and the compressed
model with int8 products, in one process (one model after another, same clips), and
prints WER, CER and the median time per clip of each, with ratios to fp32.

    python benchmarks/int8_matmul.py FP32.wclust COMPRESSED.wclust [-m whisper-base] [--limit 100]

Both files come from ``wclust compress`` (``--recipe fp32`` for the original: the
same loading path for both).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32")
    ap.add_argument("compressed")
    ap.add_argument("-m", "--model", default="whisper-base")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import wclust
    from wclust.models import architecture_for, load_processor
    from wclust.nn.modules import set_int8_matmul
    from wclust.tasks.asr import builtin_eval_dir, evaluate, load_audio_dir

    torch.set_num_threads(a.threads)
    clips = load_audio_dir(builtin_eval_dir(), a.limit)
    processor = load_processor(a.model)
    rows = []
    for label, path, int8 in (
        ("fp32", a.fp32, False),
        ("compressed", a.compressed, False),
        ("compressed + int8 products", a.compressed, True),
    ):
        model = wclust.load(path, model_factory=architecture_for(a.model))
        if int8:
            set_int8_matmul(model)
        with torch.inference_mode():
            r = evaluate(model, processor, clips)
        rows.append((label, r["wer"], r["cer"], statistics.median(r["latency_s"])))
        print(label, rows[-1], file=sys.stderr, flush=True)
        del model
        gc.collect()
    base = rows[0][3]
    print(f"\n{a.model}, {len(clips)} clips, {a.threads} threads, {a.compressed}\n")
    print("| model | WER % | CER % | median s/clip | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for label, wer, cer, t in rows:
        print(f"| {label} | {wer:.2f} | {cer:.2f} | {t:.3f} | {base / t:.2f}x faster |")


if __name__ == "__main__":
    main()
