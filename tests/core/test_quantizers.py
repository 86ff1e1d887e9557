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


def test_fit_scales_never_worse_than_absmax_and_follows_importance():
    from wclust.core.quantizers import fit_scales

    torch.manual_seed(1)
    rows = torch.distributions.StudentT(4.0).sample((256, 64)) * 0.02
    imp = torch.rand(256, 64) ** 4
    for w in (None, imp):
        ww = torch.ones_like(rows) if w is None else w
        amax = rows.abs().amax(1).half().float()

        def err(s, ww=ww):
            q = NF4_TABLE[torch.bucketize(rows / s[:, None], (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2)]
            return ((q * s[:, None] - rows) ** 2 * ww).sum(1)

        s = fit_scales(rows, NF4_TABLE, w)
        assert s.dtype == torch.float16 and s.shape == (256,)
        e_fit, e_abs = err(s.float()), err(amax)
        assert torch.all(e_fit <= e_abs * (1 + 1e-6))  # per group: absmax is a candidate
        assert e_fit.sum() < 0.95 * e_abs.sum()  # and the search does find better scales
    # a group whose only important value is small gets a scale that fits that value
    row = torch.tensor([[1.0] + [0.3] + [0.0] * 62])
    imp1 = torch.tensor([[1e-6] + [1.0] + [1e-6] * 62])
    s = fit_scales(row, NF4_TABLE, imp1).float()
    q = NF4_TABLE[(0.3 / s - NF4_TABLE).abs().argmin()] * s
    assert abs(float(q) - 0.3) < abs(0.3 - 0.33791524171829224) * 1e-2 + 1e-3


def test_scaled_kmeans_fit_scale_lowers_weighted_error():
    torch.manual_seed(2)
    x = torch.distributions.StudentT(4.0).sample((32, 512)) * 0.02
    imp = torch.rand(32, 512) ** 4
    for bits in (3, 4):
        plain = scaled_kmeans(x, bits, 64, sample_weight=imp, method="lloyd")
        fit = scaled_kmeans(x, bits, 64, sample_weight=imp, method="lloyd", fit_scale=True)
        assert fit.mse < 0.95 * plain.mse
        assert fit.codebook.numel() == 2**bits and {-1.0, 0.0, 1.0} <= set(fit.codebook[0].tolist())
        err = float(((fit.dequantize() - x) ** 2 * imp).sum() / imp.sum())
        assert err == pytest.approx(fit.mse, rel=1e-4)  # the reported error is the real one


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_grid_errors_use_the_nearest_codes_of_a_binary_search(bits):
    """The bucketed code lookup gives searchsorted's codes, values on a midpoint
    and far outside the table included."""
    from wclust.core._scales import grid_errors

    g = torch.Generator().manual_seed(bits)
    table = torch.randn(2**bits, generator=g).sort().values
    table = table / table.abs().max()
    mids = 0.5 * (table[1:] + table[:-1])
    rows = torch.randn(300, 64, generator=g)
    rows[0, : min(64, len(mids))] = mids[:64]  # exactly on a boundary: the lower code
    rows[1] *= 50  # far outside the table's range
    w = torch.rand(300, 64, generator=g)
    amax = rows.abs().amax(1)
    cand = torch.stack([amax] + [amax * (0.7 + 0.02 * i) for i in range(21)], 1)
    cand[0, 0] = 1.0  # the boundary row unscaled
    got = grid_errors(rows.numpy(), w.numpy(), table.numpy(), mids.numpy(), cand.numpy())
    v = rows[:, None, :] / cand[:, :, None]
    codes = torch.searchsorted(mids, v.contiguous())
    err = (table[codes] * cand[:, :, None] - rows[:, None, :]).double() ** 2
    want = (err * w[:, None, :].double()).sum(2)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=0)
