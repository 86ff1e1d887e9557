"""Codebooks with per-group scales: NormalFloat tables and k-means over normalized groups."""

import pytest
import torch

from wclust.core.quantizers import NF4_TABLE, nf4, normal_float_table, scaled_kmeans


def test_normal_float_table_reproduces_nf4_and_has_anchors():
    torch.testing.assert_close(normal_float_table(4), NF4_TABLE, rtol=0, atol=1e-6)
    for b in (2, 3, 5, 8):
        t = normal_float_table(b)
        assert t.numel() == 2**b
        assert torch.all(t[1:] > t[:-1])
        assert t[0] == -1 and t[-1] == 1 and (t == 0).sum() == 1
    with pytest.raises(ValueError, match="bits"):
        normal_float_table(1)


def test_scaled_lloyd_never_worse_than_nf4_and_keeps_anchors():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.02
    imp = torch.rand(64, 256) ** 4  # skewed importance
    for sw in (None, imp):
        ref = nf4(x, 64)
        sk = scaled_kmeans(x, 4, 64, sample_weight=sw, method="lloyd")
        w = torch.ones_like(x) if sw is None else sw
        err_nf4 = ((ref.dequantize() - x) ** 2 * w).sum()
        err_sk = ((sk.dequantize() - x) ** 2 * w).sum()
        assert err_sk <= err_nf4 * (1 + 1e-5)  # Lloyd from the NF4 table only descends
        assert err_sk < 0.99 * err_nf4  # and does move: the data are not Gaussian
        table = sk.codebook[0]
        assert {-1.0, 0.0, 1.0} <= set(table.tolist())
        # every group's largest-magnitude weight is reproduced up to the fp16 scale
        rows, deq = x.reshape(-1, 64), sk.dequantize().reshape(-1, 64)
        i = rows.abs().argmax(1)
        big, got = rows.gather(1, i[:, None]), deq.gather(1, i[:, None])
        torch.testing.assert_close(got, big, rtol=1e-3, atol=0)


def test_scaled_lloyd_without_anchors_and_bad_method():
    x = torch.randn(8, 128)
    sk = scaled_kmeans(x, 3, 64, method="lloyd", anchors=False)
    assert sk.codebook.numel() == 8 and sk.codes.max() < 8
    with pytest.raises(ValueError, match="method"):
        scaled_kmeans(x, 3, 64, method="magic")
