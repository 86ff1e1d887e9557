"""Where clustering hurts: cluster one group of layers at a time, measure the task.

For every task (asr: WER/CER of greedy decoding; embed, vision: agreement with the
original; lm: perplexity). In one process (quality only; no
latency or memory is measured here, use ``wclust compare`` for those). Each row
clusters only the layers matched by its globs, starting from a fresh copy of the
original, and reports the task's metrics and the share of the model's weights clustered.

Example:
    python benchmarks/layer_sensitivity.py --model efficientnet-lite0 --bits 4 \\
        --group stem=_conv_stem --group expand='*_expand_conv' \\
        --group depthwise='*_depthwise_conv' --group project='*_project_conv' \\
        --group head=_conv_head --group fc=_fc --group all='*'
    python benchmarks/layer_sensitivity.py --model whisper-base \
        --data wclust/data/speech/test-other --method nf4 --group-size 64 \
        --group enc.attn='model.encoder.layers.*.self_attn.*' \
        --group embed='model.decoder.embed_tokens,proj_out'
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import wclust
from wclust.config import DEFAULT_EXCLUDE
from wclust.models import load_model
from wclust.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--granularity", default="channel")
    ap.add_argument("--method", default="exact", help="per-tensor method, e.g. exact, nf4")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument(
        "--group", action="append", required=True, help="NAME=GLOB[,GLOB...] (repeatable)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    task = get_task(loaded.task)
    data = task.load_data(args.data, args.limit, args.every)
    kwargs = {}
    if task.reference is not None:
        with torch.inference_mode():
            kwargs["reference"] = task.reference(loaded.model, loaded.processor, data)
    total = sum(p.numel() for p in loaded.model.parameters())
    print(
        f"{args.model}, task {loaded.task}, {args.method} {args.bits}-bit per "
        f"{args.group_size or args.granularity}, "
        f"{total / 1e6:.2f}M parameters"
    )
    print("| layers | globs | weights clustered | bits/weight (model) | quality | time (s) |")
    print("|---|---|---:|---:|---|---:|")
    for spec in args.group:
        name, _, globs = spec.partition("=")
        model = copy.deepcopy(loaded.model)
        cfg = wclust.ClusterConfig(
            bits=args.bits,
            granularity=args.granularity,
            method=args.method,
            group_size=args.group_size,
            include=tuple(globs.split(",")),
            exclude=DEFAULT_EXCLUDE,
        )
        t0 = time.perf_counter()
        report = wclust.compress_(model, cfg)
        share = sum(layer.numel for layer in report.clustered) / total
        with torch.inference_mode():
            r = task.evaluate(model, loaded.processor, data, **kwargs)
        q = ", ".join(f"{k}={v:.4g}" for k, v in r["quality"].items())
        print(
            f"| {name} | `{globs}` | {100 * share:.1f}% | {report.bits_per_weight:.2f} | {q} "
            f"| {time.perf_counter() - t0:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
