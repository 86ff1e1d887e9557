"""The executor seam of ``wclust compare``: local and Ray cells give the same rows; the
phases, ``reuse`` and the errors for bad choices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wclust.cli import app
from wclust.measure.compare import run_compare
from wclust.measure.executors import RAY_MISSING, LocalExecutor, get_executor
from wclust.recipes import resolve_method

METHODS = ["fp32", "kmeans-3b-channel"]
# measured, so they differ from run to run; everything else must be identical
TIMINGS = {
    "compress_s",
    "load_s",
    "latency_ms_mean",
    "latency_ms_median",
    "latency_ms_p10",
    "latency_ms_p90",
    "gpu_latency_ms_mean",
    "vram_mb",
    "rss_model_mb",
    "peak_rss_mb",
}
# the .wclust header records compression seconds per layer: a few bytes vary, as between
# any two local runs
SIZES = {"file_mb", "gzip_mb"}


def _untimed(rows: list[dict]) -> list[dict]:
    drop = TIMINGS | SIZES | {"hypotheses"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture(scope="module")
def local_run(bert_dir, tmp_path_factory):
    """A small compare on the tiny BERT with the local executor: (out_dir, rows)."""
    out = tmp_path_factory.mktemp("local")
    rows, meta = run_compare(
        str(bert_dir), METHODS, out, limit=4, threads=1, plots=False, executor=LocalExecutor()
    )
    assert meta["executor"] == "local" and meta["task"] == "embed"
    assert [r["method"] for r in rows] == METHODS and not any(r.get("error") for r in rows)
    return out, json.loads((out / "results.json").read_text())["rows"]  # as stored


def test_ray_gives_the_local_rows(local_run, bert_dir, tmp_path):
    """`wclust compare --executor ray --address` on a Ray started here, end to end: the
    clustered row (a prepare cell, then a measure cell) as the local run made it. One
    CPU and one row keep Ray's worker processes few (each imports torch)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "wclust.cli",
                "compare",
                "-m",
                str(bert_dir),
                "--methods",
                METHODS[1],
                "--limit",
                "4",
                "--threads",
                "1",
                "--no-plots",
                "--executor",
                "ray",
                "--address",
                address,
                "-o",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        ray.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["executor"] == "ray" and "partial" not in res["meta"]
    local = local_run[1][1:]  # the clustered row
    for ray_row, local_row in zip(_untimed(res["rows"]), _untimed(local), strict=True):
        diff = {k: (v, ray_row.get(k)) for k, v in local_row.items() if ray_row.get(k) != v}
        assert ray_row == local_row, (local_row["method"], diff)
    for ray_row, local_row in zip(res["rows"], local, strict=True):
        for k in SIZES:  # MB: within 100 bytes
            assert ray_row[k] == pytest.approx(local_row[k], abs=1e-4), k
    assert res["rows"][0]["quality"]["cos_sim"] < 1.0  # a real measurement, not a copy


class Recorder:
    """An executor that runs nothing: records each batch, answers every cell failed."""

    name = "recorder"

    def __init__(self):
        self.batches = []

    def map(self, specs, on_start=None, on_done=None):
        self.batches.append([s["mode"] for s in specs])
        results = [{"ok": False, "error": "not run"} for _ in specs]
        for i, res in enumerate(results):
            if on_start:
                on_start(i)
            if on_done:
                on_done(i, res)
        return results

    def close(self):
        pass


def test_phases_and_reuse(local_run, bert_dir, tmp_path):
    out, _ = local_run
    # reuse: artifacts and reference outputs are kept; only the measure cells run
    rec = Recorder()
    rows, _ = run_compare(
        str(bert_dir), METHODS, out, limit=4, threads=1, plots=False, reuse=True, executor=rec
    )
    assert rec.batches == [[], ["measure", "measure"]]
    assert [r["error"] for r in rows] == ["not run", "not run"]
    # other calibration data: uncalibrated methods are still reused, calibrated ones
    # are prepared again
    arts = Path(out) / "artifacts"
    kept = next(arts.glob("*.kmeans-3b-channel.wclust"))
    fisher = kept.with_name(
        kept.name.replace("kmeans-3b-channel", resolve_method("kmeans:bits=4+fisher").artifact_name)
    )
    fisher.write_bytes(kept.read_bytes())
    meta = kept.with_suffix(".prepare.json").read_text()
    fisher.with_suffix(".prepare.json").write_text(meta)
    rec = Recorder()
    run_compare(
        str(bert_dir),
        [*METHODS, "kmeans:bits=4+fisher"],
        out,
        limit=4,
        threads=1,
        plots=False,
        reuse=True,
        executor=rec,
        calib_data=str(tmp_path),  # other data than the kept artifacts
    )
    assert rec.batches[0] == ["prepare"]
    fisher.unlink()
    fisher.with_suffix(".prepare.json").unlink()
    # a fresh folder: every prepare at once; a failed prepare fails its row, nothing more
    rec = Recorder()
    rows, _ = run_compare(str(bert_dir), METHODS, tmp_path, plots=False, executor=rec)
    assert rec.batches == [["prepare", "prepare"], []]
    assert [r["method"] for r in rows] == METHODS


def test_missing_ray_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError) as e:
        get_executor("ray")
    assert str(e.value) == RAY_MISSING == "the ray executor needs: pip install 'wclust[ray]'"
    r = CliRunner().invoke(app, ["compare", "--executor", "ray", "-o", str(tmp_path)])
    assert r.exit_code == 2 and f"error: {RAY_MISSING}\n" in r.output, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "nonsense"], "unknown executor 'nonsense'; known: local, ray"),
        (["--address", "127.0.0.1:6379"], "--address is only for --executor ray"),
    ],
)
def test_cli_rejects_bad_executor_choices(args, message, tmp_path):
    r = CliRunner().invoke(app, ["compare", *args, "-o", str(tmp_path)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "results.json").exists()


def test_ray_is_imported_only_when_asked():
    code = (
        "import sys, wclust, wclust.cli, wclust.measure.compare, wclust.measure.executors; "
        "print('ray' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
