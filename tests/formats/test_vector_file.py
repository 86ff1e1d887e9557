"""Vector codebooks in .wclust files: exact round trip, version 4 only when needed,
malformed entries refused with clear errors."""

import json

import pytest
import torch

import wclust
import wclust.formats.wclust_file as wf
from tests.conftest import tiny_whisper
from wclust.config import ClusterConfig
from wclust.nn.vector import VectorWeight

pytest.importorskip("transformers")

CFG = ClusterConfig(
    bits=3,
    cluster_dim=2,
    method="scaled-exact",
    group_size=32,
    codebook_dtype="float16",
    overrides={"*fc1": {"method": "exact", "granularity": "channel", "cluster_dim": 4, "bits": 2}},
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_whisper()
    rep = wclust.compress_(model, CFG)
    path = wf.save(model, tmp_path_factory.mktemp("v") / "v.wclust", report=rep, config=CFG)
    return model, path


def test_round_trip_is_exact(saved, whisper_inputs):
    model, path = saved
    header = wf.read_header(path)
    assert header["version"] == 4
    dims = {o: e.get("cluster_dim") for e in header["clustered"] for o in e["owners"]}
    assert dims["model.encoder.layers.0.fc1"] == 4 and dims["model.decoder.embed_tokens"] == 2
    back = wclust.load(path)
    cws = {n: m.clustered for n, m in back.named_modules() if hasattr(m, "clustered")}
    assert all(isinstance(c, VectorWeight) for c in cws.values())
    for name, cw in cws.items():
        orig = model.get_submodule(name).clustered
        assert torch.equal(cw.dense(), orig.dense()), name
        assert cw.codebook.dtype == orig.codebook.dtype
    with torch.no_grad():
        a = model(**whisper_inputs).logits
        b = back(**whisper_inputs).logits
    assert torch.equal(a, b)


def test_scalar_files_keep_their_version(tmp_path):
    model = tiny_whisper()
    wclust.compress_(model, ClusterConfig(bits=3))
    assert wf.read_header(wf.save(model, tmp_path / "s.wclust"))["version"] == 1


def test_entropy_coding_is_refused_for_vector_codebooks(saved, tmp_path):
    model, _ = saved
    with pytest.raises(ValueError, match="entropy coding works with scalar codebooks"):
        wf.save(model, tmp_path / "e.wclust", entropy="huffman")
    assert not (tmp_path / "e.wclust").exists()


def _rewrite(path, tmp_path, edit_header=None, edit_tensors=None):
    """A copy of ``path`` with header/tensors edited and a valid checksum."""
    from safetensors.torch import load_file

    header = wf.read_header(path)
    tensors = load_file(str(path))
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(header, sort_keys=True)
    out = tmp_path / "bad.wclust"
    wf._write_safetensors(
        str(out), tensors, {"wclust": text, "wclust_sha256": wf._digest(text, tensors)}
    )
    return out


def _vector_entry(header):
    return next(e for e in header["clustered"] if e.get("cluster_dim") == 2)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: _vector_entry(h).update(cluster_dim=3), "cluster_dim 3 is not 2, 4 or 8"),
        (lambda h: _vector_entry(h).update(bits=17), "not an integer from 1 to 16"),
        (lambda h: _vector_entry(h).update(cluster_dim=8), "a vector codebook is .*, 8\\)"),
        (lambda h: _vector_entry(h).pop("cluster_dim"), "codebook: dtype float16 with 3 dims"),
        (lambda h: _vector_entry(h).update(entropy={}), "not entropy-coded"),
    ],
)
def test_malformed_headers_are_refused(saved, tmp_path, edit, match):
    _, path = saved
    with pytest.raises(wclust.FormatError, match=match):
        wclust.load(_rewrite(path, tmp_path, edit_header=edit))


def test_malformed_tensors_are_refused(saved, tmp_path):
    _, path = saved
    key = _vector_entry(wf.read_header(path))["key"]

    def flat_codebook(t):
        t[f"{key}.codebook"] = t[f"{key}.codebook"][:, :, 0]

    with pytest.raises(wclust.FormatError, match="codebook: dtype float16 with 2 dims"):
        wclust.load(_rewrite(path, tmp_path, edit_tensors=flat_codebook))

    def short_codes(t):
        t[f"{key}.codes"] = t[f"{key}.codes"][:-1]

    with pytest.raises(wclust.FormatError, match="packed codes do not match"):
        wclust.load(_rewrite(path, tmp_path, edit_tensors=short_codes))

    def offsets(t):
        t[f"{key}.group_offset"] = torch.zeros_like(t[f"{key}.group_scale"])

    with pytest.raises(wclust.FormatError, match="has no \\['group_offset'\\]"):
        wclust.load(_rewrite(path, tmp_path, edit_tensors=offsets))
