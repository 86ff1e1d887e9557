"""Vector codebooks at small batches: fp32 ``F.linear``, the torch-op table path
(``VectorWeight.matvec``, one row at a time) and the compiled operator
``wclust::vq_linear``, side by side in one run on whisper-base's shapes.

Formats as the bit allocator's vector candidates make them (bits per weight x scale
group x cluster_dim): one codebook per tensor over absmax-scaled groups of 64.
Prints a markdown table of the fastest call of each.

    python benchmarks/vector_kernel.py [--threads 2] [--shapes 512x512,2048x512]
"""

from __future__ import annotations

import argparse

import torch
from kernel_speed import bench  # the same timing (fastest call) as the scalar kernels

from wclust.core.vector import cluster_vectors
from wclust.kernels import ops
from wclust.nn.vector import VectorWeight

SHAPES = [(512, 512), (2048, 512), (512, 2048)]
FORMATS = [  # (name, bits per weight, cluster_dim): K = 2 ** (bits * d)
    ("2 bits, d=2 (K=16)", 2, 2),
    ("3 bits, d=2 (K=64)", 3, 2),
    ("4 bits, d=2 (K=256)", 4, 2),
    ("2 bits, d=4 (K=256)", 2, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes (default: whisper-base's)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not ops.available():
        raise SystemExit("the compiled kernels are not built: pip install -e .")
    torch.set_num_threads(args.threads)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    lines = [
        f"threads: {args.threads}; compiled ISA: {ops.isa()}",
        "",
        "| shape | format | batch | fp32 F.linear ms | torch-op table ms | compiled ms | compiled vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    torch.manual_seed(0)
    with torch.inference_mode():
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f) * 0.02
            for name, bits, d in FORMATS:
                vw = VectorWeight.from_clustered(
                    cluster_vectors(w, bits=bits, cluster_dim=d, scale_group_size=64)
                )
                vw._compiled_args()  # kept codes and scales, as a loaded model has them
                dense = vw.dense()
                for n in (1, 4, 8):
                    x = torch.randn(n, in_f)
                    fp32 = bench(lambda: torch.nn.functional.linear(x, dense), args.reps)  # noqa: B023
                    table = (
                        bench(lambda: vw.matvec(x[0]), args.reps) if n == 1 else float("nan")  # noqa: B023
                    )
                    vq_args = (x, *vw._compiled_args(), None, out_f)
                    comp = bench(lambda: ops.vq_linear(*vq_args), args.reps)  # noqa: B023
                    lines.append(
                        f"| {out_f}x{in_f} | {name} | {n} | {fp32:.3f} | "
                        f"{'' if n > 1 else f'{table:.3f}'} | {comp:.3f} | {fp32 / comp:.2f}x |"
                    )
                    print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
