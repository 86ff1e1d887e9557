"""The larger-than-memory path: a sharded checkpoint compressed tensor by tensor gives
the same file content as compressing the loaded model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import wclust
import wclust.formats.wclust_file as wf
from tests.conftest import tiny_gpt2, tiny_llama, tiny_whisper
from wclust.formats.checkpoint import CheckpointError, SafetensorsCheckpoint
from wclust.stream import compress_checkpoint

pytest.importorskip("accelerate")


def in_memory(folder, out, cfg):
    from wclust.models import load_model

    loaded = load_model(str(folder))
    report = wclust.compress_(loaded.model, cfg)
    return wclust.save(loaded.model, out, report=report, config=cfg, source="x")


def header_and_tensors(path):
    raw = wf._read_raw_header(path)
    h = json.loads(raw["text"])
    h["report"]["seconds"] = 0
    h["report"]["stages"] = {}  # seconds per stage
    for layer in h["report"]["layers"]:
        layer["seconds"] = 0
    return h, load_file(str(path))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_whisper])
def test_streaming_equals_in_memory(tmp_path, make):
    folder = tmp_path / "ckpt"
    make().save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()  # really sharded
    cfg = wclust.ClusterConfig(bits=3, granularity="channel", method="exact")
    a = compress_checkpoint(folder, tmp_path / "s.wclust", cfg, source="x")
    in_memory(folder, tmp_path / "m.wclust", cfg)
    hs, ts = header_and_tensors(tmp_path / "s.wclust")
    hm, tm = header_and_tensors(tmp_path / "m.wclust")
    assert hs == hm
    assert sorted(ts) == sorted(tm)
    for k in ts:
        assert ts[k].dtype == tm[k].dtype and torch.equal(ts[k], tm[k]), k
    assert sum(layer.status == "clustered" for layer in a.layers) >= 4
    wclust.load(tmp_path / "s.wclust")  # loads without a factory


def test_streaming_tied_embedding_is_stored_once(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_gpt2().save_pretrained(folder, max_shard_size="40KB")
    compress_checkpoint(folder, tmp_path / "g.wclust", wclust.ClusterConfig(bits=4))
    h = wf.read_header(tmp_path / "g.wclust")
    owners = [e["owners"] for e in h["clustered"]]
    assert ["transformer.wte", "lm_head"] in owners


def test_streaming_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsCheckpoint(tmp_path)
    folder = tmp_path / "ckpt"
    tiny_llama().save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    # A checkpoint whose names do not match its config is refused, naming the fix.
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="--no-stream"):
        compress_checkpoint(folder, tmp_path / "x.wclust")
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[:-4])  # truncated: an entry no longer fits
    with pytest.raises(CheckpointError, match="does not fit the file"):
        compress_checkpoint(folder, tmp_path / "x.wclust")
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        compress_checkpoint(folder, tmp_path / "x.wclust")
    assert not (tmp_path / "x.wclust").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.wclust")]


def test_failure_mid_stream_keeps_existing_file_and_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    tiny_llama().save_pretrained(folder, max_shard_size="40KB")
    out = tmp_path / "o.wclust"
    out.write_bytes(b"old")
    calls = {"n": 0}
    real = SafetensorsCheckpoint.get

    def flaky(self, name, dtype=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk read error")
        return real(self, name, dtype)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", flaky)
    with pytest.raises(OSError):
        compress_checkpoint(folder, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "o.wclust"]
