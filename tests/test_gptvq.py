"""Vector codebooks with GPTQ error feedback (GPTVQ): codes chosen d columns at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wclust
from tests.conftest import tiny_whisper, whisper_batches
from tests.test_gptq import correlated_inputs
from wclust.core.vector import cluster_vectors
from wclust.nn.vector import VectorWeight
from wclust.stages.gptq import collect_hessians, gptq_codes, gptq_refine_, gptvq_codes


def vector_grid(w, bits=3, gs=64):
    vc = cluster_vectors(w, cluster_dim=2, bits=bits, scale_group_size=gs, scalar="fit")
    s = vc.scale.float().repeat_interleave(gs).view(w.shape)
    return vc, s


def test_gptvq_with_a_diagonal_hessian_takes_the_nearest_centroid():
    """Without correlated inputs there is no error to pass on: each pair takes the
    centroid nearest in the metric of its two inputs' energies."""
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    energy = torch.linspace(0.5, 4.0, 128)
    vc, s = vector_grid(w)
    cb = vc.codebook[0].float()
    codes = gptvq_codes(w, torch.diag(energy), cb, vc.scale, 64, damp=1e-9)
    pairs = (w / s).view(48, 64, 1, 2)
    sp = s.view(48, 64, 1, 2)
    e = energy.view(1, 64, 1, 2)
    brute = (((pairs - cb.view(1, 1, -1, 2)) * sp) ** 2 * e).sum(-1).argmin(-1)
    assert torch.equal(codes, brute)


def test_gptvq_lowers_the_output_error_below_nearest_and_scalar_gptq():
    """On correlated inputs GPTVQ's codes beat the nearest codes of the same vector
    grid, and scalar GPTQ at the same bits per weight."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = correlated_inputs() * torch.linspace(0.2, 3.0, 128)
    h = x.T @ x / x.shape[0]

    def out_err(wq):
        return float(((x @ wq.T - x @ w.T) ** 2).mean())

    vc, s = vector_grid(w)
    cb = vc.codebook[0].float()
    near = vc.dequantize()
    codes = gptvq_codes(w, h, cb, vc.scale, 64)
    assert codes.max() < cb.shape[0]
    # lazy updates per block of columns change the order of the sums, not the codes
    assert torch.equal(gptvq_codes(w, h, cb, vc.scale, 64, block=32), codes)
    vec = cb[codes].reshape(w.shape) * s
    sc = wclust.core.quantizers.scaled_kmeans(w, 3, 64, method="lloyd", fit_scale=True)
    ss = sc.scale.float().repeat_interleave(64).view(w.shape)
    scalar = sc.codebook[0][gptq_codes(w, h, sc.codebook[0], sc.scale, 64).long()] * ss
    assert out_err(vec) < 0.87 * out_err(near)
    assert out_err(vec) < 0.9 * out_err(scalar)
    with pytest.raises(ValueError, match="multiple of 2"):
        gptvq_codes(w, h, cb, vc.scale, 63)


def test_gptq_refine_with_cluster_dim_turns_layers_into_vectors_at_the_same_bits():
    """``gptq_refine_(cluster_dim=2)``: every scaled layer with a Hessian becomes a
    vector codebook of pairs with twice the code bits (the same bits per weight),
    its output error lower than scalar GPTQ's."""
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))

    batches = [{"input": correlated_inputs(64, 128, s)} for s in range(4)]
    x = torch.cat([b["input"] for b in batches])
    cfg = wclust.ClusterConfig(bits=3, group_size=64, method="scaled-fit", min_numel=1)
    errs = {}
    for dim in (1, 2):
        model = build()
        ref = model[0](x).detach()
        h = collect_hessians(model, batches)
        originals = {n: m.weight.detach().clone() for n, m in model.named_children() if n != "1"}
        wclust.compress_(model, cfg)
        done = gptq_refine_(model, h, originals, cluster_dim=dim)
        assert set(done) == {"0", "2"}
        with torch.no_grad():
            errs[dim] = float(((model[0](x) - ref) ** 2).mean())
    for layer in (model[0], model[2]):
        cw = layer.clustered
        assert isinstance(cw, VectorWeight)
        assert (cw.cluster_dim, cw.bits, cw.n_clusters) == (2, 6, 64)
        assert cw.codebook.dtype == torch.float16
    assert errs[2] < 0.98 * errs[1]


def test_gptvq_file_round_trip(tmp_path):
    """A model with GPTVQ codes saves and loads to the same outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [{"input": correlated_inputs(64, 128, s)} for s in range(4)]
    x = torch.cat([b["input"] for b in batches])
    h = collect_hessians(model, batches)
    originals = {n: m.weight.detach().clone() for n, m in model.named_children() if n != "1"}
    cfg = wclust.ClusterConfig(bits=3, group_size=64, method="scaled-fit", min_numel=1)
    wclust.compress_(model, cfg)
    gptq_refine_(model, h, originals, cluster_dim=2)
    path = tmp_path / "m.wclust"
    wclust.save(model, str(path))
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    loaded = wclust.load(str(path), model_factory=lambda: fresh)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_recipe_gptq_dim_vectorizes_within_the_budget():
    """``+gptq:dim=2`` in a budget recipe: the layers GPTQ reaches become pairs
    ("+gptvq" in the report, code width twice the scalar one), the tied token table
    stays scalar, and the whole model stays within the budget's bits."""
    from wclust.recipes import get_recipe

    spec = "scaled:fit=fit+exclude:none+fisher:items=2+budget:3.8,candidates=2x32|3x32+gptq:items=2,dim=2"
    r = get_recipe(spec)
    assert r.gptq.dim == 2 and get_recipe(r.spec()) == r
    report = wclust.compress_(tiny_whisper(), r, whisper_batches(2))
    rows = {e.name: e for e in report.layers}
    fc1 = rows["model.encoder.layers.0.fc1"]
    assert fc1.method.endswith("+gptvq") and fc1.cluster_dim == 2 and fc1.bits in (4, 6)
    assert 2**fc1.bits >= fc1.distinct_values > 2 ** (fc1.bits // 2)  # pairs, not scalars
    table = rows["model.decoder.embed_tokens"]
    assert table.method.endswith("+gptq") and not table.cluster_dim
    assert 3.5 < report.bits_per_weight <= 3.8
    for bad in ("dim=3", "dim=1.5", "dim=true"):
        with pytest.raises(wclust.ConfigError, match="gptq dim"):
            get_recipe(f"scaled+gptq:{bad}")


def test_vectorize_makes_at_most_256_centroids():
    """Quads take 2-bit layers (256 centroids) and leave 3-bit ones scalar (4096)."""
    from wclust.nn.modules import ClusteredWeight
    from wclust.stages.gptq import vectorize_

    batches = [{"input": correlated_inputs(64, 128, s)} for s in range(2)]
    for bits, kind in ((2, VectorWeight), (3, ClusteredWeight)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 64))
        h = collect_hessians(model, batches)
        originals = {"0": model[0].weight.detach().clone()}
        cfg = wclust.ClusterConfig(bits=bits, group_size=64, method="scaled-fit", min_numel=1)
        wclust.compress_(model, cfg)
        vectorize_(model, h, originals, cluster_dim=4)
        assert type(model[0].clustered) is kind
        assert model[0].clustered.n_clusters == 2 ** (bits * (4 if kind is VectorWeight else 1))
