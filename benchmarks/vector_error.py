"""Weighted error of scalar vs vector codebooks on every whisper-base matrix, at equal
bits per weight (everything counted: codes, codebooks, scales).

    python benchmarks/vector_error.py [--bits 3 2 4] [--limit N] [--match GLOB] [--out FILE]

For each code width b and each weight matrix, the best scalar codebook within the
budget ``b + SLACK`` bits/weight (optimal k-means per tensor; scaled groups of 64 with
an optimal or fitted codebook, ``scaled_kmeans``) is compared with the best vector
codebook within the same budget (d=2 over the same scaled groups, started from the
product of the fitted scalar codebook; at b=2 also d=4). Errors are unweighted mean
squared errors relative to the weight's mean square (no calibration data needed).
Prints one row per matrix and a summary; ``--out`` writes the table as markdown.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time

import torch

from wclust.core.cluster import cluster_tensor
from wclust.core.quantizers import scaled_kmeans
from wclust.core.vector import cluster_vectors

SLACK = 0.3  # bits per weight above the code width: scales of 64-weight groups + codebooks
EXCLUDE = ("*embed_positions*",)


def _bpw_scaled(sc) -> float:
    return 8 * sc.nbytes / sc.codes.numel()


def scalar_candidates(x, b, sw=None):
    """``{name: (bits per weight, weighted mse)}`` of the scalar codebooks."""
    out = {}
    ct = cluster_tensor(x, bits=b, method="exact", sample_weight=sw)
    out[f"exact-tensor-{b}b"] = (ct.bits_per_weight, ct.mse)
    for g in (64, 128):
        sc = scaled_kmeans(x, b, g, sw)
        out[f"scaled-exact-g{g}-{b}b"] = (_bpw_scaled(sc), sc.mse)
    sc = scaled_kmeans(x, b, 64, sw, method="lloyd", fit_scale=True)
    out[f"scaled-fit-g64-{b}b"] = (_bpw_scaled(sc), sc.mse)
    return out


def vector_candidates(x, b, sw=None):
    """``{name: (bits per weight, weighted mse)}`` of the vector codebooks."""
    out = {}
    for d in (2, 4) if b <= 2 else (2,):
        vc = cluster_vectors(
            x,
            bits=b,
            cluster_dim=d,
            scale_group_size=64,
            scalar="fit",
            sample_weight=sw,
            codebook_dtype="float16",
        )
        out[f"vec-d{d}-fit-g64-{b}b"] = (vc.bits_per_weight, vc.mse)
    return out


def best(cands: dict, budget: float):
    ok = {k: v for k, v in cands.items() if v[0] <= budget}
    if not ok:
        return None
    name = min(ok, key=lambda k: ok[k][1])
    return name, *ok[name]


def compare(x: torch.Tensor, b: int, sw=None) -> dict:
    """Best scalar and best vector codebook of ``x`` within ``b + SLACK`` bits/weight."""
    budget = b + SLACK
    ms = float((x.double() ** 2).mean())
    s = best(scalar_candidates(x, b, sw), budget)
    v = best(vector_candidates(x, b, sw), budget)
    return {
        "budget": budget,
        "scalar": s[0],
        "scalar_bpw": s[1],
        "scalar_rel": s[2] / ms,
        "vector": v[0],
        "vector_bpw": v[1],
        "vector_rel": v[2] / ms,
    }


def whisper_matrices(match: str = "*"):
    """``(name, (out, in) weight)`` of every clustered whisper-base matrix (shared
    weights once; convolutions as (out, in * width))."""
    # benchmarks/kernels.py would shadow the ``kernels`` package transformers imports
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]
    from wclust.models import load_model

    model = load_model("whisper-base").model
    seen = set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or id(w) in seen:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in EXCLUDE) or not fnmatch.fnmatchcase(
            name, match
        ):
            continue
        seen.add(id(w))
        yield name, w.detach().float().reshape(w.shape[0], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2, 4])
    ap.add_argument("--limit", type=int, default=0, help="first N matrices only")
    ap.add_argument("--match", default="*", help="module-name glob")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args()
    mats = list(whisper_matrices(args.match))
    if args.limit:
        mats = mats[: args.limit]
    lines = [
        "| bits | layer | shape | scalar (best) | bpw | rel. error | vector (best) | bpw | "
        "rel. error | vector / scalar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    worse = 0
    for b in args.bits:
        ratios = []
        for name, x in mats:
            t = time.perf_counter()
            r = compare(x, b)
            ratio = r["vector_rel"] / r["scalar_rel"] if r["scalar_rel"] > 0 else 1.0
            ratios.append(ratio)
            worse += ratio > 1 + 1e-9
            line = (
                f"| {b} | {name} | {tuple(x.shape)} | {r['scalar']} | {r['scalar_bpw']:.3f} | "
                f"{r['scalar_rel']:.5f} | {r['vector']} | {r['vector_bpw']:.3f} | "
                f"{r['vector_rel']:.5f} | {ratio:.3f} |"
            )
            lines.append(line)
            print(line, f"<!-- {time.perf_counter() - t:.0f}s -->", flush=True)
        gmean = torch.tensor(ratios).log().mean().exp().item()
        summary = (
            f"| {b} | **all {len(ratios)} matrices** | | | | | | | | geo. mean {gmean:.3f}, "
            f"max {max(ratios):.3f} |"
        )
        lines.append(summary)
        print(summary, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    print(f"vector worse than scalar on {worse} (matrix, bits) pairs", flush=True)
    sys.exit(1 if worse else 0)


if __name__ == "__main__":
    main()
