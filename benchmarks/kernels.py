"""GEMV (batch 1) and small-batch GEMM on clustered weights, side by side in one run.

For each shape: fp32 dense ``F.linear``, the dense-rebuild path (decode the packed
codes, then ``F.linear``), the compressed Linear's own batch-1 path on: 4-bit and
8-bit k-means with one codebook per output row (``lut_gemv``), and three formats with
ONE codebook per tensor that take the tiled activation-table kernel
(``lut_gemv_tiles``): 4-bit k-means per tensor, NF4 with a scale per 64, and the
learned codebook over scaled groups of 64 (``scaled-lloyd``, the method that beats
NF4 on Whisper), and the other widths of mixed-bit models (3-bit codes as 4-bit
pairs, 5- and 8-bit codes as bytes); then torch dynamic int8. On a CPU with
AVX-512 the 4-bit formats run the register-table kernel (``kernels.simd``) on their
stored rows; the rows marked "portable" run the same weights on the portable tiled
kernels, for the ratio between the two.

Cold by default: each method cycles through enough copies of its layer that the
copies together exceed 96 MB (3x this machine's 32 MB L3), as in a real model where
the other layers evict a layer's weights between two calls; ``--warm`` reuses one
copy (the weights of small formats then sit in L3 and read faster than DRAM).
Prints a markdown table with median times, ratios to fp32 dense, bytes of weight
read per call and the fraction of the measured memory bandwidth.

    python benchmarks/kernels.py [--quick] [--warm] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numba
import torch

import wclust
from wclust.kernels import simd

simd_available = simd.available

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


COLD_BYTES = 96e6  # 3x the 32 MB L3 of the machine the figures were taken on

METHODS = [
    ("k-means 4-bit per row", dict(bits=4, method="kmeans", init="density")),
    ("k-means 8-bit per row", dict(bits=8, method="kmeans", init="density")),
    ("k-means 4-bit per tensor", dict(bits=4, method="kmeans", granularity="tensor")),
    ("NF4 g64", dict(bits=4, method="nf4")),
    ("scaled-lloyd 4-bit g64", dict(bits=4, method="scaled-lloyd", group_size=64)),
    # the other widths the automatic bit allocation picks (--target-bits): 3-bit codes
    # take the 4-bit tiled kernel (stored as 4-bit pairs), 5- to 8-bit codes the
    # byte-tiled kernel (one byte per code)
    ("scaled-fit 3-bit g128", dict(bits=3, method="scaled-fit", group_size=128)),
    ("scaled-fit 5-bit g64", dict(bits=5, method="scaled-fit", group_size=64)),
    ("k-means 8-bit per tensor", dict(bits=8, method="kmeans", granularity="tensor")),
    # the portable kernels (tiled layouts) on the 4-bit formats that the AVX-512
    # register-table kernel takes where the CPU has it, for the side-by-side ratio
    ("k-means 4-bit per row, portable", dict(bits=4, method="kmeans", init="density")),
    ("NF4 g64, portable", dict(bits=4, method="nf4")),
]


def copies(make, nbytes: int, warm: bool) -> list:
    """One object (warm) or enough copies to exceed COLD_BYTES (cold)."""
    return [make() for _ in range(1 if warm else max(1, int(COLD_BYTES // nbytes) + 1))]


def cycling(objs, call):
    """A function calling ``call`` on the next object each time."""
    state = {"i": 0}
    for obj in objs:  # first calls (layout switch, cached views) are not timed
        call(obj)

    def fn():
        state["i"] = (state["i"] + 1) % len(objs)
        return call(objs[state["i"]])

    return fn


def row(shape, batch, reps, warm):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(batch, in_f)
    res = {}
    with torch.inference_mode():
        dense = copies(lambda: lin.weight.detach().clone(), out_f * in_f * 4, warm)
        res["fp32 dense"] = (
            bench(cycling(dense, lambda w: torch.nn.functional.linear(x, w)), reps),
            out_f * in_f * 4,
        )
        del dense
        for name, cfg in METHODS:
            portable = name.endswith(", portable")
            if portable and not simd_available():
                continue  # the rows above already ran the portable kernels
            simd.available = (lambda: False) if portable else simd_available
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
            m[0].weight.data.copy_(lin.weight)
            wclust.compress_(m, wclust.ClusterConfig(**cfg))
            m[0](x[:1])  # the first batch-1 call picks the layout (tiled or not)
            nbytes = m[0].clustered.nbytes
            mods = copies(lambda m=m: copy.deepcopy(m[0]), nbytes, warm)
            res[name] = (bench(cycling(mods, lambda mod: mod(x)), reps), nbytes)
            if name == "k-means 4-bit per row":
                res["rebuild + dense (4-bit per row)"] = (
                    bench(
                        cycling(mods, lambda mod: torch.nn.functional.linear(x, mod.weight)),
                        reps,
                    ),
                    nbytes,
                )
            del mods
        simd.available = simd_available
        nq = out_f * in_f + out_f * 8
        qs = copies(
            lambda: torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(copy.deepcopy(lin)), {torch.nn.Linear}, dtype=torch.qint8
            ),
            nq,
            warm,
        )
        res["torch dynamic int8"] = (bench(cycling(qs, lambda q: q(x)), reps), nq)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--warm", action="store_true", help="reuse one copy of each layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--shapes", help="comma-separated OUTxIN shapes (default: 4096x4096 and whisper-base's)"
    )
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)  # the LUT kernels' threads
    reps = 15 if args.quick else 40
    shapes = [(4096, 4096)] + ([] if args.quick else WHISPER_BASE_SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bw = bandwidth_gbs()
    lines = [
        f"measured read bandwidth: {bw:.1f} GB/s; torch threads: {args.threads}; "
        f"AVX-512 register-table kernel: {'yes' if simd.available() else 'no'}; "
        + (
            "warm (one copy per layer)"
            if args.warm
            else f"cold (copies > {COLD_BYTES / 1e6:.0f} MB)"
        ),
        "",
        "| shape (out x in) | batch | method | ms (median) | vs fp32 | MB read | % of bandwidth |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for batch in (1, 8):
            res = row(shape, batch, reps, args.warm)
            base = res["fp32 dense"][0]
            for name, (ms, nbytes) in res.items():
                pct = 100 * nbytes / (ms / 1000) / 1e9 / bw
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {batch} | {name} | {ms:.3f} | "
                    f"{base / ms:.2f}x | {nbytes / 1e6:.1f} | {pct:.0f}% |"
                )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
