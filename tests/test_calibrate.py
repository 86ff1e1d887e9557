import pytest
import torch

import wclust
from tests.conftest import tiny_gpt2
from wclust.stages.calibrate import calibrate


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 200, (1, 12), generator=g) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


def test_fisher_is_mean_squared_gradient():
    m = tiny_gpt2()
    b = _batches(2)
    imp = calibrate(m, b, kind="fisher")
    assert all(p.grad is None for p in m.parameters())  # leaves no gradients behind
    w = m.transformer.h[0].mlp.c_fc.weight
    ref = torch.zeros_like(w)
    for batch in b:
        m.zero_grad()
        m(**batch).loss.backward()
        ref += w.grad**2
    assert torch.allclose(imp["transformer.h.0.mlp.c_fc"], ref / 2, rtol=1e-4, atol=1e-12)
    assert "lm_head" not in imp and "transformer.wte" in imp  # tied: keyed by first owner


def test_activation_importance_is_input_second_moment():
    lin = torch.nn.Linear(8, 4)
    m = torch.nn.Sequential(lin)
    x = torch.randn(5, 8)
    imp = calibrate(m, [{"input": x}], kind="activation")
    assert torch.allclose(imp["0"], (x**2).mean(0)[None, :].expand(4, 8))


def test_fisher_weighting_lowers_weighted_error():
    m = tiny_gpt2()
    imp = calibrate(m, _batches(), kind="fisher")
    cfg = wclust.ClusterConfig(bits=3)
    plain = wclust.compress_(tiny_gpt2(), cfg)
    weighted = wclust.compress_(m, cfg, sample_weights=imp)
    name = "transformer.h.0.mlp.c_fc"
    # the weighted run reports the importance-weighted MSE, which it minimizes
    w_err = {r.name: r.mse for r in weighted.layers}[name]
    ref = tiny_gpt2().transformer.h[0].mlp.c_fc.weight.detach()
    deq_plain = wclust.cluster_tensor(
        ref.t().contiguous(), bits=3, granularity="channel", method="exact"
    ).dequantize()
    sw = imp[name].t()
    plain_weighted = float((((deq_plain - ref.t()) ** 2) * sw).sum() / sw.sum())
    assert w_err <= plain_weighted * (1 + 1e-6)
    assert plain.layers  # both ran


def test_outliers_are_kept_exactly_and_counted():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 64))
    with torch.no_grad():
        m[0].weight[3, 5] = 4.0
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=3, outliers=0.01))
    cw = m[0].clustered
    assert cw.outlier_idx.numel() == int(0.01 * 256 * 64)
    assert m[0].weight[3, 5].item() == 4.0
    assert rep.layers[0].bytes_after == cw.nbytes
    assert cw.nbytes >= 256 * 64 * 3 // 8 + cw.outlier_idx.numel() * 6
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert torch.allclose(
            m[0](x), torch.nn.functional.linear(x, m[0].weight, m[0].bias), atol=1e-5
        )


@pytest.mark.parametrize("bad", [{"outliers": 0.6}, {"outliers": 0.01, "method": "nf4"}])
def test_outlier_config_errors(bad):
    with pytest.raises(wclust.ConfigError, match="outliers"):
        wclust.ClusterConfig(**bad)


# A per-layer recipe (JSON form): groups of 64 in Whisper's encoder, 128 elsewhere,
# positional tables at 6 bits (the recipe old results call fit-4b-enc64-g128-fisher).
ENC64 = {
    "quantizer": {"kind": "scaled", "group_size": 128, "fit": "fit"},
    "exclude": [],
    "overrides": {
        "model.encoder.layers.*": {"group_size": 64},
        "model.encoder.conv*": {"group_size": 64},
        "*embed_positions*": {"bits": 6, "group_size": 64},
    },
}


def test_encoder_first_recipe_plans_groups_and_positional_bits():
    # nothing silently skipped
    from tests.conftest import tiny_whisper

    m = tiny_whisper()
    report = wclust.compress_(m, ENC64)
    layers = {e.name: e for e in report.layers}
    assert layers["model.encoder.layers.0.fc1"].group_size == 64
    assert layers["model.encoder.conv2"].group_size == 64
    assert layers["model.decoder.layers.1.encoder_attn.q_proj"].group_size == 128
    assert layers["model.encoder.embed_positions"].bits == 6
    assert layers["model.decoder.embed_positions"].bits == 6
    assert all(e.method == "scaled-fit" for e in report.clustered)
    assert not [e for e in report.layers if e.status != "clustered"]


def test_encoder_five_decoder_three_bit_recipe_plans_bits_per_group():
    # 5-bit encoder, 3-bit decoder self-attention and MLP, 4-bit cross-attention and
    # embedding, 6-bit positional tables (old results: fit-enc5g64-dec3g128-fisher).
    from tests.conftest import tiny_whisper

    recipe = {
        **ENC64,
        "overrides": {
            "model.encoder.layers.*": {"bits": 5, "group_size": 64},
            "model.encoder.conv*": {"bits": 5, "group_size": 64},
            "model.decoder.layers.*.self_attn.*": {"bits": 3, "group_size": 128},
            "model.decoder.layers.*.fc*": {"bits": 3, "group_size": 128},
            "*embed_positions*": {"bits": 6, "group_size": 64},
        },
    }
    report = wclust.compress_(tiny_whisper(), recipe)
    layers = {e.name: (e.bits, e.group_size) for e in report.layers}
    assert layers["model.encoder.layers.0.fc1"] == (5, 64)
    assert layers["model.encoder.conv1"] == (5, 64)
    assert layers["model.decoder.layers.1.self_attn.v_proj"] == (3, 128)
    assert layers["model.decoder.layers.0.fc2"] == (3, 128)
    assert layers["model.decoder.layers.0.encoder_attn.k_proj"] == (4, 128)
    assert layers["model.decoder.embed_tokens"] == (4, 128)
    assert layers["model.decoder.embed_positions"] == (6, 64)
