"""Vector codebooks (core.vector): layout, bits accounting, never worse than scalar."""

import math

import pytest
import torch

from wclust.core.cluster import cluster_tensor
from wclust.core.packing import packed_nbytes, unpack_codes
from wclust.core.quantizers import scaled_kmeans
from wclust.core.vector import (
    VectorClusteredTensor,
    cluster_vectors,
    product_codebook,
    vector_lloyd,
)


def _weights(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * (torch.rand(rows, 1, generator=g) + 0.5)
    sw = torch.rand(rows, cols, generator=g) ** 2
    return x, sw


def _err(x, xh, sw):
    return float(((xh.double() - x.double()) ** 2 * sw.double()).sum() / sw.double().sum())


def test_cluster_dim_1_is_the_scalar_path():
    x, sw = _weights()
    a = cluster_tensor(x, bits=3, sample_weight=sw, granularity="channel")
    b = cluster_tensor(x, bits=3, sample_weight=sw, granularity="channel", cluster_dim=1)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)
    with pytest.raises(TypeError, match="vector codebooks"):
        cluster_tensor(x, bits=3, scale_group_size=64)


@pytest.mark.parametrize(
    "d,bits,granularity,group_size",
    [(2, 2, "tensor", None), (2, 3, "tensor", None), (4, 1, "tensor", None),
     (2, 2, "channel", None), (2, 2, "group", 16 * 128), (8, 1, "group", 32 * 128)],
)  # fmt: skip
def test_product_init_never_worse_than_the_scalar_codebook(d, bits, granularity, group_size):
    x, sw = _weights()
    kw = {"granularity": granularity, "group_size": group_size, "sample_weight": sw}
    vec = cluster_tensor(x, bits=bits, cluster_dim=d, **kw)
    if group_size:  # codebooks over whole rows: the scalar ones, one per row of this view
        n = x.numel() // group_size
        kw = {"granularity": "channel", "sample_weight": sw.reshape(n, -1)}
        scalar = cluster_tensor(x.reshape(n, -1), bits=bits, method="exact", **kw)
    else:
        scalar = cluster_tensor(x, bits=bits, method="exact", **kw)
    assert isinstance(vec, VectorClusteredTensor)
    e_s, e_v = _err(x, scalar.dequantize().reshape(x.shape), sw), _err(x, vec.dequantize(), sw)
    assert vec.mse == pytest.approx(e_v, rel=1e-6)
    assert e_v <= e_s * (1 + 1e-9)
    assert e_v < 0.97 * e_s  # Lloyd in d dimensions finds a better codebook here
    assert vec.n_clusters == 1 << (bits * d) and vec.n_codebooks == scalar.n_codebooks


@pytest.mark.parametrize("scalar", ["exact", "lloyd", "fit"])
def test_scaled_groups_never_worse_than_scaled_kmeans(scalar):
    x, sw = _weights(seed=1)
    ref = scaled_kmeans(
        x, 3, 64, sw, method="exact" if scalar == "exact" else "lloyd", fit_scale=scalar == "fit"
    )
    vec = cluster_vectors(
        x, bits=3, cluster_dim=2, scale_group_size=64, scalar=scalar, sample_weight=sw
    )
    e_s, e_v = _err(x, ref.dequantize(), sw), _err(x, vec.dequantize(), sw)
    assert e_v <= e_s * (1 + 1e-9) and e_v < 0.97 * e_s
    assert torch.equal(vec.scale, ref.scale)  # the same scales the scalar codebook used
    assert vec.scale.dtype == torch.float16


def test_importance_weights_steer_the_codebook():
    x, _ = _weights(seed=2)
    x[:8] *= 0.1  # small rows, which the unweighted codebook mostly ignores
    w = torch.ones_like(x)
    w[:8] = 1000.0  # ... but they matter most
    plain = cluster_vectors(x, bits=2, cluster_dim=2)
    weighted = cluster_vectors(x, bits=2, cluster_dim=2, sample_weight=w)
    first = lambda t: ((t.dequantize()[:8] - x[:8]) ** 2).mean()  # noqa: E731
    assert first(weighted) < 0.5 * first(plain)


def test_vectors_are_d_consecutive_weights_and_codes_index_the_codebook():
    x, _ = _weights(rows=16, cols=32)
    vec = cluster_vectors(x, bits=2, cluster_dim=4, granularity="channel")
    assert vec.codes.shape == (16 * 32 // 4,) and vec.codes.dtype == torch.int32
    assert vec.codebook.shape == (16, 256, 4)
    rows = vec.dequantize().reshape(16, 8, 4)  # (out, in / d, d)
    codes = vec.codes.view(16, 8).long()
    for r in (0, 7, 15):
        assert torch.equal(rows[r], vec.codebook[r][codes[r]])
    # a codebook never holds more than k distinct vectors
    assert torch.unique(rows.reshape(-1, 4), dim=0).shape[0] <= 16 * 256


def test_structure_off_the_grid_is_captured_exactly():
    """Pairs (a, a): 4 points on a diagonal, which no 2-value scalar grid can reach."""
    a = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    g = torch.Generator().manual_seed(0)
    x = a[torch.randint(0, 4, (32, 8), generator=g)].repeat_interleave(2, 1)
    vec = cluster_vectors(x, bits=1, cluster_dim=2)
    assert vec.mse == 0.0 and torch.equal(vec.dequantize(), x)
    assert cluster_tensor(x, bits=1, method="exact").mse > 0.5


def test_bits_count_everything():
    x, sw = _weights()
    vec = cluster_vectors(x, bits=3, cluster_dim=2, scale_group_size=64, codebook_dtype="float16")
    codes = packed_nbytes(x.numel() // 2, 6)
    codebook = 64 * 2 * 2  # 64 centroids of 2 float16
    scales = 2 * x.numel() // 64
    assert vec.nbytes == codes + codebook + scales
    assert vec.bits_per_weight == pytest.approx(8 * (codes + codebook + scales) / x.numel())
    assert torch.equal(unpack_codes(vec.packed_codes(), 6, x.numel() // 2), vec.codes)
    int8 = cluster_vectors(x, bits=2, cluster_dim=2, granularity="channel", codebook_dtype="int8")
    assert int8.nbytes == packed_nbytes(x.numel() // 2, 4) + 64 * 16 * 2 + 4 * 64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_codebook_dtypes_are_stored_exactly(dtype):
    x, sw = _weights(seed=3)
    vec = cluster_vectors(x, bits=2, cluster_dim=2, sample_weight=sw, codebook_dtype=dtype)
    cb = vec.codebook
    if dtype == "int8":
        back = vec.codebook_int8.float() * vec.codebook_scale[:, None, None]
        assert torch.equal(back, cb)
    else:
        assert torch.equal(cb.to(getattr(torch, dtype)).float(), cb)
    f32 = cluster_vectors(x, bits=2, cluster_dim=2, sample_weight=sw)
    assert vec.mse <= f32.mse * 1.05  # rounding the centroids costs little
    scalar = cluster_tensor(x, bits=2, sample_weight=sw, method="exact", codebook_dtype=dtype)
    assert vec.mse <= scalar.mse


def test_product_codebook_and_lloyd_never_raise_the_error():
    cb1 = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    prod = product_codebook(cb1, 2)
    assert prod.shape == (1, 9, 2)
    assert {tuple(p) for p in prod[0].tolist()} == {
        (a, b) for a in (-1, 0.5, 2) for b in (-1, 0.5, 2)
    }
    x, sw = _weights(rows=8, cols=64, seed=4)
    v, w = x.reshape(1, -1, 2), sw.reshape(1, -1, 2)
    start = product_codebook(cb1, 2)

    def err(c):
        d = (v[:, :, None, :].double() - c[:, None].double()) ** 2 * w[:, :, None].double()
        return float(d.sum(3).min(2).values.sum())

    cents, codes = vector_lloyd(v, w, start, max_iter=20)
    assert err(cents) <= err(start)
    assert err(cents) < 0.9 * err(start)


def test_random_init_and_any_number_of_clusters():
    x, sw = _weights(seed=5)
    vec = cluster_vectors(x, n_clusters=100, cluster_dim=2, init="random", sample_weight=sw)
    assert vec.code_bits == 7 and vec.codebook.shape == (1, 100, 2)
    assert vec.mse < 0.1 * float((x.double() ** 2 * sw).sum() / sw.sum())


def test_bad_input_gets_clear_errors():
    x, _ = _weights(rows=4, cols=6)
    with pytest.raises(ValueError, match="cluster_dim must be one of 2, 4, 8"):
        cluster_vectors(x, bits=2, cluster_dim=3)
    with pytest.raises(ValueError, match="does not divide the 6 weights per row"):
        cluster_vectors(x, bits=2, cluster_dim=4)
    with pytest.raises(ValueError, match="bits \\* cluster_dim <= 16"):
        cluster_vectors(x, bits=3, cluster_dim=8)
    with pytest.raises(ValueError, match="init='product' needs n_clusters = m\\*\\*2"):
        cluster_vectors(x, n_clusters=10, cluster_dim=2)
    with pytest.raises(ValueError, match="not a multiple of cluster_dim"):
        cluster_vectors(x, bits=1, cluster_dim=2, granularity="group", group_size=3)
    with pytest.raises(ValueError, match="scale_group_size=5"):
        cluster_vectors(x, bits=1, cluster_dim=2, scale_group_size=5)
    with pytest.raises(ValueError, match="keep_zeros works with scalar"):
        cluster_tensor(x, bits=1, cluster_dim=2, keep_zeros=True)
    with pytest.raises(ValueError, match="NaN"):
        cluster_vectors(torch.full((2, 4), math.nan), bits=1, cluster_dim=2)


@pytest.mark.parametrize("scalar", ["exact", "fit"])
def test_groups_of_zeros_stay_zero(scalar):
    """A zero row (an embedding padding token): no 0/0 in the float16 scales."""
    x, _ = _weights(rows=8, cols=64)
    x[3] = 0.0
    vec = cluster_vectors(x, bits=2, cluster_dim=2, scale_group_size=32, scalar=scalar)
    assert torch.isfinite(vec.dequantize()).all()
    assert vec.dequantize()[3].abs().max() < 1e-4  # at most a centroid times the floor scale
    assert torch.isfinite(scaled_kmeans(x, 2, 32).dequantize()).all()
