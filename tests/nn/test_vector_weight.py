"""VectorWeight (nn/vector.py) and vector codebooks through compress_, config, training."""

import copy

import pytest
import torch
from torch import nn

import wclust
from wclust.config import ClusterConfig, ConfigError
from wclust.core.vector import cluster_vectors
from wclust.nn.vector import VectorWeight

LAYOUTS = {
    "tensor": {},
    "channel": {"granularity": "channel"},
    "rows": {"granularity": "group", "group_size": 8 * 64},  # 8 output rows per codebook
    "scaled": {"scale_group_size": 32},
    "int8": {"granularity": "channel", "codebook_dtype": "int8"},
}


def _weight(out=32, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [2, 4])
def test_dense_rows_and_matvec_agree_with_the_clustered_tensor(layout, d):
    x = _weight()
    vc = cluster_vectors(x, bits=2, cluster_dim=d, **LAYOUTS[layout])
    vw = VectorWeight.from_clustered(vc)
    dense = vw.dense()
    assert torch.equal(dense, vc.dequantize())
    idx = torch.tensor([0, 31, 5, 5])
    assert torch.equal(vw.rows(idx), dense[idx])
    v = torch.randn(64)
    assert vw.lut_ok()
    torch.testing.assert_close(vw.matvec(v), dense @ v, rtol=1e-5, atol=1e-5)
    assert vw.nbytes == vc.nbytes  # the same bytes the bits accounting counts


def test_linear_at_batch_1_takes_the_table_matvec(monkeypatch):
    """Without the compiled operator: one row through the torch-op table."""
    from wclust.kernels import ops

    monkeypatch.setattr(ops, "_AVAILABLE", False)
    lin = nn.Linear(64, 32)
    cfg = ClusterConfig(bits=3, cluster_dim=2, method="scaled-exact", group_size=32)
    model = nn.Sequential(lin)
    wclust.compress_(model, cfg)
    cw = model[0].clustered
    assert isinstance(cw, VectorWeight) and cw.cluster_dim == 2 and cw.bits == 6
    x = torch.randn(1, 64)
    calls = []
    real = VectorWeight.matvec
    monkeypatch.setattr(VectorWeight, "matvec", lambda s, *a: calls.append(1) or real(s, *a))
    with torch.no_grad():
        y = model(x)
        ref = torch.nn.functional.linear(x, cw.dense(), model[0].bias)
    assert calls and torch.allclose(y, ref, atol=1e-5)
    with torch.no_grad():
        y4 = model(torch.cat([x] * 4))  # larger batches: the dense weight
    assert len(calls) == 1 and torch.allclose(y4[0], y[0], atol=1e-5)


VQ_CASES = [
    dict(bits=2, cluster_dim=2, granularity="tensor"),  # K = 16
    dict(bits=4, cluster_dim=2, granularity="tensor"),  # K = 256, byte codes
    dict(bits=3, cluster_dim=4, granularity="tensor"),  # K = 4096, 16-bit codes
    dict(bits=3, cluster_dim=2, scale_group_size=32),  # scaled groups of 16 codes
]


@pytest.mark.parametrize("case", VQ_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_vector_linear_matches_the_dense_weight(case, compiled, monkeypatch):
    """Up to 8 rows through ``kernels.ops.vq_linear`` (compiled, or its torch-op
    fallback), bias included; more rows through the dense weight. AVX2 rounds the
    tables of tiles of up to 64 centroids to int16: there the outputs are within 1e-3
    of their norm (about 3e-4 measured) instead of float rounding."""
    from wclust.kernels import ops

    if compiled and not ops.available():
        pytest.skip("compiled kernels not built")
    if not compiled:
        monkeypatch.setattr(ops, "_AVAILABLE", False)
    w = _weight(48, 128, seed=3)
    vc = cluster_vectors(w, **case)
    vw = VectorWeight.from_clustered(vc)
    assert vw._compiled_args() is not None or not compiled
    dense = vw.dense()
    bias = torch.randn(48)
    calls = []
    real = ops.vq_linear
    monkeypatch.setattr(ops, "vq_linear", lambda *a: calls.append(1) or real(*a))
    int16 = compiled and ops.isa() == "avx2" and vw.codebook.shape[-2] <= 64
    for n in (1, 3, 8, 9):
        x = torch.randn(n, 128)
        with torch.no_grad():
            y = vw.linear(x, bias)
        want = x @ dense.t() + bias
        if int16 and n <= 8:
            assert 1e-6 < (y - want).norm() <= 1e-3 * want.norm()
        else:
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert len(calls) == (3 if compiled else 0)


def test_compiled_vector_linear_refuses_codes_past_the_codebook():
    from wclust.kernels import ops

    if not ops.available():
        pytest.skip("compiled kernels not built")
    vw = VectorWeight.from_clustered(cluster_vectors(_weight(), bits=2, cluster_dim=2))
    vw.codebook = vw.codebook[:, :10].contiguous()  # 10 of the 16 entries 4-bit codes hold
    codes = vw.codes().clone()
    codes[5] = 12
    from wclust.core.packing import pack_codes

    vw.set_packed(pack_codes(codes, vw.bits))
    with pytest.raises(ValueError, match="past the codebook"):
        vw.linear(torch.randn(1, 64))


def test_compress_reports_the_vector_codebooks_and_counts_their_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 128), nn.Linear(128, 64))
    ref = copy.deepcopy(model)
    rep = wclust.compress_(
        model,
        ClusterConfig(bits=2, cluster_dim=4, method="exact", granularity="tensor"),
    )
    for layer in rep.layers:
        assert layer.status == "clustered", layer.reason
        assert layer.cluster_dim == 4 and layer.bits == 8 and layer.n_clusters == 256
        assert 0 < layer.rel_error < 0.2
    cws = [m.clustered for m in model]
    assert sum(c.nbytes for c in cws) == sum(layer.bytes_after for layer in rep.layers)
    # nothing of the VectorWeight is counted twice as "other" tensors
    biases = sum(m.bias.numel() * 4 for m in ref if getattr(m, "bias", None) is not None)
    assert rep.other_bytes == biases
    with torch.no_grad():
        ids = torch.tensor([[3, 7]])
        assert torch.equal(model[0](ids), model[0].clustered.dense()[ids])


def test_vector_never_worse_than_scalar_through_compress():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 128))
    errs = {}
    for dim in (1, 2):
        m = copy.deepcopy(model)
        cfg = ClusterConfig(bits=3, cluster_dim=dim, method="scaled-fit", group_size=64)
        errs[dim] = wclust.compress_(m, cfg).layers[0].mse
    assert errs[2] < errs[1]


def test_config_validates_cluster_dim():
    with pytest.raises(ConfigError, match="cluster_dim must be 1, 2, 4 or 8"):
        ClusterConfig(cluster_dim=3)
    with pytest.raises(ConfigError, match="works with methods"):
        ClusterConfig(cluster_dim=2, method="nf4")
    with pytest.raises(ConfigError, match="keep_zeros and outliers need cluster_dim=1"):
        ClusterConfig(cluster_dim=2, keep_zeros=True)
    with pytest.raises(ConfigError, match="bits \\* cluster_dim <= 16"):
        ClusterConfig(cluster_dim=8, bits=3)
    with pytest.raises(ConfigError, match="override '\\*fc'.*cluster_dim"):
        ClusterConfig(overrides={"*fc": {"cluster_dim": 5}})
    cfg = ClusterConfig(bits=2, overrides={"1": {"cluster_dim": 2, "bits": 3}})
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    rep = wclust.compress_(model, cfg)
    assert [r.cluster_dim for r in rep.layers if r.status == "clustered"] == [None, 2]
    assert model[1].clustered.n_clusters == 64


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_finetune_trains_vector_codebooks_and_freezes_them_back(dtype):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    student = copy.deepcopy(teacher)
    cfg = ClusterConfig(
        bits=1, cluster_dim=2, granularity="tensor", method="exact", codebook_dtype=dtype
    )
    wclust.compress_(student, cfg)
    before = student[2].clustered.codebook_float().clone()
    data = [torch.randn(16, 32) for _ in range(8)]
    batches = [(x, teacher(x).detach()) for x in data]
    with torch.no_grad():
        err0 = sum(float(((student(x) - y) ** 2).mean()) for x, y in batches)
    out = wclust.finetune(
        student, batches, torch.nn.functional.mse_loss, epochs=5, lr=1e-2, train_dense=False
    )
    with torch.no_grad():
        err1 = sum(float(((student(x) - y) ** 2).mean()) for x, y in batches)
    assert err1 < 0.95 * err0 and out["steps"] == 40
    cw = student[2].clustered
    assert not isinstance(cw.codebook, nn.Parameter)
    assert cw.codebook.dtype == getattr(torch, dtype) and cw.codebook.dim() == 3
    assert (cw.codebook_scale is not None) == (dtype == "int8")
    assert not torch.equal(cw.codebook_float(), before)
    with pytest.raises(ValueError, match="scalar codebooks"):
        wclust.finetune(student, batches, torch.nn.functional.mse_loss, reassign_every=1)


def test_bad_weights_get_clear_errors():
    vc = cluster_vectors(_weight(), bits=2, cluster_dim=2)
    vw = VectorWeight.from_clustered(vc)
    with pytest.raises(ValueError, match="packed codes do not match"):
        VectorWeight(vw.packed[:-1], vw.codebook, None, vw.shape, vw.bits, 2)
    with pytest.raises(ValueError, match="a vector codebook is"):
        VectorWeight(vw.packed, vw.codebook[..., :1], None, vw.shape, vw.bits, 2)
    with pytest.raises(ValueError, match="int8 codebook needs its scales"):
        VectorWeight(vw.packed, vw.codebook.to(torch.int8), None, vw.shape, vw.bits, 2)


def test_row_split_parts_may_be_vector_codebooks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(96, 32))
    cfg = ClusterConfig(
        bits=2,
        method="scaled-exact",
        group_size=32,
        overrides={"0": {"row_split": [{"until": 32, "cluster_dim": 2, "bits": 3}]}},
    )
    rep = wclust.compress_(model, cfg)
    assert rep.layers[0].status == "clustered", rep.layers[0].reason
    cw = model[0].clustered
    first, rest = cw.parts
    assert isinstance(first, VectorWeight) and first.bits == 6
    assert not isinstance(rest, VectorWeight) and rest.bits == 2
    ids = torch.tensor([[0, 40, 31, 95]])
    with torch.no_grad():
        assert torch.equal(model[0](ids), cw.dense()[ids])
    path = wclust.save(model, tmp_path / "rs.wclust", report=rep, config=cfg)
    back = wclust.load(path, model_factory=lambda: nn.Sequential(nn.Embedding(96, 32)))
    assert torch.equal(back[0].clustered.dense(), cw.dense())
