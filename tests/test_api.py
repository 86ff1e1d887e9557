import pytest
import torch

import wclust
from tests.conftest import small_cnn, tiny_bert, tiny_gpt2, tiny_whisper
from wclust.nn import is_clustered


def _distinct_ok(model, k):
    for _, mod in model.named_modules():
        if is_clustered(mod):
            cw = mod.clustered
            w = (
                cw.dense().reshape(cw.n_codebooks, -1)
                if not cw.transpose
                else cw.dense().t().reshape(cw.n_codebooks, -1)
            )
            assert max(len(torch.unique(r)) for r in w) <= k


def test_compress_whisper_in_place_report_and_ties(whisper_inputs):
    m = tiny_whisper()
    with torch.no_grad():
        ref = m(**whisper_inputs).logits
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=4))
    names = {r.name: r for r in rep.layers}
    assert names["model.encoder.embed_positions"].status == "dense"
    assert "excluded" in names["model.encoder.embed_positions"].reason
    emb = names["model.decoder.embed_tokens"]
    assert emb.status == "clustered" and emb.shared_with == ["proj_out"]
    assert m.proj_out.clustered is m.model.decoder.embed_tokens.clustered
    for r in rep.clustered:
        assert r.distinct_values <= 16 and r.bits == 4 and 0 < r.rel_error < 0.05
        assert r.bytes_after < r.bytes_before
    with torch.no_grad():
        out = m(**whisper_inputs).logits
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()) < 0.3
    _distinct_ok(m, 16)


def test_memory_of_compressed_model_is_at_most_report():
    m = tiny_gpt2()
    before = wclust.model_nbytes(m)
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=2, codebook_dtype="float16"))
    assert wclust.model_nbytes(m) <= rep.bytes_after
    assert wclust.model_nbytes(m) < before / 2
    assert rep.bytes_before == before


def test_gpt2_conv1d_is_clustered_per_output_channel():
    m = tiny_gpt2()
    w = m.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (in, out)
    wclust.compress_(m, wclust.ClusterConfig(bits=2, granularity="channel"))
    cf = m.transformer.h[0].mlp.c_fc
    assert is_clustered(cf) and cf.clustered.transpose
    assert cf.weight.shape == w.shape
    for col in cf.weight.t():  # one codebook per output column
        assert len(torch.unique(col)) <= 4


def test_cnn_all_layer_types_and_overrides():
    m = small_cnn()
    x, tok = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    cfg = wclust.ClusterConfig(bits=4, overrides={"fc": {"bits": 2}, "head": {"skip": True}})
    rep = wclust.compress_(m, cfg)
    by = {r.name: r for r in rep.layers}
    for n in ("emb", "conv", "dw", "grouped", "conv1d"):
        assert by[n].status == "clustered", by[n]
    assert by["fc"].bits == 2 and by["head"].status == "dense"
    assert by["head"].reason == "skipped by override"
    assert torch.isfinite(m(x, tok)).all()


def test_include_exclude_globs_and_layer_types():
    m = tiny_bert()
    rep = wclust.compress_(m, wclust.ClusterConfig(include=["*attention*"], layer_types=["Linear"]))
    for r in rep.layers:
        if r.status == "clustered":
            assert "attention" in r.name and r.type == "Linear"
    assert any(r.reason == "not matched by include" for r in rep.layers)
    assert any("layer type Embedding" in r.reason for r in rep.layers)


def test_strip_gives_plain_modules_with_same_outputs(whisper_inputs):
    m = tiny_whisper()
    wclust.compress_(m, wclust.ClusterConfig(bits=3))
    d = wclust.strip(m)
    assert not any(is_clustered(x) for x in d.modules())
    assert d.proj_out.weight is d.model.decoder.embed_tokens.weight
    with torch.no_grad():  # the compressed model's few-row kernel sums in its own order
        a, b = m(**whisper_inputs).logits, d(**whisper_inputs).logits
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_parameters_are_reported_not_skipped_silently():
    m = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2), torch.nn.Linear(16, 4))
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=4))
    reasons = {r.name: r.reason for r in rep.layers}
    assert "unsupported layer type MultiheadAttention" in reasons["0.in_proj_weight"]
    assert rep.layers[0].status == "clustered"  # out_proj is a Linear (subclass)


def test_errors_nan_and_already_clustered():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        wclust.compress_(m, wclust.ClusterConfig())
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    wclust.compress_(m)
    with pytest.raises(ValueError, match="already clustered"):
        wclust.compress_(m)


def test_group_size_not_dividing_is_reported_per_layer():
    m = torch.nn.Sequential(torch.nn.Linear(96, 8), torch.nn.Linear(8, 8))
    rep = wclust.compress_(m, wclust.ClusterConfig(granularity="group", group_size=32))
    assert rep.layers[0].status == "clustered"
    assert rep.layers[1].status == "dense" and "does not divide" in rep.layers[1].reason


def test_cache_option_trades_memory_for_speed():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    wclust.compress_(m)
    cw = m[0].clustered
    x = torch.randn(3, 64)
    y0 = m(x)
    assert cw._dense is None  # the few-row kernel ran on the packed codes
    cw.set_cache(True)
    assert torch.allclose(m(x), y0, atol=1e-5) and cw._dense is not None
    cw.set_cache(False)
    assert cw._dense is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=0), "bits"),
        (dict(granularity="group"), "group_size"),
        (dict(method="fast"), "method"),
        (dict(layer_types=["LSTM"]), "not supported"),
        (dict(overrides={"fc": {"bitz": 3}}), "unknown field"),
        (dict(overrides={"fc": {"bits": 12}}), "override 'fc'"),
        (dict(min_numel=-1), "min_numel"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(wclust.ConfigError, match=match):
        wclust.ClusterConfig(**kwargs)


def test_config_round_trip_and_newer_version():
    cfg = wclust.ClusterConfig(bits=3, overrides={"a*": {"bits": 8}}, exclude=["x"])
    assert wclust.ClusterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(wclust.ConfigError, match="newer"):
        wclust.ClusterConfig.from_dict({**cfg.to_dict(), "version": 99})
    assert cfg.for_layer("abc")["bits"] == 8 and cfg.for_layer("b")["bits"] == 3
