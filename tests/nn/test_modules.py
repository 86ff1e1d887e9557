"""Compressed modules: decoding only some rows must equal decoding everything."""

import pytest
import torch
from torch import nn

import wclust
from wclust.nn.modules import ClusteredWeight


@pytest.mark.parametrize(
    ("method", "group_size"),
    [("rtn", 128), ("nf4", 64), ("exact", None)],  # 96-wide rows: groups of 128 straddle rows
)
def test_embedding_row_decode_matches_dense(method, group_size):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(40, 96)})
    gran = "channel" if method == "exact" else "tensor"
    cfg = wclust.ClusterConfig(bits=4, method=method, group_size=group_size, granularity=gran)
    wclust.compress_(model, cfg)
    emb = model["emb"]
    cw = next(b for b in emb.modules() if isinstance(b, ClusteredWeight))
    idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
    with torch.no_grad():  # inference: the row-decoding path
        out = emb(idx)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, cw.dense()[idx], rtol=0, atol=0)
