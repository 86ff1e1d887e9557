"""Could mixed bits *within* Whisper's tied embedding reach ~3 bits? A screen.

The tied token embedding / output projection of whisper-base is 37% of its weights,
and 3 bits for all of it broke decoding (docs/experiments, whisper-base quality log, 1e). Here only that matrix is
replaced, by simulated ("fake") quantization: the learned per-tensor codebook with
fitted scales (``scaled-fit``) per group of ``--group-size``, with the first
``--hi-rows`` token rows at ``--hi-bits`` and the other rows at ``--lo-bits`` (each
part its own codebook); the rest of the model stays fp32. Token ids of Whisper's
byte-level BPE follow merge order, so low ids are roughly the frequent tokens: a
data-free proxy for frequency. No storage format for such a split exists in wclust:
this screen only says whether building one would pay. Reports the WER/CER of greedy
decoding and the embedding's bits per weight (codes + fp16 scales).

    python benchmarks/embedding_rows.py --data wclust/data/speech/test-other \\
        --config 51865:4:4 --config 8000:4:2 --config 16000:4:3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from wclust.core.quantizers import scaled_kmeans
from wclust.models import load_model
from wclust.tasks import get_task


def fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` after scaled-fit clustering at ``bits`` (dense float32)."""
    sc = scaled_kmeans(w, bits, group_size, method="lloyd", fit_scale=True)
    return sc.dequantize().view_as(w).to(w.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--config",
        action="append",
        required=True,
        help="HI_ROWS:HI_BITS:LO_BITS (repeatable), e.g. 8000:4:2",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    task = get_task(loaded.task)
    data = task.load_data(args.data, args.limit, args.every)
    emb = loaded.model.get_input_embeddings().weight
    vocab = emb.shape[0]
    print(f"{args.model}: tied embedding {tuple(emb.shape)}, scale groups of {args.group_size}")
    print("| rows at hi bits | hi bits | lo bits | embedding bits/weight | quality | time (s) |")
    print("|---:|---:|---:|---:|---|---:|")
    for spec in args.config:
        n_hi, hi, lo = (int(v) for v in spec.split(":"))
        n_hi = min(n_hi, vocab)
        t0 = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        w = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        if out is not None and out.weight is not w:
            raise SystemExit("this screen expects the embedding tied to the output projection")
        with torch.no_grad():
            if n_hi:
                w[:n_hi] = fake_quant(w[:n_hi].clone(), hi, args.group_size)
            if n_hi < vocab:
                w[n_hi:] = fake_quant(w[n_hi:].clone(), lo, args.group_size)
        bpw = (n_hi * hi + (vocab - n_hi) * lo) / vocab + 16 / args.group_size
        with torch.inference_mode():
            r = task.evaluate(model, loaded.processor, data)
        q = ", ".join(f"{k}={v:.4g}" for k, v in r["quality"].items())
        print(
            f"| {n_hi} | {hi} | {lo} | {bpw:.2f} | {q} | {time.perf_counter() - t0:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
