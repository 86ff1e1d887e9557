"""Plots for ``wclust compare``: quality vs bits per weight, and a weight histogram with
the centroids of its codebook.

matplotlib is optional (``pip install 'wclust[bench]'``) and imported inside the functions,
with the non-interactive Agg backend, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["pareto_front", "pareto_plot", "histogram_plot"]

# family -> (marker, color, size)
_FAMILY_STYLE = {
    "original": ("*", "black", 160),
    "clustering": ("o", "tab:blue", 60),
    "quantization": ("s", "tab:orange", 55),
    "hybrid": ("D", "tab:green", 50),
}
_OTHER_STYLE = ("^", "tab:gray", 55)

# metric key -> axis label
_METRIC_LABELS = {"wer": "WER (%)", "cer": "CER (%)", "ppl": "perplexity"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'wclust[bench]' (or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _default_metric(rows: Sequence[Mapping[str, Any]]) -> str | None:
    for r in rows:
        q = r.get("quality") or {}
        for k, v in q.items():
            if _num(v) is not None:
                return k
    return None


def pareto_front(
    points: Sequence[tuple[float, float]], *, lower_is_better: bool = True
) -> list[tuple[float, float]]:
    """The points not beaten by any point with at most as many bits.

    Args:
        points: ``(bits, quality)`` pairs.
        lower_is_better: True for error metrics (WER, perplexity), False for accuracy.

    Returns:
        The front sorted by bits: each point strictly better than every point before it.
    """
    sign = 1.0 if lower_is_better else -1.0
    # among equal bits, the best quality first so the others are dropped
    order = sorted(points, key=lambda p: (p[0], sign * p[1]))
    front: list[tuple[float, float]] = []
    best = float("inf")
    for b, q in order:
        if sign * q < best:
            front.append((b, q))
            best = sign * q
    return front


def pareto_plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metric: str | None = None,
    lower_is_better: bool = True,
    log_y: bool | None = None,
) -> Path:
    """Quality metric against bits per weight, one marker per family, the Pareto front as
    a step line, each point labelled with its method.

    Args:
        rows: measured rows (``wclust.report.table``); rows without ``bits_per_weight``
            or without the metric are skipped.
        path: the PNG to write.
        metric: a key of ``quality``; default the first key found in the rows.
        lower_is_better: how to read the metric, for the front.
        log_y: logarithmic quality axis; default on when the values are positive and span
            10x or more (one collapsed setting would otherwise squash all the others).

    Returns:
        ``path``. With no point to draw, the figure says so instead of being empty.
    """
    plt = _pyplot()
    metric = metric or _default_metric(rows)
    pts = []  # (bits, quality, method, family)
    for r in rows:
        if r.get("error"):
            continue
        b = _num(r.get("bits_per_weight"))
        q = _num((r.get("quality") or {}).get(metric)) if metric else None
        if b is None or q is None or b <= 0:
            continue
        pts.append((b, q, str(r.get("method") or r.get("label") or "?"), r.get("family")))

    models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    ylabel = _METRIC_LABELS.get(metric, metric or "quality")
    better = "lower" if lower_is_better else "higher"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    title = f"{', '.join(models) or 'model'}: {ylabel} vs bits per weight"
    ax.set_title(title)
    ax.set_xlabel("bits per weight (log scale)")
    ax.set_ylabel(f"{ylabel}, {better} is better")

    if not pts:
        ax.text(
            0.5,
            0.5,
            f"no row has bits per weight and {metric or 'a quality metric'}",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        _draw_points(plt, fig, ax, pts, lower_is_better, log_y, ylabel, better)

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _draw_points(plt, fig, ax, pts, lower_is_better, log_y, ylabel, better) -> None:
    """The points (one marker per family), the Pareto front as a step line, the axes
    and the labels of ``pareto_plot``."""
    from matplotlib.ticker import FixedLocator, LogFormatter, NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ys = [q for _, q, _, _ in pts]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) >= 10 * min(ys)
    if log_y:
        ax.set_yscale("log")
        plain = LogFormatter(labelOnlyBase=False)  # "20", "200", not 2x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel(f"{ylabel}, {better} is better (log scale)")
    seen: dict[str, bool] = {}
    for b, q, _, fam in pts:
        marker, color, size = _FAMILY_STYLE.get(fam, _OTHER_STYLE)
        label = fam or "other"
        ax.scatter(
            b,
            q,
            marker=marker,
            color=color,
            s=size,
            zorder=3,
            edgecolors="white",
            linewidths=0.6,
            label=None if label in seen else label,
        )
        seen[label] = True

    front = pareto_front([(b, q) for b, q, _, _ in pts], lower_is_better=lower_is_better)
    fx = [b for b, _ in front]
    fy = [q for _, q in front]
    xmax = max(b for b, _, _, _ in pts)
    if fx[-1] < xmax:  # carry the best level to the right edge of the data
        fx.append(xmax)
        fy.append(fy[-1])
    ax.step(
        fx, fy, where="post", color="tab:red", alpha=0.6, lw=1.5, zorder=2, label="Pareto front"
    )

    xs = [b for b, _, _, _ in pts]
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.25, hi * 1.6)  # room for the labels on the right
    nice = (0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64)
    ticks = [t for t in nice if lo / 1.25 <= t <= hi * 1.6]
    if len(ticks) < 2:  # a narrow range: the points' own values
        ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    # after the limits and the layout: the labelling works in pixels
    _label_points(ax, pts, list(zip(fx, fy, strict=True)))


def _label_points(ax, pts, step_line: list[tuple[float, float]]) -> None:
    """Method names beside the points, placed greedily where they overlap no other label,
    no marker and (if possible) not the front's step line, inside the axes; a thin leader
    line when moved off the point."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the transforms used below
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    disp = [ax.transData.transform((b, q)) for b, q, _, _ in pts]  # pixels
    inside = ax.get_window_extent(renderer)
    markers = [(x - 6, y - 6, x + 6, y + 6) for x, y in disp]
    line = []  # the step line as thin boxes: horizontal then vertical pieces
    sl = [ax.transData.transform(p) for p in step_line]
    for (xa, ya), (xb, yb) in zip(sl, sl[1:], strict=False):
        line.append((xa, ya - 2, xb, ya + 2))
        line.append((xb - 2, min(ya, yb), xb + 2, max(ya, yb)))
    placed: list[tuple[float, float, float, float]] = []

    def free(box, avoid_line: bool) -> bool:
        x0, y0, x1, y1 = box
        if x0 < inside.x0 or x1 > inside.x1 or y0 < inside.y0 or y1 > inside.y1:
            return False
        obstacles = placed + markers + (line if avoid_line else [])
        return not any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in obstacles)

    for i in sorted(range(len(pts)), key=lambda i: -disp[i][1]):
        x, y = disp[i]
        t = ax.text(0, 0, pts[i][2], fontsize=8)
        ext = t.get_window_extent(renderer)
        t.remove()
        w, h = ext.width + 2, ext.height + 2
        gap = 8.0
        choice = None
        candidates = [
            (side, dy)
            for step in range(12)
            for dy in ((0.0,) if step == 0 else (step * h * 0.6, -step * h * 0.6))
            for side in (1, -1)
        ]
        for avoid_line in (True, False):  # the line only if every place crosses it
            for side, dy in candidates:
                x0 = x + gap if side == 1 else x - gap - w
                box = (x0, y + dy - h / 2, x0 + w, y + dy + h / 2)
                if free(box, avoid_line):
                    choice = (side, dy, box)
                    break
            if choice:
                break
        if choice is None:  # crowded: accept an overlap rather than lose the label
            choice = (1, 0.0, (x + gap, y - h / 2, x + gap + w, y + h / 2))
        side, dy, box = choice
        placed.append(box)
        ax.annotate(
            pts[i][2],
            (pts[i][0], pts[i][1]),
            xytext=(side * gap / px_per_pt, dy / px_per_pt),
            textcoords="offset points",
            fontsize=8,
            va="center",
            ha="left" if side == 1 else "right",
            zorder=4,
            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75),
            arrowprops=(
                dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=3)
                if abs(dy) > 1
                else None
            ),
        )


def histogram_plot(
    weights,
    centroids,
    path: str | os.PathLike,
    *,
    title: str = "",
    bins: int = 256,
    log_y: bool = True,
) -> Path:
    """Histogram of a weight tensor's values with the centroids as vertical lines.

    Args:
        weights: the (original) weights, torch tensor or numpy array of any shape.
        centroids: 1-D codebook ``(k,)``, or one codebook per row ``(n_codebooks, k)``:
            then only the first row's centroids are drawn, and the legend says so; the
            values codebook 0 clusters (the first ``numel / n_codebooks`` of ``weights``
            in row-major order) are drawn as an outline histogram over the whole one.
        path: the PNG to write.
        title: the figure title.
        bins: histogram bins.
        log_y: logarithmic counts, so the tails (where outlier centroids sit) show.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    w = _to_numpy(weights).ravel()
    c = _to_numpy(centroids)
    n_books = 1
    if c.ndim >= 2:
        c2 = c.reshape(-1, c.shape[-1])  # (n_codebooks, k)
        n_books = c2.shape[0]
        c = c2[0]
    c = np.unique(c.ravel()[np.isfinite(c.ravel())])
    # codebook 0's own values, in the row-major layout the codebooks are cut from
    w0 = w.reshape(n_books, -1)[0] if n_books > 1 and w.size % n_books == 0 else None
    w = w[np.isfinite(w)]

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    if w.size:
        edges = np.histogram_bin_edges(w, bins=bins)
        ax.hist(
            w,
            bins=edges,
            color="tab:blue",
            alpha=0.75,
            log=log_y,
            label=f"weights ({w.size:,} values)",
        )
        if w0 is not None:
            w0 = w0[np.isfinite(w0)]
            ax.hist(
                w0,
                bins=edges,
                histtype="step",
                color="tab:orange",
                lw=1.2,
                log=log_y,
                label=f"values of codebook 0 ({w0.size:,})",
            )
    for j, v in enumerate(c):
        lab = None
        if j == 0:
            lab = f"centroids ({c.size})"
            if n_books > 1:
                lab = f"centroids of codebook 0 only ({c.size}; {n_books:,} codebooks)"
        ax.axvline(v, color="tab:red", lw=0.9, alpha=0.8, label=lab)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log scale)" if log_y else "count")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)
