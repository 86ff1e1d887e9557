"""1-D clustering speed and MSE: wclust against the usual baselines, in one run.

Cases: (a) one tensor of 2M and one of 20M Gaussian-plus-outlier values, clustered
per tensor; (b) every weight matrix of a transformer layer stack (a random-init
BERT stack with d_model 768, and Whisper base's real weights when its model package
is installed) per tensor, per output channel and per group of 128. Each at 16 and
256 clusters. Methods, side by side on the same data:

* wclust exact: ``cluster_tensor(method="exact")`` (globally optimal per codebook;
  a codebook with more than 65536 distinct values is solved on 65536 runs of
  values, then polished by Lloyd: see ``core.codebook.EXACT_MAX_POINTS``).
* wclust kmeans: ``method="kmeans"`` with ``init="kmeans++"`` (the current
  default) and with ``init="exact-coarse"``.
* scikit-learn ``KMeans(n_clusters=k, n_init=1)`` on each codebook (float32 in,
  as a course would write it), ``kmeans1d.cluster`` (exact, O(kn) SMAWK) in a loop
  over codebooks, ``flash1dkmeans.kmeans_1d`` (kmeans++ then Lloyd on sorted prefix
  sums) in a loop over codebooks.

wclust times are whole ``cluster_tensor`` calls (codes, float32 codebooks and the
MSE included). Baseline times cover fitting and labels; their MSE is measured
afterwards with centroids rounded to float32, as wclust stores them.

A baseline that would exceed ``--budget`` seconds in a cell runs on a random subset
of the codebooks; its time is extrapolated linearly (by values) to the whole cell
and its MSE estimated as wclust exact's MSE times the ratio measured on the same
codebooks. A codebook of more than 2^18 values is fitted on growing random
subsamples until the next would overrun a quarter of the budget (the whole budget
when the cell is a single codebook); its time is scaled up and its centroids are
scored on all its values. The wclust kmeans rows get three times the budget, by
whole matrices. Such cells are marked ``~`` and explained in the note column.

    python benchmarks/cluster_speed.py [--quick] [--budget 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from wclust.core import cluster_tensor, codebook_layout

EXACT = "wclust exact"
KMPP = "wclust kmeans (kmeans++)"
COARSE = "wclust kmeans (exact-coarse)"
BASELINES = ("scikit-learn KMeans(n_init=1)", "kmeans1d (exact)", "flash1dkmeans")
GRANULARITIES = (("tensor", None), ("channel", None), ("group", 128))


@dataclass
class Cell:
    """One method on one case: total time, total SSE, element count, note."""

    seconds: float = math.nan
    sse: float = math.nan
    numel: int = 0
    approx: bool = False
    note: str = ""
    per_row_sse: np.ndarray | None = field(default=None, repr=False)
    per_matrix_sse: list[float] | None = field(default=None, repr=False)

    @property
    def mse(self) -> float:
        return self.sse / self.numel if self.numel else math.nan


# ---------------------------------------------------------------- data


def gaussian_with_outliers(n: int, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02^2) values, 0.1% of them replaced by N(0, 0.4^2) outliers (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    idx = torch.randperm(n, generator=g)[: max(1, n // 1000)]
    x[idx] = torch.randn(len(idx), generator=g) * 0.4
    return x


def bert_stack(layers: int) -> list[tuple[str, torch.Tensor]]:
    """Linear weights of a random-init BERT encoder stack, d_model 768, FFN 3072."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=1000,
    )
    model = BertModel(cfg)
    return [
        (n, m.weight.detach().clone())
        for n, m in model.encoder.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def whisper_stack(layers: int | None) -> list[tuple[str, torch.Tensor]] | None:
    """Linear weights of Whisper base's encoder and decoder layers, or None."""
    try:
        from wclust.models.whisper import load_whisper

        model, _ = load_whisper("whisper-base")
    except Exception as e:  # package missing or converter unavailable
        print(f"(whisper-base skipped: {type(e).__name__}: {e})")
        return None
    out = []
    for part in (model.model.encoder, model.model.decoder):
        for i, layer in enumerate(part.layers):
            if layers is not None and i >= layers:
                break
            for n, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    out.append((n, m.weight.detach().clone()))
    return out


def codebook_rows(w: torch.Tensor, gran: str, group: int | None) -> list[np.ndarray]:
    n_cb, per = codebook_layout(tuple(w.shape), gran, group)
    return list(w.detach().float().reshape(n_cb, per).numpy())


# ---------------------------------------------------------------- methods


def _sse_rows(rows: list[np.ndarray], cents: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(rows))
    for r, (x, c) in enumerate(zip(rows, cents, strict=True)):
        c = np.sort(np.asarray(c, dtype=np.float32).astype(np.float64))
        mids = 0.5 * (c[1:] + c[:-1])
        x = x.astype(np.float64)
        out[r] = float(((x - c[np.searchsorted(mids, x)]) ** 2).sum())
    return out


def fit_sklearn(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x.reshape(-1, 1))
    _ = km.labels_
    return km.cluster_centers_[:, 0]


def fit_kmeans1d(x: np.ndarray, k: int) -> np.ndarray:
    import kmeans1d

    return np.asarray(kmeans1d.cluster(x, k).centroids)


def fit_flash(x: np.ndarray, k: int) -> np.ndarray:
    import flash1dkmeans

    cents, _labels = flash1dkmeans.kmeans_1d(x.astype(np.float64), k, random_state=0)
    return cents


FITS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = dict(
    zip(BASELINES, (fit_sklearn, fit_kmeans1d, fit_flash), strict=True)
)


def _unsupported(name: str, per: int, k: int) -> str | None:
    if k > per and name != "kmeans1d (exact)":
        return f"n/a: k={k} > {per} values per codebook"
    return None


def run_wclust(mats, gran, group, k, method, init, repeat, budget=math.inf, exact=None) -> Cell:
    """Whole cluster_tensor calls over all matrices; per-codebook SSE kept.

    Past ``budget`` seconds the remaining matrices are skipped and the time is
    extrapolated by values (MSE from the ratio to ``exact`` on the same matrices).
    """
    kw = dict(granularity=gran, group_size=group, method=method)
    if init:
        kw["init"] = init
    order = (
        list(range(len(mats)))
        if budget == math.inf
        else list(np.random.default_rng(0).permutation(len(mats)))
    )
    best = math.inf
    for _ in range(repeat):
        cts, done = {}, []
        t = time.perf_counter()
        for i in order:
            cts[i] = cluster_tensor(mats[i][1], k, **kw)
            done.append(i)
            if time.perf_counter() - t > budget and len(done) < len(mats):
                break
        best = min(best, time.perf_counter() - t)
        if best > 2.0 or len(done) < len(mats):
            break
    sse_of = {}
    for i in done:
        w, ct = mats[i][1], cts[i]
        d = (ct.dequantize().double() - w.double()) ** 2
        sse_of[i] = d.reshape(ct.n_codebooks, -1).sum(1).numpy()
    numel = sum(w.numel() for _, w in mats)
    if len(done) == len(mats):
        rows_sse = np.concatenate([sse_of[i] for i in range(len(mats))])
        return Cell(best, float(rows_sse.sum()), numel, per_row_sse=rows_sse)
    done_numel = sum(mats[i][1].numel() for i in done)
    ex = sum(exact.per_matrix_sse[i] for i in done)
    got = sum(float(sse_of[i].sum()) for i in done)
    how = "MSE = exact x ratio on those matrices" if ex > 0 else "MSE from those matrices"
    return Cell(
        best * numel / done_numel,
        exact.sse * got / ex if ex > 0 else got * numel / done_numel,
        numel,
        approx=True,
        note=f"~: {len(done)}/{len(mats)} matrices, time x{numel / done_numel:.3g}; {how}",
    )


# A codebook this large is fitted on growing random subsamples first, so one huge
# tensor cannot blow the budget.
_BIG = 1 << 18


def _fit_one(fit, x, k, budget, rng) -> tuple[np.ndarray, float, float]:
    """(centroids, estimated seconds for all of x, fraction of x fitted)."""
    n = len(x)
    size = n if n <= _BIG else _BIG
    while True:
        sub = x if size == n else x[rng.choice(n, size, replace=False)]
        t = time.perf_counter()
        cents = fit(sub, k)
        spent = time.perf_counter() - t
        if size == n or spent * n / size > budget:
            return cents, spent * n / size, size / n
        size = min(n, size * 4)


def run_baseline(name, rows: list[np.ndarray], k, budget, exact: Cell, rng) -> Cell:
    """Fit every codebook with a baseline, or a random subset of them within budget."""
    fit = FITS[name]
    numel = sum(len(r) for r in rows)
    per = min(len(r) for r in rows)
    why = _unsupported(name, per, k)
    if why:
        return Cell(numel=numel, note=why)
    done, cents, est, frac_min = [], [], 0.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(np.random.default_rng(1).standard_normal(max(4 * k, 256)), k)  # warm-up
        t0 = time.perf_counter()
        for r in rng.permutation(len(rows)):
            one = budget if len(rows) == 1 else budget / 4
            c, seconds, frac = _fit_one(fit, rows[r], k, one, rng)
            done.append(r)
            cents.append(c)
            est += seconds
            frac_min = min(frac_min, frac)
            if time.perf_counter() - t0 > budget and len(done) < len(rows):
                break
    done = np.asarray(done)
    sse = _sse_rows([rows[r] for r in done], cents)
    done_numel = sum(len(rows[r]) for r in done)
    notes = []
    if frac_min < 1:
        notes.append(f"fit on a >={frac_min:.1%} subsample of each codebook, time scaled")
    if len(done) < len(rows):
        notes.append(f"{len(done)}/{len(rows)} codebooks, time x{numel / done_numel:.3g}")
        ex_done = exact.per_row_sse[done].sum()
        if ex_done > 0:
            notes.append("MSE = exact x ratio on those codebooks")
            total = exact.sse * sse.sum() / ex_done
        else:  # exact is lossless there (k >= values per codebook)
            notes.append("MSE from those codebooks")
            total = float(sse.sum()) * numel / done_numel
    else:
        total = float(sse.sum())
    approx = bool(notes)
    return Cell(
        est * numel / done_numel,
        total,
        numel,
        approx=approx,
        note=("~: " + "; ".join(notes)) if approx else "",
    )


# ---------------------------------------------------------------- table


def fmt_time(c: Cell) -> str:
    if math.isnan(c.seconds):
        return "—"
    s = f"{c.seconds:.3g}" if c.seconds < 100 else f"{c.seconds:.0f}"
    return ("~" if c.approx else "") + s


def fmt_mse(c: Cell) -> str:
    if math.isnan(c.sse):
        return "—"
    return ("~" if c.approx else "") + f"{c.mse:.4e}"


def ratio(a: float, b: float, approx: bool) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "—"
    return ("~" if approx else "") + f"{a / b:.3g}x"


def mse_ratio(c: Cell, ex: Cell) -> str:
    if math.isnan(c.sse) or math.isnan(ex.sse):
        return "—"
    if ex.sse == 0:
        return "1x" if c.sse == 0 else "—"
    r = c.sse / ex.sse
    pct = (r - 1) * 100
    return ("~" if c.approx else "") + (f"{r:.4g}x" if abs(pct) >= 100 else f"{pct:+.2f}%")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 16 clusters, short budget")
    ap.add_argument("--budget", type=float, default=None, help="seconds per baseline cell")
    ap.add_argument("--layers", type=int, default=None, help="BERT layers (default 2; quick 1)")
    ap.add_argument("--no-whisper", action="store_true", help="skip the Whisper base stack")
    ap.add_argument("--threads", type=int, default=None, help="torch/numba threads")
    ap.add_argument(
        "--only",
        default="synthetic,bert,whisper",
        help="comma-separated subset of: synthetic, bert, whisper",
    )
    ap.add_argument("--granularity", default=None, help="only this one of: tensor, channel, group")
    ap.add_argument("--k", type=int, default=None, help="only this number of clusters")
    ap.add_argument("--out", help="also write the markdown table to this file (kept current)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 20.0)
    ks = (args.k,) if args.k else (16,) if args.quick else (16, 256)
    sizes = (2_000_000,) if args.quick else (2_000_000, 20_000_000)
    layers = args.layers or (1 if args.quick else 2)
    rng = np.random.default_rng(0)

    only = set(args.only.split(","))
    cases: list[tuple[str, list[tuple[str, torch.Tensor]], str, int | None]] = []
    if "synthetic" in only:
        for n in sizes:
            x = gaussian_with_outliers(n)
            cases.append((f"synthetic {n / 1e6:g}M", [("x", x)], "tensor", None))
    stacks = []
    if "bert" in only:
        stacks.append((f"BERT-shaped x{layers} (random init)", bert_stack(layers)))
    if "whisper" in only and not args.no_whisper:
        wh = whisper_stack(1 if args.quick else None)
        if wh is not None:
            stacks.append((f"Whisper base ({'1 layer each' if args.quick else 'all'})", wh))
    for sname, mats in stacks:
        for gran, group in GRANULARITIES:
            if args.granularity and gran != args.granularity:
                continue
            cases.append((sname, mats, gran, group))

    # Warm-up: numba compiles (or loads from its cache) before anything is timed.
    warm = torch.randn(8, 256)
    for method, init in (("exact", None), ("kmeans", "kmeans++"), ("kmeans", "exact-coarse")):
        kw = {"init": init} if init else {}
        cluster_tensor(warm, 4, granularity="channel", method=method, **kw)

    header = (
        "| case | codebooks | k | method | time (s) | time / exact | MSE | MSE vs exact | note |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    print(header, flush=True)
    for sname, mats, gran, group in cases:
        numel = sum(w.numel() for _, w in mats)
        n_cb = sum(codebook_layout(tuple(w.shape), gran, group)[0] for _, w in mats)
        label = f"{gran}" + (f" {group}" if group else "")
        rows = None
        for k in ks:
            cells: dict[str, Cell] = {}
            ex = cells[EXACT] = run_wclust(mats, gran, group, k, "exact", None, 3)
            sizes_cb = [codebook_layout(tuple(w.shape), gran, group)[0] for _, w in mats]
            edges = np.cumsum([0, *sizes_cb])
            ex.per_matrix_sse = [
                float(ex.per_row_sse[a:b].sum()) for a, b in zip(edges[:-1], edges[1:], strict=True)
            ]
            for name, init in ((KMPP, "kmeans++"), (COARSE, "exact-coarse")):
                cells[name] = run_wclust(mats, gran, group, k, "kmeans", init, 3, 3 * budget, ex)
            if rows is None:
                rows = [r for _, w in mats for r in codebook_rows(w, gran, group)]
            for b in BASELINES:
                cells[b] = run_baseline(b, rows, k, budget, cells[EXACT], rng)
            for name, c in cells.items():
                line = (
                    f"| {sname}, {numel / 1e6:.3g}M values, {label} | {n_cb} | {k} | {name} | "
                    f"{fmt_time(c)} | {ratio(c.seconds, ex.seconds, c.approx)} | {fmt_mse(c)} | "
                    f"{mse_ratio(c, ex)} | {c.note} |"
                )
                lines.append(line)
                print(line, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")

    env = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); budget {budget:g}s "
        "per baseline cell; ~ = extrapolated (see note)"
    )
    text = "\n".join(lines) + "\n\n" + env + "\n"
    print("\n" + env)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
