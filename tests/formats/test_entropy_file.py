"""Entropy-coded .wclust files: exact round trips, sizes, corrupt payloads."""

import json

import pytest
import torch
from torch import nn

import wclust
import wclust.formats.wclust_file as wf
from wclust.stages.prune import prune_


def pruned_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    prune_(m, 0.9, scope="layer")
    wclust.compress_(m, wclust.ClusterConfig(bits=4, granularity="tensor", keep_zeros=True))
    return m


def mlp_factory():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_entropy_file_round_trips_exactly_and_is_smaller(tmp_path, coder):
    m = pruned_mlp()
    plain = wclust.save(m, tmp_path / "plain.wclust")
    ent = wclust.save(m, tmp_path / "ent.wclust", entropy=coder)
    assert wclust.read_header(plain)["version"] == 1  # old readers still read these
    hdr = wclust.read_header(ent)
    assert hdr["version"] == 2
    assert {e["entropy"]["layout"] for e in hdr["clustered"]} == {"sparse"}
    assert ent.stat().st_size < plain.stat().st_size
    m2 = wclust.load(ent, mlp_factory)
    for a, b in zip(m, m2, strict=True):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.clustered.codes(), b.clustered.codes())
            assert torch.equal(a.weight, b.weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_dense_layout_without_keep_zeros(tmp_path):
    torch.manual_seed(1)
    m = mlp_factory()
    wclust.compress_(m, wclust.ClusterConfig(bits=3, granularity="channel"))
    p = wclust.save(m, tmp_path / "d.wclust", entropy="ans")
    assert {e["entropy"]["layout"] for e in wclust.read_header(p)["clustered"]} == {"dense"}
    m2 = wclust.load(p, mlp_factory)
    assert torch.equal(m[0].weight, m2[0].weight)


def test_unknown_entropy_coder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="huffman"):
        wclust.save(pruned_mlp(), tmp_path / "x.wclust", entropy="zip")


def _rewrite(path, change):
    """Apply ``change(header, tensors)`` and write the file back with a valid checksum,
    so that the entropy decoder (not the checksum) has to catch the damage."""
    from safetensors.torch import load_file

    raw = wf._read_raw_header(path)
    header = raw["header"]
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}  # no mmap left
    change(header, tensors)
    text = json.dumps(header, sort_keys=True)
    wf._write_safetensors(
        str(path), tensors, {"wclust": text, "wclust_sha256": wf._digest(text, tensors)}
    )


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "escape", "layout"])
def test_corrupt_entropy_payload_is_a_format_error(tmp_path, coder, damage):
    p = wclust.save(pruned_mlp(), tmp_path / "e.wclust", entropy=coder)

    def change(header, tensors):
        t = tensors["clustered.0.entropy"]
        if damage == "truncate":
            tensors["clustered.0.entropy"] = t[: t.numel() - 9].clone()
        elif damage == "flip":
            t = t.clone()
            t[t.numel() - 30] ^= 0x41
            tensors["clustered.0.entropy"] = t
        elif damage == "escape":
            header["clustered"][0]["entropy"]["escape"] = 0
        else:
            header["clustered"][0]["entropy"]["layout"] = "dense"

    _rewrite(p, change)
    with pytest.raises(wclust.FormatError, match="clustered.0"):
        wclust.load(p, mlp_factory)
