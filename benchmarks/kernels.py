"""GEMV (batch 1) and small-batch GEMM on clustered weights, side by side in one run.

For each shape: fp32 dense ``F.linear``, the dense-rebuild path (decode the packed
codes, then ``F.linear``), the LUT kernel on packed 4-bit and 8-bit codes (per-row
codebooks), NF4 through the same kernel (shared table + scale per 64), and torch
dynamic int8. Prints a markdown table with median times, ratios to fp32 dense,
bytes of weight read per call and the fraction of the measured memory bandwidth.

    python benchmarks/kernels.py [--quick] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import wclust

WHISPER_BASE_SHAPES = [(512, 512), (2048, 512), (512, 2048), (51865, 512)]


def bench(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def bandwidth_gbs(reps: int = 5) -> float:
    """Measured read bandwidth: summing a 512 MB tensor."""
    a = torch.ones(128 << 20)
    return a.numel() * 4 / (bench(lambda: a.sum(), reps) / 1000) / 1e9


def row(shape, batch, reps):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(batch, in_f)
    res = {}
    with torch.inference_mode():
        res["fp32 dense"] = (bench(lambda: lin(x), reps), out_f * in_f * 4)
        for name, cfg in [
            ("k-means 4-bit LUT", wclust.ClusterConfig(bits=4, method="kmeans", init="density")),
            ("k-means 8-bit LUT", wclust.ClusterConfig(bits=8, method="kmeans", init="density")),
            ("NF4 g64 LUT", wclust.ClusterConfig(bits=4, method="nf4")),
        ]:
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
            m[0].weight.data.copy_(lin.weight)
            wclust.compress_(m, cfg)
            cw = m[0].clustered
            res[name] = (bench(lambda m=m: m[0](x), reps), cw.nbytes)
            if name.startswith("k-means 4"):
                res["rebuild + dense"] = (
                    bench(lambda m=m: torch.nn.functional.linear(x, m[0].weight), reps),
                    cw.nbytes,
                )
        q = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
        )
        res["torch dynamic int8"] = (bench(lambda: q(x), reps), out_f * in_f + out_f * 8)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 20
    shapes = [(4096, 4096)] + ([] if args.quick else WHISPER_BASE_SHAPES)
    bw = bandwidth_gbs()
    lines = [
        f"measured read bandwidth: {bw:.1f} GB/s; torch threads: {args.threads}",
        "",
        "| shape (out x in) | batch | method | ms (median) | vs fp32 | MB read | % of bandwidth |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for batch in (1, 8):
            res = row(shape, batch, reps)
            base = res["fp32 dense"][0]
            for name, (ms, nbytes) in res.items():
                pct = 100 * nbytes / (ms / 1000) / 1e9 / bw
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {batch} | {name} | {ms:.2f} | "
                    f"{base / ms:.2f}x | {nbytes / 1e6:.1f} | {pct:.0f}% |"
                )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
