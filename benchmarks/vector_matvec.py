"""Batch-1 matvec of vector-codebook weights (``VectorWeight.matvec``: a table of
centroid . x-slice products, one gather per code, a sum per row) against fp32 dense
``F.linear`` and against decoding the dense weight first, on whisper-base shapes.

    python benchmarks/vector_matvec.py [--repeat 50] [--threads 2]

Codes and centroids are random (timing does not depend on their values). Prints
microseconds per call and the ratio to F.linear.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from wclust.core.packing import pack_codes
from wclust.nn.vector import VectorWeight

SHAPES = [(512, 512), (2048, 512), (512, 2048), (51865, 512)]
CONFIGS = [(2, 3, None), (2, 3, 64), (2, 4, 64), (4, 2, 64)]  # (d, bits per weight, scale group)


def _time(fn, repeat):
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e6


def make(shape, d, bits, group):
    out_f, in_f = shape
    k = 1 << (bits * d)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, k, (out_f * in_f // d,), generator=g)
    cb = torch.randn(1, k, d, generator=g).half()
    scale = None if group is None else torch.rand(out_f * in_f // group, generator=g).half()
    return VectorWeight(
        pack_codes(codes, bits * d), cb, None, shape, bits * d, d, group_scale=scale
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| shape | d | bits/weight (codes) | scale group | F.linear fp32 us | matvec us | "
          "ratio | dense() + F.linear us |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for shape in SHAPES:
            w = torch.randn(shape)
            x = torch.randn(1, shape[1])
            t_ref = _time(lambda: F.linear(x, w), args.repeat)  # noqa: B023
            for d, bits, group in CONFIGS:
                vw = make(shape, d, bits, group)
                torch.testing.assert_close(vw.matvec(x), vw.dense() @ x[0], rtol=1e-3, atol=1e-2)
                t_mv = _time(lambda: vw.matvec(x), args.repeat)  # noqa: B023
                t_dense = _time(lambda: F.linear(x, vw.dense()), max(3, args.repeat // 10))  # noqa: B023
                print(
                    f"| {shape[0]}x{shape[1]} | {d} | {bits} | {group or '-'} | {t_ref:.0f} | "
                    f"{t_mv:.0f} | {t_mv / t_ref:.2f} | {t_dense:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
