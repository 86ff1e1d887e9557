"""Every LUT kernel before (numba) and after (compiled, ``torch.ops.wclust``), side by
side in one run.

For each weight shape and format (the ones compressed models use: 4-bit k-means
with one codebook per row, NF4 and the scaled codebook with a scale per 64, 4-bit
per tensor, 3-bit codes widened to 4-bit pairs, 5- and 8-bit codes as bytes) and
each batch: fp32 ``F.linear``; the numba path the compressed Linear ran before (the
AVX-512 register-table kernel ``kernels.simd`` on 2-4-bit codes where the CPU has
it, else the tiled ``kernels.lut`` kernels, one call per row above batch 1 without
a batched kernel; above 8 rows the numba decode then ``F.linear``); the compiled
operator ``wclust::lut_linear`` the module runs now. Then the fused decode to the
dense weight, numba against ``wclust::lut_decode``. Warm: one copy of each weight
(small formats then sit in the L3 cache). Prints a markdown table of the fastest
call of each (on a busy machine a median mostly measures the scheduler).

    python benchmarks/kernel_speed.py [--quick] [--threads 2] [--formats 8-bit,NF4] [--out FILE]
    python benchmarks/kernel_speed.py --decode-only --rounds 3   # the decode, 100 calls a round
"""

from __future__ import annotations

import argparse
import time

import numba
import torch

import wclust
from wclust.core.packing import pack_codes, unpack_codes
from wclust.kernels import lut, ops, simd

WHISPER_BASE_SHAPES = [(512, 512), (2048, 512), (512, 2048), (51865, 512)]
FORMATS = [
    ("k-means 4-bit per row", dict(bits=4, method="kmeans", init="density")),
    ("NF4 g64", dict(bits=4, method="nf4")),
    ("scaled-lloyd 4-bit g64", dict(bits=4, method="scaled-lloyd", group_size=64)),
    ("k-means 4-bit per tensor", dict(bits=4, method="kmeans", granularity="tensor")),
    ("scaled-fit 3-bit g128", dict(bits=3, method="scaled-fit", group_size=128)),
    ("scaled-fit 5-bit g64", dict(bits=5, method="scaled-fit", group_size=64)),
    ("k-means 8-bit per tensor", dict(bits=8, method="kmeans", granularity="tensor")),
]


def bench(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1000  # the fastest call: robust to a shared machine's stalls


def numba_fns(cw):
    """(gemv(x) for x (n, in), decode()) as the module ran them with numba."""
    out_f, in_f = cw.shape[0], cw.numel // cw.shape[0]
    cb = cw.codebook_float()
    full = 1 << cw.bits
    if cb.shape[1] < full:
        cb = torch.cat([cb, cb.new_zeros(cb.shape[0], full - cb.shape[1])], 1)
    cb = cb.contiguous().numpy()
    sc = None if cw.group_scale is None else cw.group_scale.float().numpy()
    off = None if cw.group_offset is None else cw.group_offset.float().numpy()
    gs = cw.numel // cw.group_scale.numel() if sc is not None else 0
    codes = unpack_codes(cw.packed_rows(), cw.bits, cw.numel)
    if cw.bits <= 4 and simd.available() and simd.simd_ok(in_f, 4, gs):
        nib = pack_codes(codes, 4).numpy()
        run = simd.gemv4_fn(nib, cb, out_f, in_f, sc, off, gs)
        return (
            lambda x: run(x[0]) if x.shape[0] == 1 else run(x),
            lambda: simd.decode4(nib, cb, out_f, in_f, sc, off, gs),
        )
    if cw.bits <= 4:
        tiled = lut.tile4(pack_codes(codes, 4).numpy(), out_f, in_f)
    else:
        tiled = lut.tile8(codes.view(out_f, in_f).numpy())
    run = lut.gemv_fn(tiled, cw.bits, cb, out_f, in_f, sc, off, gs)
    return (
        lambda x: [run(r) for r in x],  # one call per row: no batched tiled kernel
        lambda: lut.decode_tiles(tiled, cb, out_f, sc, off),
    )


def time_format(cw, batches, reps):
    """(batch or "decode", numba ms, compiled ms) for one compressed weight."""
    in_f = cw.numel // cw.shape[0]
    gemv, decode = numba_fns(cw)
    args = cw._kernel_args()
    out = []
    for n in batches:
        x = torch.randn(n, in_f)
        xn = x.numpy()
        if n <= 8:
            before = bench(lambda: gemv(xn), reps)  # noqa: B023 - run at once
        else:  # the module decoded the dense weight, then F.linear

            def before_fn(x=x):
                return torch.nn.functional.linear(x, torch.from_numpy(decode()))

            before = bench(before_fn, reps)
        after = bench(lambda: torch.ops.wclust.lut_linear(x, *args, *[None] * 3), reps)  # noqa: B023
        out.append((n, before, after))
    before = bench(decode, reps)
    after = bench(lambda: torch.ops.wclust.lut_decode(*args, None, None), reps)
    out.append(("decode", before, after))
    return out


def rows_for(shape, batches, reps, formats=FORMATS):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    res = []
    with torch.inference_mode():
        w = lin.weight.detach()
        for n in batches:
            x = torch.randn(n, in_f)
            ms = bench(lambda: torch.nn.functional.linear(x, w), reps)  # noqa: B023
            res.append((n, "fp32 F.linear", ms, None))
        for name, cfg in formats:
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
            m[0].weight.data.copy_(lin.weight)
            wclust.compress_(m, wclust.ClusterConfig(**cfg))
            for n, before, after in time_format(m[0].clustered, batches, reps):
                res.append((n, name, before, after))
    return res


def int8_rows(shape, reps, n=1500, formats=FORMATS):
    """(format, fp32 F.linear ms, lut_linear ms, lut_linear_int8 ms) for n rows (a
    Whisper encoder's frames), the int8 products against the float paths."""
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(n, in_f)
    res = []
    with torch.inference_mode():
        fp32 = bench(lambda: torch.nn.functional.linear(x, lin.weight), reps)
        for name, cfg in formats:
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
            m[0].weight.data.copy_(lin.weight)
            wclust.compress_(m, wclust.ClusterConfig(**cfg))
            args = m[0].clustered._kernel_args()
            lut_ms = bench(lambda: torch.ops.wclust.lut_linear(x, *args, *[None] * 3), reps)  # noqa: B023
            i8_ms = bench(lambda: torch.ops.wclust.lut_linear_int8(x, *args, *[None] * 3), reps)  # noqa: B023
            res.append((name, fp32, lut_ms, i8_ms))
    return res


def decode_rounds(shapes, formats, rounds: int, out: str | None) -> None:
    """numba against ``wclust::lut_decode`` for each shape and format, ``rounds`` times
    side by side (the small shapes take microseconds: one round is noisy)."""
    lines = [
        "| shape (out x in) | format | numba ms / compiled ms per round | speed-ups |",
        "|---|---|---|---|",
    ]
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        for name, cfg in formats:
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
            m[0].weight.data.copy_(lin.weight)
            wclust.compress_(m, wclust.ClusterConfig(**cfg))
            cw = m[0].clustered
            _, decode = numba_fns(cw)
            args = cw._kernel_args()
            with torch.inference_mode():
                res = [
                    (
                        bench(decode, 100),
                        bench(lambda: torch.ops.wclust.lut_decode(*args, None, None), 100),  # noqa: B023
                    )
                    for _ in range(rounds)
                ]
            times = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in res)
            ups = ", ".join(f"{a / b:.2f}x" for a, b in res)
            lines.append(f"| {out_f}x{in_f} | {name} | {times} | {ups} |")
            print(lines[-1], flush=True)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes (default: whisper-base's)")
    ap.add_argument(
        "--formats",
        help="only the formats whose name contains one of these "
        "comma-separated strings (e.g. '8-bit,NF4')",
    )
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="only the whole-weight decode, fastest of 100 calls in each of --rounds rounds",
    )
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not ops.available():
        raise SystemExit("the compiled kernels are not built: pip install -e .")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    reps = 10 if args.quick else 30
    shapes = WHISPER_BASE_SHAPES[:2] if args.quick else WHISPER_BASE_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    formats = FORMATS
    if args.formats:
        keys = [k.strip().lower() for k in args.formats.split(",")]
        formats = [f for f in FORMATS if any(k in f[0].lower() for k in keys)]
        if not formats:
            raise SystemExit(f"no format matches {args.formats!r}; see FORMATS")
    if args.decode_only:
        return decode_rounds(shapes, formats, args.rounds, args.out)
    lines = [
        f"threads: {args.threads}; compiled ISA: {ops.isa()}; numba AVX-512 kernel: "
        f"{'yes' if simd.available() else 'no'}; warm (one copy per weight)",
        "",
        "| shape (out x in) | batch | format | numba ms (min) | compiled ms (min) | speed-up |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for shape in shapes:
        for n, name, before, after in rows_for(shape, (1, 4, 8, 64), reps, formats):
            if after is None:
                lines.append(f"| {shape[0]}x{shape[1]} | {n} | {name} | {before:.3f} | | |")
            else:
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {n} | {name} | {before:.3f} | {after:.3f} | "
                    f"{before / after:.2f}x |"
                )
            print(lines[-1], flush=True)
    lines += [
        "",
        "1500 rows (an encoder's frames): float products against int8 products",
        "(`wclust::lut_linear_int8`, `set_int8_matmul`)",
        "",
        "| shape (out x in) | format | fp32 F.linear ms | lut_linear ms | int8 ms | int8 vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape in shapes[:3]:
        for name, fp32, lut_ms, i8_ms in int8_rows(shape, max(3, reps // 3), formats=formats):
            lines.append(
                f"| {shape[0]}x{shape[1]} | {name} | {fp32:.2f} | {lut_ms:.2f} | {i8_ms:.2f} | "
                f"{fp32 / i8_ms:.2f}x |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
