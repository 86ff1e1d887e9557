"""The comparison table's output side: markdown, CSV, JSON, rich, and the plots."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch

from wclust.report import table as T
from wclust.report.table import (
    COLUMNS,
    latency_str,
    print_table,
    quality_str,
    to_markdown,
    write_results,
)

HEADER = (
    "| Model | Method | Bits/weight | Ratio | Inference time (CPU, ms) | Inference time (GPU, ms) "
    "| RAM: model tensors (MB) | RAM: process peak (MB) | VRAM (MB) | Quality "
    "| Size in .gz (MB) | Compress time (s) |"
)


def _row(**kw):
    row = {
        "model": "whisper-base",
        "method": "kmeans-4b-channel",
        "label": "k-means 4-bit per channel (exact)",
        "family": "clustering",
        "bits_per_weight": 4.5,
        "ratio": 7.1,
        "compress_s": 12.3,
        "file_mb": 40.1,
        "gzip_mb": 35.2,
        "load_s": 1.2,
        "latency_ms_mean": 812.0,
        "latency_ms_median": 790.0,
        "latency_ms_p10": 500.0,
        "latency_ms_p90": 1200.0,
        "n_clips": 100,
        "gpu_latency_ms_mean": None,
        "vram_mb": None,
        "model_tensor_mb": 40.0,
        "rss_model_mb": 45.0,
        "peak_rss_mb": 900.0,
        "quality": {"wer": 10.42, "cer": 3.80},
        "notes": "",
    }
    row.update(kw)
    return row


def _rows():
    return [
        _row(
            method="fp32",
            label="original fp32",
            family="original",
            bits_per_weight=32.0,
            ratio=1.0,
            compress_s=None,
            gzip_mb=270.0,
            model_tensor_mb=290.0,
            quality={"wer": 10.1, "cer": 3.5},
        ),
        _row(),
        _row(
            method="int8-dynamic",
            label="torch dynamic int8",
            family="quantization",
            bits_per_weight=8.1,
            ratio=3.95,
            compress_s=None,
            gzip_mb=None,
            gpu_latency_ms_mean=95.3,
            vram_mb=410.0,
            notes="runtime transform",
        ),
    ]


def _cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |")
    return [c.strip() for c in line[2:-2].split(" | ")]


# ---- quality_str / latency ------------------------------------------------------------


@pytest.mark.parametrize(
    "quality, expected",
    [
        ({"wer": 10.42, "cer": 3.8}, "3.80% CER, 10.42% WER"),
        ({"cer": 3.8, "wer": 10.424}, "3.80% CER, 10.42% WER"),
        ({"wer": 7.0}, "7.00% WER"),
        ({"ppl": 12.3}, "PPL 12.30"),
        ({"ppl": 12.345}, "PPL 12.35"),
        ({"top1_agreement": 98.0, "kl": 0.0123}, "top1_agreement=98, kl=0.0123"),
        ({"ppl": 9.5, "tokens": 1000}, "PPL 9.50, tokens=1000"),
        ({"wer": None}, "WER n/a"),
        ({"kl": None}, "kl=n/a"),
        ({}, "n/a"),
        (None, "n/a"),
    ],
)
def test_quality_str(quality, expected):
    assert quality_str(quality) == expected


def test_latency_str():
    assert latency_str(_row()) == "812 (med 790, 500–1200)"
    assert latency_str(_row(latency_ms_mean=None)) == "n/a"
    assert latency_str(_row(latency_ms_p10=None)) == "812 (med 790)"
    assert latency_str({"gpu_latency_ms_mean": 95.27}, "gpu_latency_ms") == "95.3"
    small = _row(
        latency_ms_mean=3.214, latency_ms_median=3.1, latency_ms_p10=2.5, latency_ms_p90=12.25
    )
    assert latency_str(small) == "3.21 (med 3.10, 2.50–12.2)"


# ---- markdown -------------------------------------------------------------------------


def test_markdown_header_and_rows():
    rows = _rows()
    md = to_markdown(rows, title="whisper-base", notes=["a note"])
    lines = md.splitlines()
    assert lines[0] == "## whisper-base"
    i = lines.index(HEADER)
    assert lines[i + 1].count("|") == len(COLUMNS) + 1
    body = lines[i + 2 : i + 2 + len(rows)]
    assert all(line.startswith("| whisper-base |") for line in body)
    assert lines[i + 2 + len(rows)] == ""  # table ends after one line per row

    orig, clus, int8 = (dict(zip([h for h, _, _ in COLUMNS], _cells(b), strict=True)) for b in body)
    assert clus == {
        "Model": "whisper-base",
        "Method": "k-means 4-bit per channel (exact)",
        "Bits/weight": "4.50",
        "Ratio": "7.10×",
        # ratios to the original (fp32) row: 40/290, 35.2/270
        "Inference time (CPU, ms)": "812 (1.00×; med 790, 500–1200)",
        "Inference time (GPU, ms)": "n/a",
        "RAM: model tensors (MB)": "40.0 (0.14×)",
        "RAM: process peak (MB)": "900 (1.00×)",
        "VRAM (MB)": "n/a",
        "Quality": "3.80% CER, 10.42% WER",
        "Size in .gz (MB)": "35.2 (0.13×)",
        "Compress time (s)": "12.3",
    }
    assert orig["Bits/weight"] == "32.00" and orig["Ratio"] == "1.00×"
    assert orig["Compress time (s)"] == "n/a" and orig["RAM: model tensors (MB)"] == "290 (1.00×)"
    # the original has no GPU time: no ratio to show
    assert int8["Inference time (GPU, ms)"] == "95.3" and int8["VRAM (MB)"] == "410"
    assert int8["Size in .gz (MB)"] == "n/a"

    # legend for both RAM columns, then the notes (given, then the rows' own)
    assert "**RAM: model tensors**" in md and "parameters and buffers" in md
    assert "**RAM: process peak**" in md and "peak resident set size" in md
    assert md.index("a note") > md.index("**RAM: process peak**")
    assert "torch dynamic int8: runtime transform" in md


def test_markdown_missing_fields_failed_rows_and_pipes():
    rows = [{"model": "m", "method": "broken", "label": "a | b", "error": "boom"}]
    md = to_markdown(rows)
    line = next(x for x in md.splitlines() if x.startswith("| m |"))
    assert "a \\| b" in line
    cells = line[2:-2].split(" | ")
    assert len(cells) == len(COLUMNS)
    assert cells.count("n/a") == len(COLUMNS) - 3  # all but Model, Method, Quality
    assert "FAILED" in cells[9]
    assert not md.startswith("##")  # no title given


def test_print_table_renders_same_cells():
    from rich.console import Console

    console = Console(file=io.StringIO(), width=400, color_system=None)
    rows = _rows() + [{"model": "m", "method": "x", "label": "[bold]x[/bold]", "error": "e"}]
    print_table(rows, console, title="t")
    out = console.file.getvalue()
    assert "RAM: process peak (MB)" in out
    assert "812 (1.00×; med 790, 500–1200)" in out and "3.80% CER, 10.42% WER" in out
    assert "Fastest: fp32" in out  # the reading follows the table
    assert "[bold]x[/bold]" in out  # labels are text, not rich markup


# ---- files ----------------------------------------------------------------------------


def test_write_results_files(tmp_path):
    rows = _rows()
    out = tmp_path / "a" / "b"  # created
    meta = {"model": "whisper-base", "task": "asr", "notes": ["n1"], "machine": {"cpu_count": 2}}
    paths = write_results(rows, out, meta=meta)
    assert set(paths) == {"markdown", "csv", "json"}
    assert paths["markdown"] == out / "table.md"
    assert paths["csv"] == out / "results.csv"
    assert paths["json"] == out / "results.json"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "table.md"]

    md = paths["markdown"].read_text()
    assert HEADER in md and "n1" in md and "task: asr" in md

    doc = json.loads(paths["json"].read_text())
    assert doc == {"meta": meta, "rows": rows}


def test_csv_round_trip(tmp_path):
    rows = _rows() + [{"model": "m", "method": "broken", "error": 'boom, "quoted"\nline'}]
    rows[2]["quality"] = {"wer": 11.0, "cer": 4.0, "extra": 1.5}
    paths = write_results(rows, tmp_path, meta={})
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    cols = list(back[0])
    assert "quality" not in cols
    assert cols[:4] == ["model", "method", "label", "family"]
    assert {"quality_wer", "quality_cer", "quality_extra", "error"} <= set(cols)
    assert back[1]["method"] == "kmeans-4b-channel"
    assert float(back[1]["bits_per_weight"]) == 4.5
    assert float(back[1]["quality_wer"]) == 10.42 and float(back[1]["quality_cer"]) == 3.8
    assert int(back[1]["n_clips"]) == 100
    assert back[1]["vram_mb"] == "" and back[1]["quality_extra"] == ""  # None / absent
    assert float(back[2]["quality_extra"]) == 1.5
    assert back[3]["error"] == rows[3]["error"]
    for r, b in zip(rows[:3], back[:3], strict=True):
        for k, v in r.items():
            if isinstance(v, float):
                assert float(b[k]) == v


def test_json_plain_values(tmp_path):
    rows = [
        _row(
            bits_per_weight=np.float32(4.5),
            n_clips=np.int64(3),
            ppl=float("nan"),
            loss=torch.tensor(0.25),
        )
    ]
    doc = json.loads(write_results(rows, tmp_path, meta={"out": tmp_path})["json"].read_text())
    r = doc["rows"][0]
    assert r["bits_per_weight"] == 4.5 and r["n_clips"] == 3 and r["loss"] == 0.25
    assert r["ppl"] is None  # strict JSON: no NaN
    assert doc["meta"]["out"] == str(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_results(_rows(), tmp_path, meta={})
    write_results(_rows()[:1], tmp_path, meta={})  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json", "table.md"]
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 1
    mask = os.umask(0)
    os.umask(mask)
    # the usual mode of a new file, not mkstemp's 0600
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    write_results(_rows(), tmp_path, meta={})
    before = (tmp_path / "results.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(T.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_results(_rows()[:1], tmp_path, meta={})
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json", "table.md"]


# ---- plots ----------------------------------------------------------------------------


def _png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    from wclust.report.plots import pareto_front

    pts = [(32, 10.0), (4, 11.0), (4.5, 10.5), (8, 10.6), (3, 18.0), (4, 12.0), (2, 35.0)]
    assert pareto_front(pts) == [(2, 35.0), (3, 18.0), (4, 11.0), (4.5, 10.5), (32, 10.0)]
    acc = [(2, 50.0), (4, 90.0), (8, 89.0), (32, 95.0)]
    assert pareto_front(acc, lower_is_better=False) == [(2, 50.0), (4, 90.0), (32, 95.0)]


def test_pareto_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    from wclust.report.plots import pareto_plot

    rows = _rows() + [
        _row(
            method="int4",
            family="quantization",
            bits_per_weight=4.25,
            quality={"wer": 11.5, "cer": 4.2},
        ),
        _row(method="no-quality", quality=None),
        _row(method="hybrid", family="hybrid", bits_per_weight=4.3),
        {"model": "whisper-base", "method": "broken", "error": "x"},
    ]
    p = pareto_plot(rows, tmp_path / "sub" / "pareto.png")
    assert p == tmp_path / "sub" / "pareto.png" and _png(p)
    p2 = pareto_plot(rows, tmp_path / "cer.png", metric="cer")
    assert _png(p2)
    # nothing to draw: still a figure that says so
    p3 = pareto_plot(rows, tmp_path / "none.png", metric="ppl")
    assert _png(p3)


def test_histogram_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    from wclust.report.plots import histogram_plot

    w = torch.randn(64, 32)
    per_channel = torch.sort(torch.randn(64, 8), dim=1).values  # (n_codebooks, k)
    p = histogram_plot(w, per_channel, tmp_path / "h.png", title="per channel")
    assert _png(p)
    p2 = histogram_plot(w.numpy(), np.linspace(-2, 2, 16), tmp_path / "h2.png", log_y=False)
    assert _png(p2)


def test_plots_name_the_extra_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    from wclust.report import plots

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"wclust\[bench\]"):
        plots.histogram_plot(np.zeros(4), np.zeros(2), tmp_path / "h.png")
    with pytest.raises(ImportError, match=r"wclust\[bench\]"):
        plots.pareto_plot(_rows(), tmp_path / "p.png")


def test_quality_str_task_metrics():
    q = {"cos_sim": 0.999871, "cos_min": 0.98, "nn_recall": 96.5}
    assert quality_str(q) == "cos 0.99987, min cos 0.9800, NN@1 96.5%"
    assert quality_str({"top1_agree": 62.5, "kl_div": 0.4127}) == "top-1 agree 62.5%, KL 4.13e-01"


# ---- the reading under the table ------------------------------------------------------


def _asr(method, bits, wer, ms, **kw):
    return {
        "model": "m",
        "method": method,
        "label": method,
        "bits_per_weight": bits,
        "latency_ms_mean": ms,
        "quality": {"wer": wer, "cer": wer / 3},
        **kw,
    }


def _asr_rows():
    return [
        _asr("fp32", 32.0, 10.0, 800.0),
        _asr("nf4-g64", 4.5, 11.0, 500.0),
        _asr("cluster-4b-channel", 4.25, 10.4, 600.0),
        _asr("cluster-3b-channel", 3.25, 10.6, 450.0),  # 0.6 worse: not "within +0.5"
        _asr("fit-3b", 3.0, 13.0, 700.0),  # fewer bits than NF4 but worse
        _asr("int8-dynamic", 8.1, 10.1, 300.0),  # the fastest, more bits than NF4
        {"model": "m", "method": "broken", "error": "boom"},
    ]


def test_reading_finds_smallest_fastest_and_rows_beating_nf4():
    lines = T.reading(_asr_rows())
    assert lines == [
        "Smallest within +0.5 of the original's 10.00% WER: cluster-4b-channel, 4.25 bits "
        "per weight (7.5× fewer than the original), 10.40% WER.",
        "Fastest: int8-dynamic, 300 ms mean on CPU, 0.38× the original's, 10.10% WER.",
        "Better than NF4 on WER at equal or fewer bits per weight: cluster-4b-channel "
        "(4.25 bits, 10.40% WER) beats nf4-g64 (4.50 bits, 11.00% WER); cluster-3b-channel "
        "(3.25 bits, 10.60% WER) beats nf4-g64 (4.50 bits, 11.00% WER).",
    ]


def test_reading_says_plainly_when_nothing_beats_nf4_or_is_near_the_original():
    rows = [_asr("fp32", 32.0, 10.0, 800.0), _asr("nf4-g64", 4.5, 11.0, 500.0)]
    rows += [_asr("cluster-3b", 3.0, 12.0, 450.0), _asr("cluster-5b", 5.0, 10.8, 450.0)]
    lines = T.reading(rows)
    assert lines[0] == (
        "No compressed row is within +0.5 of the original's 10.00% WER; the closest: "
        "cluster-5b, 5.00 bits per weight, 10.80% WER."
    )
    assert lines[1].startswith("Fastest: cluster-3b, 450 ms")  # first of a tie
    # cluster-5b is better than NF4 but at more bits: it does not count
    assert lines[2] == (
        "No row beats NF4 on WER at equal or fewer bits per weight "
        "(nf4-g64: 4.50 bits, 11.00% WER)."
    )
    no_nf4 = T.reading([r for r in rows if r["method"] != "nf4-g64"])
    assert no_nf4[-1] == "No NF4 row in this run to compare with."
    # equal bits and better quality: beats
    tie = T.reading(rows + [_asr("cluster-4.5b", 4.5, 10.9, 450.0)])
    assert "cluster-4.5b (4.50 bits, 10.90% WER) beats nf4-g64" in tie[-1]


def test_reading_gives_paired_intervals_when_rows_carry_clip_errors():
    """With per-clip errors on the same clips, the reading gives each row's WER minus the
    original's with a paired-bootstrap interval, and says when a win over NF4 is within
    what the choice of clips could make."""
    rng = np.random.default_rng(0)
    words = rng.integers(5, 40, size=100)
    base = rng.binomial(words, 0.10)

    def row(method, bits, edits):
        wer = 100 * edits.sum() / words.sum()
        errs = {"edits": edits.tolist(), "words": words.tolist()}
        return _asr(method, bits, wer, 500.0, item_errors=errs)

    worse = base + rng.binomial(words, 0.05)
    nf4 = base + rng.binomial(words, 0.02)
    near = nf4.copy()
    near[np.argmax(nf4 - base)] -= 1  # one word better than NF4
    rows = [row("fp32", 32.0, base), row("nf4", 4.5, nf4), row("c3", 3.0, worse)]
    rows.append(row("c4", 4.0, near))
    lines = T.reading(rows)
    diffs = next(x for x in lines if x.startswith("WER minus the original's"))
    assert "paired bootstrap over the 100 clips" in diffs
    d, lo, hi = T._paired(rows[2], rows[0])
    assert lo > 0 and f"c3 {d:+.2f} ({lo:+.2f} to {hi:+.2f})" in diffs
    assert diffs.count("(") == 3  # every compressed row
    assert lines[-1].endswith("which includes 0).") and "c4 (4.00 bits" in lines[-1]
    # rows without per-clip errors, or on other clips, get no intervals
    assert not any("bootstrap" in x for x in T.reading(_asr_rows()))
    other = dict(rows[2], item_errors={"edits": [1], "words": [3]})
    assert T._paired(other, rows[0]) is None


def test_reading_gives_paired_intervals_for_image_agreement():
    """Images' misses against the original's top-1: the difference is in the measure's
    own direction (fewer agreements, a negative difference) and its interval too."""
    rng = np.random.default_rng(1)

    def vis(method, bits, misses):
        n = len(misses)
        items = {"metric": "top1_agree", "unit": "images", "edits": misses.tolist()}
        items["words"] = [1] * n
        q = {"top1_agree": 100 - 100 * misses.sum() / n}
        return {"method": method, "bits_per_weight": bits, "quality": q, "item_errors": items}

    nf4 = rng.binomial(1, 0.06, 200)
    near = nf4.copy()
    near[np.argmax(nf4)] = 0  # one image more in agreement than NF4
    rows = [vis("fp32", 32, np.zeros(200, dtype=int)), vis("nf4", 4.5, nf4)]
    rows += [vis("c3", 3.0, rng.binomial(1, 0.2, 200)), vis("c4", 4.0, near)]
    lines = T.reading(rows)
    diffs = next(x for x in lines if x.startswith("TOP1_AGREE minus the original's"))
    assert "paired bootstrap over the 200 images" in diffs
    d, lo, hi = T._paired(rows[2], rows[0], "top1_agree")
    want = rows[2]["quality"]["top1_agree"] - 100
    assert d == pytest.approx(want) and lo <= want <= hi < 0
    assert f"c3 {d:+.2f} ({lo:+.2f} to {hi:+.2f})" in diffs
    d4, lo4, hi4 = T._paired(rows[3], rows[1], "top1_agree")
    assert d4 == pytest.approx(0.5) and lo4 <= 0 <= hi4
    assert lines[-1].endswith("which includes 0).") and "c4 (4.00 bits" in lines[-1]
    # per-image errors of another measure give no interval for this one
    assert T._paired(rows[2], rows[0], "accuracy") is None


def test_reading_gives_perplexity_intervals_over_text_windows():
    rng = np.random.default_rng(3)
    tokens = rng.integers(200, 400, size=30)

    def lm(method, bits, nats_per_token):
        nll = tokens * (nats_per_token + rng.normal(0, 0.01, size=30))
        items = {"metric": "ppl", "unit": "windows", "edits": nll.tolist()}
        items["words"] = tokens.tolist()
        q = {"ppl": float(np.exp(nll.sum() / tokens.sum()))}
        return {"method": method, "bits_per_weight": bits, "quality": q, "item_errors": items}

    rows = [lm("fp32", 32, 2.0), lm("nf4", 4.5, 2.1), lm("c3", 3.0, 2.3)]
    lines = T.reading(rows)
    diffs = next(x for x in lines if x.startswith("PPL minus the original's,"))
    assert "paired bootstrap over the 30 windows" in diffs and "points" not in diffs
    d, lo, hi = T._paired(rows[2], rows[0], "ppl")
    assert d == pytest.approx(rows[2]["quality"]["ppl"] - rows[0]["quality"]["ppl"])
    assert 0 < lo < d < hi and f"c3 {d:+.2f} ({lo:+.2f} to {hi:+.2f})" in diffs


def test_reading_of_a_higher_is_better_measure():
    def vis(method, bits, agree):
        return {"method": method, "bits_per_weight": bits, "quality": {"top1_agree": agree}}

    rows = [vis("fp32", 32, 100.0), vis("nf4", 4.5, 99.0), vis("a", 4.0, 99.6)]
    rows.append(vis("b", 3.0, 99.4))  # 0.6 points below the original
    lines = T.reading(rows)
    assert lines[0].startswith("Smallest within -0.5 of the original's top-1 agree 100.0%: a,")
    assert lines[-1].startswith("Better than NF4 on TOP1_AGREE") and "b (3.00 bits" in lines[-1]
    assert not any(x.startswith("Fastest") for x in lines)  # no times measured


def test_reading_goes_under_the_table_in_markdown_and_terminal():
    from rich.console import Console

    rows = _asr_rows()
    md = to_markdown(rows)
    lines = md.splitlines()
    table_end = max(i for i, x in enumerate(lines) if x.startswith("| m |"))
    read_at = lines.index("Reading (computed from the rows above):")
    assert table_end < read_at < md.index("**Inference time**")
    assert "- Fastest: int8-dynamic" in md
    console = Console(file=io.StringIO(), width=400, color_system=None)
    print_table(rows, console)
    out = console.file.getvalue()
    assert "Better than NF4 on WER" in out and out.index("Fastest") > out.index("nf4-g64")
    assert T.reading([]) == [] and T.reading([{"method": "x", "error": "e"}]) == []
