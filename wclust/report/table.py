"""The comparison table of ``wclust compare``: measured rows -> markdown, CSV, JSON, terminal.

A row is a plain dict (see ``ROW_FIELDS``); any numeric field may be ``None`` or missing
(not measured) and is shown as "n/a". ``quality`` is a dict of task metrics, e.g.
``{"wer": 10.42, "cer": 3.80}`` (percent), ``{"ppl": 12.3}`` or ``{"top1_agreement": 98.0}``.
A row with ``error`` set is a method that failed; its cells are "n/a".

Everything here is pure formatting; the measuring lives in ``wclust.measure``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMNS",
    "ROW_FIELDS",
    "quality_str",
    "latency_str",
    "to_markdown",
    "to_csv",
    "write_results",
    "print_table",
    "reading",
    "original_row",
]

NA = "n/a"

# The row schema, in the order results.csv lists it (quality is flattened to quality_<key>).
ROW_FIELDS = [
    "model",
    "method",
    "label",
    "family",
    "bits_per_weight",
    "ratio",
    "compress_s",
    "file_mb",
    "gzip_mb",
    "load_s",
    "latency_ms_mean",
    "latency_ms_median",
    "latency_ms_p10",
    "latency_ms_p90",
    "n_clips",
    "gpu_latency_ms_mean",
    "gpu_latency_ms_median",
    "gpu_latency_ms_p10",
    "gpu_latency_ms_p90",
    "vram_mb",
    "model_tensor_mb",
    "rss_model_mb",
    "peak_rss_mb",
    "quality",
    "notes",
    "error",
]

# Quality metrics with a fixed display: key -> (format, order). Others are "name=value".
_PERCENT_METRICS = {"cer": "CER", "wer": "WER"}  # shown "3.80% CER", CER before WER
# Metrics of the lm/embed/vision tasks: agreement with the original needs more digits.
_NAMED_FORMATS = {
    "cos_sim": "cos {:.5f}",
    "cos_min": "min cos {:.4f}",
    "nn_recall": "NN@1 {:.1f}%",
    "top1_agree": "top-1 agree {:.1f}%",
    "kl_div": "KL {:.2e}",
    "accuracy": "acc {:.1f}%",
}


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _auto(x: Any) -> str:
    """A number with as many decimals as its size deserves: 812, 45.1, 3.25."""
    if x is None:
        return NA
    if not _is_num(x):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _fixed(digits: int, suffix: str = "") -> Callable[[Any], str]:
    def fmt(x: Any) -> str:
        if x is None:
            return NA
        if not _is_num(x):
            return str(x)
        return f"{float(x):.{digits}f}{suffix}"

    return fmt


def _ratio(x: Any) -> str:
    if x is None:
        return NA
    if not _is_num(x):
        return str(x)
    return f"{float(x):.1f}×" if abs(x) >= 10 else f"{float(x):.2f}×"


def quality_str(quality: Mapping[str, Any] | None) -> str:
    """Task metrics as one short cell.

    ``{"wer": 10.42, "cer": 3.8}`` -> "3.80% CER, 10.42% WER"; ``{"ppl": 12.3}`` ->
    "PPL 12.30"; anything else "name=value" (4 significant digits), in the dict's order
    after the known metrics. ``None`` or ``{}`` -> "n/a".
    """
    if not quality:
        return NA
    parts = []
    for key, name in _PERCENT_METRICS.items():
        if key in quality:
            v = quality[key]
            parts.append(f"{v:.2f}% {name}" if _is_num(v) else f"{name} {NA if v is None else v}")
    if "ppl" in quality:
        v = quality["ppl"]
        parts.append(f"PPL {v:.2f}" if _is_num(v) else f"PPL {NA if v is None else v}")
    for key, v in quality.items():
        if key in _PERCENT_METRICS or key == "ppl":
            continue
        if key in _NAMED_FORMATS and _is_num(v):
            parts.append(_NAMED_FORMATS[key].format(v))
            continue
        if v is None:
            parts.append(f"{key}={NA}")
        elif _is_num(v):
            parts.append(f"{key}={v:.4g}")
        else:
            parts.append(f"{key}={v}")
    return ", ".join(parts)


def latency_str(row: Mapping[str, Any], prefix: str = "latency_ms") -> str:
    """Mean per clip with median and p10–p90 range: "812 (med 790, 500–1200)".

    Parts that were not measured are left out; "n/a" when the mean is missing.
    """
    mean = row.get(f"{prefix}_mean")
    if mean is None:
        return NA
    extra = []
    med = row.get(f"{prefix}_median")
    if med is not None:
        extra.append(f"med {_auto(med)}")
    p10, p90 = row.get(f"{prefix}_p10"), row.get(f"{prefix}_p90")
    if p10 is not None and p90 is not None:
        extra.append(f"{_auto(p10)}–{_auto(p90)}")
    return f"{_auto(mean)} ({', '.join(extra)})" if extra else _auto(mean)


def _quality_cell(row: Mapping[str, Any]) -> str:
    if row.get("error"):
        return "FAILED (see notes)"
    return quality_str(row.get("quality"))


# (header, cell function, right-aligned). One list drives markdown and the terminal table.
COLUMNS: list[tuple[str, Callable[[Mapping[str, Any]], str], bool]] = [
    ("Model", lambda r: str(r.get("model") or NA), False),
    ("Method", lambda r: str(r.get("label") or r.get("method") or NA), False),
    ("Bits/weight", lambda r: _fixed(2)(r.get("bits_per_weight")), True),
    ("Ratio", lambda r: _ratio(r.get("ratio")), True),
    ("Inference time (CPU, ms)", lambda r: latency_str(r, "latency_ms"), True),
    ("Inference time (GPU, ms)", lambda r: latency_str(r, "gpu_latency_ms"), True),
    ("RAM: model tensors (MB)", lambda r: _auto(r.get("model_tensor_mb")), True),
    ("RAM: process peak (MB)", lambda r: _fixed(0)(r.get("peak_rss_mb")), True),
    ("VRAM (MB)", lambda r: _fixed(0)(r.get("vram_mb")), True),
    ("Quality", _quality_cell, False),
    ("Size in .gz (MB)", lambda r: _auto(r.get("gzip_mb")), True),
    ("Compress time (s)", lambda r: _auto(r.get("compress_s")), True),
]

# Columns also shown as a ratio to the original's value: header -> row field.
RATIO_OF = {
    "Inference time (CPU, ms)": "latency_ms_mean",
    "Inference time (GPU, ms)": "gpu_latency_ms_mean",
    "RAM: model tensors (MB)": "model_tensor_mb",
    "RAM: process peak (MB)": "peak_rss_mb",
    "Size in .gz (MB)": "gzip_mb",
}

LEGEND = [
    "**(0.42×)** after a time, a RAM figure or a size: the row's value divided by the "
    "original's (the fp32 row; below 1: less than the original). For times: of the means.",
    "**Inference time**: mean per clip, with the median and the 10th–90th percentile range "
    "in brackets.",
    "**RAM: model tensors**: bytes of the parameters and buffers the loaded model holds, "
    "i.e. what the weights really occupy in memory.",
    "**RAM: process peak**: peak resident set size of the whole measuring process: Python, "
    "libraries, activations and temporaries included.",
    "**VRAM**: peak GPU memory allocated by PyTorch while measuring on the GPU "
    "(n/a: not measured on a GPU).",
    "MB = 10^6 bytes.",
]


def original_row(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row of the uncompressed original (method ``fp32``) that did not fail, if any."""
    return next((r for r in rows if r.get("method") == "fp32" and not r.get("error")), None)


def _cells(row: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """The row's cells in ``COLUMNS`` order, with ratios to ``ref`` (the original) where
    ``RATIO_OF`` names a column and both values are measured."""
    cells = []
    for header, f, _ in COLUMNS:
        cell = f(row)
        field = RATIO_OF.get(header)
        if field and ref is not None and not row.get("error"):
            x, base = row.get(field), ref.get(field)
            if _is_num(x) and _is_num(base) and base > 0:
                head, sep, rest = cell.partition(" (")
                cell = f"{head} ({x / base:.2f}×; {rest}" if sep else f"{cell} ({x / base:.2f}×)"
        cells.append(cell)
    return cells


# How the reading judges a task's measure: (lower is better, "about as good as the
# original" margin in the metric's units; percent metrics: points).
_MEASURES: dict[str, tuple[bool, float]] = {
    "wer": (True, 0.5),
    "cer": (True, 0.5),
    "ppl": (True, 0.5),
    "top1_agree": (False, 0.5),
    "nn_recall": (False, 0.5),
    "accuracy": (False, 0.5),
    "cos_sim": (False, 0.005),
    "cos_min": (False, 0.005),
    "kl_div": (True, 0.005),
}


def _measure(rows: list[Mapping[str, Any]]) -> str | None:
    """The task's measure: WER for speech, else the first metric the rows report (tasks
    list their main metric first)."""
    for r in rows:
        q = r.get("quality") or {}
        if _is_num(q.get("wer")):
            return "wer"
    for r in rows:
        for k, v in (r.get("quality") or {}).items():
            if _is_num(v):
                return k
    return None


def _paired(
    r: Mapping[str, Any], base: Mapping[str, Any], metric: str = "wer"
) -> tuple[float, float, float] | None:
    """``r``'s ``metric`` minus ``base``'s, in points, with its 95% paired-bootstrap
    interval over the items (``report.stats``), when both rows carry per-item errors
    (``item_errors``) for that measure on the same items. Per-item errors count misses:
    for WER the rate itself, for a higher-is-better percentage (``top1_agree``,
    ``accuracy``) 100 minus the rate, so the difference and interval flip sign; for
    perplexity ``exp`` of the rate (NLL per token), in perplexity, not points."""
    a, b = r.get("item_errors"), base.get("item_errors")
    if not a or not b or not a.get("words") or a.get("words") != b.get("words"):
        return None
    if a.get("metric", "wer") != metric or b.get("metric", "wer") != metric:
        return None
    from .stats import paired_bootstrap

    scale = "exp" if metric == "ppl" else "percent"
    d, lo, hi = paired_bootstrap(a["edits"], b["edits"], a["words"], scale=scale)
    return (d, lo, hi) if _MEASURES.get(metric, (True, 0))[0] else (-d, -hi, -lo)


def _interval(p: tuple[float, float, float]) -> str:
    return f"95% interval {p[1]:+.2f} to {p[2]:+.2f}"


def reading(rows: list[Mapping[str, Any]], metric: str | None = None) -> list[str]:
    """A few sentences that read the table, computed from the rows.

    The smallest row (bits per weight) whose quality is within the measure's margin of
    the original's (+0.5 WER points for speech), the fastest row (mean CPU time), and
    the rows that beat NF4 (any ``nf4*`` row) on quality at equal or fewer bits per
    weight, or that none does. Rows with per-item errors for the measure
    (``item_errors``: clips for WER, images for top-1 agreement or accuracy, text
    windows for perplexity) also get their difference from the original and from NF4
    with a 95% interval of a paired bootstrap over the items: how much of a difference
    the choice of items alone could make.

    Args:
        rows: measured rows; failed rows and rows without the numbers are left out.
        metric: the quality key to judge by (default: WER, else the first metric).

    Returns:
        One line per finding (empty when no row has the numbers to read).
    """
    metric = metric or _measure(rows)
    ok = [r for r in rows if not r.get("error")]
    if metric is None or not ok:
        return []
    lower, margin = _MEASURES.get(metric, (True, 0.5))

    def q(r) -> float | None:
        v = (r.get("quality") or {}).get(metric)
        return float(v) if _is_num(v) and math.isfinite(v) else None

    def better(a: float, b: float) -> bool:
        return a < b if lower else a > b

    def qs(r) -> str:
        return quality_str({metric: q(r)})

    def name(r) -> str:
        return str(r.get("method") or r.get("label"))

    def bits(r) -> float | None:
        b = r.get("bits_per_weight")
        return float(b) if _is_num(b) else None

    lines = []
    orig = original_row(ok)
    scored = [r for r in ok if q(r) is not None and bits(r) is not None]
    others = [r for r in scored if r is not orig]
    if orig is not None and q(orig) is not None and others:
        limit = q(orig) + margin if lower else q(orig) - margin
        near = [r for r in others if not better(limit, q(r))]  # at most the margin worse
        sign = "+" if lower else "-"
        what = f"within {sign}{margin:g} of the original's {qs(orig)}"
        if near:
            best = min(near, key=lambda r: (bits(r), r.get("model_tensor_mb") or 0))
            lines.append(
                f"Smallest {what}: {name(best)}, {bits(best):.2f} bits per weight "
                f"({bits(orig) / bits(best):.1f}× fewer than the original), {qs(best)}."
            )
        else:
            closest = min(others, key=lambda r: q(r) if lower else -q(r))
            lines.append(
                f"No compressed row is {what}; the closest: {name(closest)}, "
                f"{bits(closest):.2f} bits per weight, {qs(closest)}."
            )
    if orig is not None:
        diffs = [(r, _paired(r, orig, metric)) for r in others]
        diffs = [(r, p) for r, p in diffs if p is not None]
        if diffs:
            n = len(orig["item_errors"]["words"])
            unit = orig["item_errors"].get("unit", "clips")
            points = "" if metric == "ppl" else ", in points"
            lines.append(
                f"{metric.upper()} minus the original's{points}, with a 95% interval of a "
                f"paired bootstrap over the {n} {unit}: "
                + "; ".join(f"{name(r)} {p[0]:+.2f} ({p[1]:+.2f} to {p[2]:+.2f})" for r, p in diffs)
                + "."
            )
    timed = [r for r in ok if _is_num(r.get("latency_ms_mean"))]
    if timed:
        fast = min(timed, key=lambda r: r["latency_ms_mean"])
        rel = ""
        if orig is not None and _is_num(orig.get("latency_ms_mean")) and fast is not orig:
            rel = f", {fast['latency_ms_mean'] / orig['latency_ms_mean']:.2f}× the original's"
        lines.append(
            f"Fastest: {name(fast)}, {_auto(fast['latency_ms_mean'])} ms mean on CPU{rel}"
            + (f", {qs(fast)}." if q(fast) is not None else ".")
        )
    nf4 = [r for r in scored if name(r).startswith("nf4")]
    if not nf4:
        lines.append("No NF4 row in this run to compare with.")
        return lines
    wins = []
    for r in others:
        if r in nf4:
            continue
        beaten = [n for n in nf4 if bits(r) <= bits(n) and better(q(r), q(n))]
        if beaten:
            n = min(beaten, key=lambda n: q(n) if lower else -q(n))  # the strongest
            p = _paired(r, n, metric)
            sure = ""
            if p is not None:
                sure = f"; {_interval(p)}" + (", which includes 0" if p[1] <= 0 <= p[2] else "")
            wins.append(
                f"{name(r)} ({bits(r):.2f} bits, {qs(r)}) beats {name(n)} "
                f"({bits(n):.2f} bits, {qs(n)}{sure})"
            )
    if wins:
        lines.append(
            f"Better than NF4 on {metric.upper()} at equal or fewer bits per weight: "
            + "; ".join(wins)
            + "."
        )
    else:
        ref = ", ".join(f"{name(n)}: {bits(n):.2f} bits, {qs(n)}" for n in nf4)
        lines.append(
            f"No row beats NF4 on {metric.upper()} at equal or fewer bits per weight ({ref})."
        )
    return lines


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _row_notes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r.get("notes"):
            out.append(f"{r.get('label') or r.get('method')}: {r['notes']}")
    return out


def to_markdown(
    rows: list[Mapping[str, Any]],
    *,
    title: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """A GitHub markdown table of the rows, a legend, then the notes.

    Args:
        rows: measured rows (see the module docstring).
        title: a ``## title`` line above the table, when given.
        notes: free lines listed under the legend, before the rows' own ``notes``.

    Returns:
        The markdown text, ending with a newline.
    """
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    lines.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    lines.append("|" + "|".join("---:" if right else "---" for _, _, right in COLUMNS) + "|")
    ref = original_row(rows)
    for r in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in _cells(r, ref)) + " |")
    lines.append("")
    read = reading(rows)
    if read:
        lines += ["Reading (computed from the rows above):", ""]
        lines += [f"- {_md_escape(x)}" for x in read]
        lines.append("")
    lines += [f"- {item}" for item in LEGEND]
    all_notes = list(notes or []) + _row_notes(rows)
    if all_notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {_md_escape(n)}" for n in all_notes]
    return "\n".join(lines) + "\n"


# per-item lists that results.json keeps and a flat table does not
_NOT_IN_CSV = ("item_errors",)


def _csv_columns(rows: list[Mapping[str, Any]]) -> list[str]:
    """Schema fields present in any row (schema order), quality_<key>, then other keys
    (not the per-item lists of ``_NOT_IN_CSV``)."""
    present = {k for r in rows for k in r}
    cols = [k for k in ROW_FIELDS if k in present and k != "quality"]
    qual: list[str] = []
    extra: list[str] = []
    for r in rows:
        for k in r.get("quality") or {}:
            if f"quality_{k}" not in qual:
                qual.append(f"quality_{k}")
        for k in r:
            if k not in ROW_FIELDS and k not in extra and k not in _NOT_IN_CSV:
                extra.append(k)
    # keep quality columns where the schema puts quality
    at = cols.index("notes") if "notes" in cols else len(cols)
    return cols[:at] + qual + cols[at:] + extra


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, dict | list | tuple):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    return v


def to_csv(rows: list[Mapping[str, Any]]) -> str:
    """Flat CSV text: one line per row, ``quality`` spread into ``quality_<key>`` columns,
    ``None`` as an empty cell, other nested values as JSON."""
    cols = _csv_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = {k: v for k, v in r.items() if k != "quality"}
        for k, v in (r.get("quality") or {}).items():
            flat[f"quality_{k}"] = v
        w.writerow({c: _csv_cell(flat.get(c)) for c in cols})
    return buf.getvalue()


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy/torch scalars as Python numbers, paths as strings,
    NaN and infinities as null (strict JSON has no such numbers)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str | int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    item = getattr(x, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(x)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over ``path``: a reader sees
    the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _meta_lines(meta: Mapping[str, Any]) -> list[str]:
    """A few setup lines for table.md from the run's meta (missing keys are left out)."""
    parts = []
    for key, name in (
        ("task", "task"),
        ("data", "data"),
        ("limit", "clips limit"),
        ("every", "every"),
        ("threads", "threads"),
        ("date", "date"),
    ):
        if meta.get(key) is not None:
            parts.append(f"{name}: {meta[key]}")
    lines = ["- " + "; ".join(parts)] if parts else []
    m = meta.get("machine")
    if isinstance(m, Mapping):
        mach = [str(m[k]) for k in ("processor", "platform") if m.get(k)]
        if m.get("cpu_count"):
            mach.append(f"{m['cpu_count']} CPUs")
        if m.get("mem_total_gb"):
            mach.append(f"{m['mem_total_gb']} GB RAM")
        if m.get("cuda"):
            mach.append(f"GPU {m['cuda']}")
        for k in ("python", "torch"):
            if m.get(k):
                mach.append(f"{k} {m[k]}")
        if mach:
            lines.append("- machine: " + ", ".join(mach))
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    return lines


def write_results(
    rows: list[Mapping[str, Any]], out_dir: str | os.PathLike, *, meta: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``table.md``, ``results.csv`` and ``results.json`` into ``out_dir`` (created).

    ``meta`` goes into results.json as is; table.md takes its ``title`` (default: the
    model name), its ``notes`` (list of lines) and a short setup summary from it.
    Each file is written atomically.

    Returns:
        ``{"markdown": ..., "csv": ..., "json": ...}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = meta.get("title")
    if title is None:
        models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
        title = f"{', '.join(models)}: compression comparison" if models else "Comparison"
    md = to_markdown(rows, title=title, notes=meta.get("notes"))
    setup = _meta_lines(meta)
    if setup:
        md += "\nSetup:\n\n" + "\n".join(setup) + "\n"
    paths = {"markdown": out / "table.md", "csv": out / "results.csv", "json": out / "results.json"}
    _atomic_write(paths["markdown"], md)
    _atomic_write(paths["csv"], to_csv(rows))
    doc = {"meta": _jsonable(meta), "rows": _jsonable(list(rows))}
    _atomic_write(paths["json"], json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return paths


def print_table(rows: list[Mapping[str, Any]], console, *, title: str | None = None) -> None:
    """Print the rows as a rich Table on ``console`` (a ``rich.console.Console``), with the
    same columns and cells as the markdown table."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for header, _, right in COLUMNS:
        table.add_column(header, justify="right" if right else "left", overflow="fold")
    ref = original_row(rows)
    for r in rows:
        cells = [Text(c) for c in _cells(r, ref)]  # Text: no rich markup in labels
        table.add_row(*cells, style="red" if r.get("error") else None)
    console.print(table)
    for line in reading(rows):
        console.print(Text(line))
