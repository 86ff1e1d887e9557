"""Bad input to compress_/load/inspect that other tests do not cover (README's
"What happens on bad input" table cites these and the older tests)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wclust
from wclust.cli import app


def test_meta_device_model_is_a_clear_value_error():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta device"):
        wclust.compress_(m)


def test_empty_model_is_a_clear_value_error():
    with pytest.raises(ValueError, match="no parameters to cluster"):
        wclust.compress_(nn.Sequential())


def test_inf_weight_is_a_clear_value_error():
    m = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight[3, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        wclust.compress_(m)


def test_integer_weights_stay_dense_with_the_reason():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    m[0].weight = nn.Parameter(torch.randint(0, 5, (8, 8)), requires_grad=False)
    rep = wclust.compress_(m)
    by = {r.name: r for r in rep.layers}
    assert by["0"].status == "dense" and "not floating point" in by["0"].reason
    assert by["1"].status == "clustered"


def test_more_clusters_than_distinct_values_is_lossless():
    m = nn.Sequential(nn.Linear(16, 4, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([0.5, -1.0, 2.0]).repeat(22)[:64].view(4, 16))
    w = m[0].weight.detach().clone()
    cfg = wclust.ClusterConfig(bits=None, n_clusters=256, granularity="tensor", min_numel=0)
    rep = wclust.compress_(m, cfg)
    assert rep.layers[0].status == "clustered" and rep.layers[0].distinct_values == 3
    assert torch.equal(wclust.strip(m)[0].weight, w)


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(wclust.FormatError, match="Is a directory"):
        wclust.load(tmp_path)
    with pytest.raises(wclust.FormatError):
        wclust.read_header(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    # a folder is read as a Hugging Face folder: this one is none
    assert "not a wclust Hugging Face folder" in " ".join(r.output.split())
