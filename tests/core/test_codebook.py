import numpy as np
import pytest
import torch

import wclust
from wclust.core import cluster_tensor
from wclust.core.exact import brute_force_kmeans_1d


def _distinct_per_codebook(ct):
    deq = ct.dequantize().float().reshape(ct.n_codebooks, -1)
    return max(len(torch.unique(r)) for r in deq)


@pytest.mark.parametrize("method", ["exact", "kmeans"])
@pytest.mark.parametrize(
    "granularity,group_size,n_cb",
    [("tensor", None, 1), ("channel", None, 24), ("group", 16, 24 * 4)],
)
def test_shapes_dtype_and_distinct_values(method, granularity, group_size, n_cb):
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    ct = cluster_tensor(x, 8, granularity=granularity, group_size=group_size, method=method)
    assert ct.codebook.shape == (n_cb, 8)
    assert ct.codes.shape == x.shape and ct.codes.dtype == torch.uint8
    deq = ct.dequantize()
    assert deq.shape == x.shape and deq.dtype == x.dtype
    assert _distinct_per_codebook(ct) <= 8
    assert ct.mse == pytest.approx(float(((deq - x) ** 2).mean()), rel=1e-5)
    assert ct.bits == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    x = torch.randn(16, 32).to(dtype)
    ct = cluster_tensor(x, bits=2, granularity="channel", method="exact")
    assert ct.dequantize().dtype == dtype
    assert _distinct_per_codebook(ct) <= 4


def test_exact_matches_brute_force_weighted_and_unweighted():
    rng = np.random.default_rng(1)
    for trial in range(150):
        n = int(rng.integers(3, 30))
        k = int(rng.integers(2, 7))
        x = torch.from_numpy(np.round(rng.standard_normal(n), 1 if trial % 3 == 0 else 6))
        w = torch.from_numpy(rng.random(n)) if trial % 2 else None
        ct = cluster_tensor(x, k, method="exact", sample_weight=w)
        ww = w.numpy() if w is not None else np.ones(n)
        order = np.argsort(x.numpy(), kind="stable")
        best = brute_force_kmeans_1d(x.numpy()[order], ww[order], k)
        got = ct.mse * ww.sum()
        assert got == pytest.approx(best, rel=1e-7, abs=1e-9)


def test_exact_never_worse_than_lloyd():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4000, generator=g), 6 * torch.randn(40, generator=g)])
    ex = cluster_tensor(x, 16, method="exact")
    for init in ("linear", "density", "random", "kmeans++"):
        km = cluster_tensor(x, 16, method="kmeans", init=init)
        assert ex.mse <= km.mse * (1 + 1e-9)


def test_sample_weight_pulls_centroids():
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0])
    ct = cluster_tensor(x, 2, method="exact", sample_weight=w)
    assert sorted(ct.codebook[0].tolist())[1] == pytest.approx((10 + 1100) / 101)


def test_keep_zeros_keeps_exact_zeros_and_sparsity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g)
    x[torch.rand(32, 64, generator=g) < 0.6] = 0
    for method in ("exact", "kmeans"):
        ct = cluster_tensor(x, 8, method=method, granularity="channel", keep_zeros=True)
        deq = ct.dequantize()
        assert torch.equal(deq == 0, x == 0)
        assert torch.all(ct.codebook[:, 0] == 0)


def test_fewer_distinct_values_than_clusters_is_lossless():
    x = torch.tensor([[1.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    for method in ("exact", "kmeans"):
        ct = cluster_tensor(x, 16, method=method, granularity="channel")
        assert torch.equal(ct.dequantize(), x)
        assert ct.mse == 0


def test_seed_determinism_and_seed_matters_for_random_init():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    a = cluster_tensor(x, 16, init="random", seed=1)
    b = cluster_tensor(x, 16, init="random", seed=1)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("cb_dtype", ["float16", "bfloat16", "int8"])
def test_quantized_codebooks(cb_dtype):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    ct = cluster_tensor(x, 16, granularity="channel", method="exact", codebook_dtype=cb_dtype)
    ref = cluster_tensor(x, 16, granularity="channel", method="exact")
    if cb_dtype == "int8":
        q = ct.codebook_int8.float() * ct.codebook_scale[:, None]
        assert torch.allclose(q, ct.codebook)
        assert ct.codebook_nbytes == 8 * 16 + 8 * 4
    else:
        dt = getattr(torch, cb_dtype)
        assert torch.equal(ct.codebook.to(dt).float(), ct.codebook)
        assert ct.codebook_nbytes == 8 * 16 * 2
    assert ct.mse < ref.mse * 1.5 + 1e-4


def test_sizes_and_bits_per_weight():
    ct = cluster_tensor(torch.randn(64, 256), bits=4, granularity="channel")
    assert ct.nbytes == 64 * 256 // 2 + 64 * 16 * 4
    assert ct.bits_per_weight == pytest.approx(4 + 16 * 32 / 256)
    assert torch.equal(
        wclust.core.unpack_codes(ct.packed_codes(), 4, ct.numel), ct.codes.reshape(-1)
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.empty(0)), "empty"),
        (dict(x=torch.tensor([1.0, float("nan")])), "NaN/Inf"),
        (dict(x=torch.tensor([1.0, float("inf")])), "NaN/Inf"),
        (dict(x=torch.arange(10)), "floating-point"),
        (dict(x=torch.randn(4, 10), granularity="group", group_size=3), "does not divide"),
        (dict(x=torch.randn(4, 10), granularity="group"), "group_size"),
        (dict(x=torch.randn(10), granularity="channel"), "at least 2 dims"),
        (dict(x=torch.randn(10), granularity="rows"), "unknown granularity"),
        (dict(x=torch.randn(10), method="magic"), "unknown method"),
        (dict(x=torch.randn(10), init="magic"), "unknown init"),
        (dict(x=torch.randn(10), bits=9), "bits"),
        (dict(x=torch.randn(10), n_clusters=1000), "n_clusters"),
        (dict(x=torch.randn(10), n_clusters=8, bits=4), "contradicts"),
        (dict(x=torch.randn(10), sample_weight=-torch.ones(10)), "non-negative"),
        (dict(x=torch.randn(10), sample_weight=torch.ones(3)), "sample_weight"),
        (dict(x=torch.randn(10), codebook_dtype="int4"), "codebook_dtype"),
        (dict(x=torch.randn(10, device="meta")), "meta"),
    ],
)
def test_bad_inputs_give_clear_errors(kwargs, match):
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        cluster_tensor(x, **kwargs)


def test_zero_weight_codebook_falls_back_to_uniform():
    x = torch.randn(2, 50)
    w = torch.ones(2, 50)
    w[1] = 0
    ct = cluster_tensor(x, 4, granularity="channel", method="exact", sample_weight=w)
    ref = cluster_tensor(x[1:], 4, granularity="channel", method="exact")
    assert torch.allclose(ct.codebook[1], ref.codebook[0])


def test_large_fp32_tensor_uses_reduction_then_polish():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    ex = cluster_tensor(x, 16, method="exact")
    km = cluster_tensor(x, 16, method="kmeans", init="density")
    assert ex.mse <= km.mse * (1 + 1e-6)


@pytest.mark.parametrize("method", ["exact", "kmeans"])
def test_row_batches_give_the_same_result(method, monkeypatch):
    """Codebooks are solved in batches of rows; the batching must not change them."""
    import wclust.core.codebook as codebook

    x = torch.randn(37, 40, generator=torch.Generator().manual_seed(0))
    sw = torch.rand(37, 40, generator=torch.Generator().manual_seed(1))
    kw = dict(bits=3, granularity="channel", method=method, init="linear", sample_weight=sw)
    one = cluster_tensor(x, **kw)
    monkeypatch.setattr(codebook, "CHUNK_ELEMENTS", 100)  # 2 rows per batch
    many = cluster_tensor(x, **kw)
    assert torch.equal(one.codebook, many.codebook) and torch.equal(one.codes, many.codes)
    assert many.mse == pytest.approx(one.mse, rel=1e-12)
