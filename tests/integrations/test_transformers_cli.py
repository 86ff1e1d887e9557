"""wclust compress --format hf, inspect of a folder, convert both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file

import wclust
from tests.conftest import tiny_whisper
from tests.test_cli import wclust as run

transformers = pytest.importorskip("transformers")


def test_compress_format_hf_inspect_and_convert(tmp_path, whisper_inputs):
    tiny_whisper().save_pretrained(tmp_path / "fp")
    hf = tmp_path / "hf"
    r = run("compress", tmp_path / "fp", "-o", hf, "--bits", "3", "--format", "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    m = transformers.WhisperForConditionalGeneration.from_pretrained(hf)
    assert m.model.decoder.layers[0].fc1.clustered.bits == 3
    from wclust.models import load_model  # what compare/transcribe take as a model

    assert load_model(str(hf)).model.model.decoder.layers[0].fc1.clustered.bits == 3
    r = run("inspect", hf, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    by = {x["name"]: x for x in d["report"]["layers"]}
    assert by["model.decoder.layers.0.fc1"]["bits"] == 3
    assert d["recipe"]["quantizer"] == {"kind": "kmeans", "bits": 3}
    assert d["tensor_bytes"] < d["report"]["totals"]["bytes_before"] / 4
    # folder -> file -> folder: the same tensors, the same outputs
    r = run("convert", hf, tmp_path / "m.wclust")
    assert r.returncode == 0, r.stderr[-2000:]
    f = wclust.load(tmp_path / "m.wclust")
    r = run("convert", tmp_path / "m.wclust", tmp_path / "hf2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(f(**whisper_inputs).logits, m(**whisper_inputs).logits)


def test_bad_format_and_not_a_folder_are_one_line_errors(tmp_path):
    r = run("compress", tmp_path, "-o", tmp_path / "x", "--format", "onnx")
    assert r.returncode == 2 and "--format must be wclust or hf" in r.stderr
    (tmp_path / "d").mkdir()
    r = run("inspect", tmp_path / "d")
    assert r.returncode == 2 and "Hugging Face folder" in r.stderr.replace("\n", " ")
