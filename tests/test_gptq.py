"""GPTQ error feedback on a codebook grid lowers the layer's output error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wclust
from tests.conftest import tiny_whisper, whisper_batches
from wclust.stages.gptq import (
    collect_hessians,
    gptq_codes,
    gptq_refine_,
    refit_codebook,
    refit_scales,
)


def correlated_inputs(n=512, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


def test_gptq_codes_lower_the_output_error_of_the_same_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = correlated_inputs()
    h = x.T @ x / x.shape[0]
    sc = wclust.core.quantizers.scaled_kmeans(w, 3, 64, method="lloyd")
    table, scale = sc.codebook[0], sc.scale
    near = sc.codes.long()
    gp = gptq_codes(w, h, table, scale, 64).long()
    s = scale.float().repeat_interleave(64).view(w.shape)

    def out_err(codes):
        return float(((x @ (table[codes] * s).T - x @ w.T) ** 2).mean())

    assert gp.max() < len(table)  # codes index the same table
    assert out_err(gp) < 0.8 * out_err(near)


def test_gptq_refine_on_a_model_only_changes_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [{"input": correlated_inputs(64, 128, s)} for s in range(4)]
    h = collect_hessians(model, batches)
    assert set(h) == {"0", "2"} and h["0"].shape == (128, 128)
    originals = {n: m.weight.detach().clone() for n, m in model.named_children() if n != "1"}
    cfg = wclust.ClusterConfig(bits=3, group_size=64, method="scaled-lloyd", min_numel=1)
    wclust.compress_(model, cfg)
    cb = model[0].clustered.codebook.clone()
    x = torch.cat([b["input"] for b in batches])
    ref = x @ originals["0"].T
    with torch.no_grad():
        before = float(((model[0](x) - model[0].bias - ref) ** 2).mean())
    done = gptq_refine_(model, h, originals)
    assert set(done) == {"0", "2"}
    with torch.no_grad():
        after = float(((model[0](x) - model[0].bias - ref) ** 2).mean())
    assert after < before
    assert torch.equal(model[0].clustered.codebook, cb)
    assert done["0"][1] >= done["0"][0] * 0.99  # weight error is traded for output error


def test_gptq_on_gpt2_conv1d_and_tied_head():
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 200, (1, 24), generator=g)} for _ in range(4)]
    h = collect_hessians(model, batches)
    assert "transformer.wte" in h and "lm_head" not in h  # tied: keyed by the first owner
    originals = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if n in h  # the stored weights, Conv1D as (in, out)
    }
    wclust.compress_(model, wclust.ClusterConfig(bits=3, group_size=16, method="scaled-lloyd"))
    name = "transformer.h.0.mlp.c_fc"
    cw = model.get_submodule(name).clustered
    w = originals[name].t()  # (out, in)

    def out_err():  # trace(E H E^T): the layer's mean squared output error
        e = cw.dense().t() - w
        return float(torch.einsum("oi,ij,oj->", e.double(), h[name].double(), e.double()))

    before = out_err()
    done = gptq_refine_(model, h, originals)
    assert name in done and "transformer.wte" in done
    assert out_err() < before
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_gptq_takes_its_own_count_of_items_beside_the_fisher_weights(monkeypatch):
    """``gptq:items=N``: the Hessians come from the first N items while the Fisher
    weights keep their own count (16 by default); without it both take the same."""
    import wclust.stages.calibrate as cal
    import wclust.stages.gptq as gq
    from wclust.recipes import get_recipe

    seen = {}
    real_cal, real_hess = cal.calibrate, gq.collect_hessians

    def spy_cal(model, batches, **kw):
        seen["fisher"] = len(batches)
        return real_cal(model, batches, **kw)

    def spy_hess(model, batches):
        seen["hessians"] = len(batches)
        return real_hess(model, batches)

    monkeypatch.setattr(cal, "calibrate", spy_cal)
    monkeypatch.setattr(gq, "collect_hessians", spy_hess)
    spec = "scaled:bits=3,group_size=32+exclude:none+fisher:items=3+gptq:items=7"
    recipe = get_recipe(spec)
    assert recipe.data_items == 7
    report = wclust.compress_(tiny_whisper(), recipe, whisper_batches(9))
    assert seen == {"fisher": 3, "hessians": 7}
    assert any(e.method.endswith("+gptq") for e in report.layers)
    seen.clear()
    wclust.compress_(
        tiny_whisper(), get_recipe("scaled:bits=3,group_size=32+fisher+gptq"), whisper_batches(20)
    )
    assert seen == {"fisher": 16, "hessians": 16}
    seen.clear()
    spec = "scaled:bits=3,group_size=32+exclude:none+fisher:items=6+gptq:items=2"
    wclust.compress_(tiny_whisper(), get_recipe(spec), whisper_batches(9))
    assert seen == {"fisher": 6, "hessians": 2}
    # distilling: GPTQ's own count beside the distillation's
    seen.clear()
    spec = "scaled:bits=3,group_size=32+exclude:none+fisher+gptq:items=7+distill:epochs=1,items=4"
    report = wclust.compress_(tiny_whisper(), get_recipe(spec), whisper_batches(9))
    assert seen == {"fisher": 4, "hessians": 7}
    assert report.distill["items"] + report.distill["held_out"] == 4
    # how many items each recipe reads (the command line and compare load that many)
    assert get_recipe("scaled+fisher:items=32+gptq:items=8").data_items == 32
    assert get_recipe("nf4+gptq").data_items == 16
    assert get_recipe("scaled+fisher+distill").data_items is None
    assert get_recipe("scaled+gptq:items=300+distill:items=100").data_items == 300
    assert get_recipe("scaled+gptq:items=50+distill:items=100").data_items == 100
    with pytest.raises(wclust.ConfigError, match="gptq items"):
        get_recipe("scaled+gptq:items=0")


def test_gptq_refines_each_row_range_of_a_split_weight():
    """A token table split in row ranges (own widths, codebooks and scales) gets GPTQ
    codes part by part, each on its own grid, and the layer's output error falls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 300, bias=False))
    batches = [{"input": correlated_inputs(64, 128, s)} for s in range(4)]
    h = collect_hessians(model, batches)
    w = model[0].weight.detach().clone()
    split = {"row_split": [{"until": 100, "bits": 4}, {"until": 200}]}
    cfg = wclust.ClusterConfig(
        bits=3, group_size=64, method="scaled-lloyd", min_numel=1, overrides={"0": split}
    )
    wclust.compress_(model, cfg)
    cw = model[0].clustered
    assert [p.bits for p in cw.parts] == [4, 3, 3]
    books = [p.codebook.clone() for p in cw.parts]
    x = torch.cat([b["input"] for b in batches])

    def part_errors():
        e = (x @ (cw.dense() - w).T) ** 2  # (rows of x, 300)
        return [float(e[:, a:b].mean()) for a, b in ((0, 100), (100, 200), (200, 300))]

    before = part_errors()
    done = gptq_refine_(model, h, {"0": w})
    after = part_errors()
    assert set(done) == {"0"}
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(torch.equal(p.codebook, c) for p, c in zip(cw.parts, books, strict=True))


def test_gptq_act_order_keeps_the_grid_and_the_gain():
    """``act_order`` rounds columns by decreasing Hessian diagonal: the codes index
    the same table and groups, and beat nearest rounding on the layer's outputs."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = correlated_inputs() * torch.linspace(0.2, 3.0, 128)  # unequal input energies
    h = x.T @ x / x.shape[0]
    sc = wclust.core.quantizers.scaled_kmeans(w, 3, 64, method="lloyd")
    table, scale = sc.codebook[0], sc.scale
    s = scale.float().repeat_interleave(64).view(w.shape)

    def out_err(codes):
        return float(((x @ (table[codes.long()] * s).T - x @ w.T) ** 2).mean())

    plain = gptq_codes(w, h, table, scale, 64)
    ordered = gptq_codes(w, h, table, scale, 64, act_order=True)
    from wclust.recipes import get_recipe

    assert not torch.equal(plain, ordered)
    assert out_err(ordered) < 0.8 * out_err(sc.codes)
    # the same Hessian with its inputs renumbered gives the renumbered codes
    perm = torch.randperm(64)
    cols = torch.cat([perm, perm + 64])  # keeps each column in its scale group
    again = gptq_codes(w[:, cols], h[cols][:, cols], table, scale, 64, act_order=True)
    assert torch.equal(again, ordered[:, cols])
    with pytest.raises(wclust.ConfigError, match="act_order"):
        get_recipe("scaled+gptq:act_order=3")
    assert get_recipe("scaled+gptq").gptq.act_order is True  # the measured default
    assert get_recipe("scaled+gptq:act_order=false").gptq.act_order is False


def test_target_bits_with_gptq_items_runs_the_gptq_preset_and_the_token_table():
    """``--target-bits B --gptq-items N`` is ``budget-B-gptq`` with N items: Fisher
    on 16 items, Hessians from N; the row-split token table gets GPTQ codes too."""
    from wclust.recipes import get_recipe
    from wclust.recipes.flags import recipe_from_flags

    r = recipe_from_flags({"target_bits": 3.25, "gptq_items": 256})
    preset = get_recipe("budget-3.25-gptq")
    assert (r.gptq, r.budget, r.quantizer) == (preset.gptq, preset.budget, preset.quantizer)
    assert (r.calibration_items, r.data_items) == (16, 256)
    with pytest.raises(wclust.ConfigError, match="--gptq-items"):
        recipe_from_flags({"target_bits": 3.25, "gptq_items": 0})
    emb = "model.decoder.embed_tokens"
    r = recipe_from_flags(
        {
            "target_bits": 4.0,
            "group_size": 32,
            "gptq_items": 3,
            "calib_items": 3,
            "row_split": {emb: [100, 200]},
        }
    )
    report = wclust.compress_(tiny_whisper(), r, whisper_batches(3))
    methods = {e.name: e.method for e in report.layers}
    assert methods[emb].endswith("+gptq")
    assert methods["model.encoder.layers.0.fc1"].endswith("+gptq")


def test_gptq_says_which_clustered_weights_keep_their_nearest_codes():
    """Scale groups of 128 inputs fit the 128-wide fc2 inputs but span two rows of
    the 64-wide layers: those keep their nearest codes, and the stage's log line
    names them."""
    from wclust.recipes import get_recipe

    lines = []
    spec = "scaled:bits=3,group_size=128+exclude:none+gptq:items=2"
    report = wclust.compress_(
        tiny_whisper(), get_recipe(spec), whisper_batches(2), log=lines.append
    )
    methods = {e.name: e.method for e in report.layers}
    assert methods["model.encoder.layers.0.fc2"].endswith("+gptq")
    assert not methods["model.encoder.layers.0.fc1"].endswith("+gptq")
    (line,) = [x for x in lines if x.startswith("gptq:")]
    kept = line.split("nearest codes kept (no GPTQ grid): ")[1].rstrip(")").split(", ")
    assert "model.encoder.layers.0.fc1" in kept and "model.encoder.layers.0.fc2" not in kept


def test_refit_scales_solves_the_output_error_for_fixed_codes():
    """For fixed codes the re-fitted scales are the least-squares optimum of the
    layer's output error: better than the clustering's scales, and no small change
    of any one scale lowers it further."""
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    x = correlated_inputs() * torch.linspace(0.2, 3.0, 128)
    h = x.T @ x / x.shape[0]
    sc = wclust.core.quantizers.scaled_kmeans(w, 3, 32, method="lloyd")
    table = sc.codebook[0]
    codes = gptq_codes(w, h, table, sc.scale, 32)

    def out_err(scale):
        s = scale.reshape(32, 4).repeat_interleave(32, 1)
        return float(((x @ (table[codes.long()] * s).T - x @ w.T) ** 2).mean())

    new = refit_scales(w, h, codes, table, 32, damp=0.0)
    assert new.shape == (32, 4)
    assert out_err(new) < 0.95 * out_err(sc.scale.float())
    base = out_err(new)
    for i, j in [(0, 0), (5, 3), (31, 1)]:
        for step in (1e-3, -1e-3):
            moved = new.clone()
            moved[i, j] *= 1 + step
            assert out_err(moved) >= base * (1 - 1e-6)


def test_gptq_refine_with_refit_changes_scales_not_codebooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [
        {"input": correlated_inputs(64, 128, s) * torch.linspace(0.2, 3, 128)} for s in range(4)
    ]
    h = collect_hessians(model, batches)
    originals = {n: m.weight.detach().clone() for n, m in model.named_children() if n != "1"}
    cfg = wclust.ClusterConfig(bits=3, group_size=64, method="scaled-lloyd", min_numel=1)
    x = torch.cat([b["input"] for b in batches])
    ref = x @ originals["0"].T
    errs = []
    for refit in (0, 1, 2):
        m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
        m.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        wclust.compress_(m, cfg)
        cb, sc0 = m[0].clustered.codebook.clone(), m[0].clustered.group_scale.clone()
        gptq_refine_(m, h, originals, refit=refit)
        assert torch.equal(m[0].clustered.codebook, cb)
        assert torch.equal(m[0].clustered.group_scale, sc0) == (refit == 0)
        with torch.no_grad():
            errs.append(float(((m[0](x) - m[0].bias - ref) ** 2).mean()))
    assert errs[1] < 0.97 * errs[0] and errs[2] < errs[1]


def test_embed_damp_applies_only_to_a_weight_also_read_as_an_embedding():
    """A tied token table takes ``embed_damp``: a very large one leaves GPTQ nothing to
    feed back, so its codes stay nearest, while the other layers still move theirs."""
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 200, (1, 24), generator=g)} for _ in range(4)]
    h = collect_hessians(model, batches)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in h}
    wclust.compress_(model, wclust.ClusterConfig(bits=3, group_size=16, method="scaled-lloyd"))
    wte, fc = model.transformer.wte.clustered, model.get_submodule("transformer.h.0.mlp.c_fc")
    near_wte, near_fc = wte.codes().clone(), fc.clustered.codes().clone()
    gptq_refine_(model, h, originals, embed_damp=1e6)
    assert torch.equal(wte.codes(), near_wte)
    assert not torch.equal(fc.clustered.codes(), near_fc)
    gptq_refine_(model, h, originals)  # the usual damping moves the table's codes too
    assert not torch.equal(wte.codes(), near_wte)


def test_recipe_gptq_embed_damp_and_refit_reach_the_stage():
    """``gptq:embed_damp=,refit=``: a huge damping keeps the tied token table's
    nearest codes through the pipeline, and refit re-fits the other layers' scales."""
    from wclust.recipes import get_recipe

    base = "scaled:bits=3,group_size=32+exclude:none"

    def run(extra):
        model = tiny_whisper()
        wclust.compress_(model, get_recipe(base + extra), whisper_batches(6))
        table = model.model.decoder.embed_tokens.clustered
        fc = model.model.decoder.layers[0].fc1.clustered
        return table.codes().clone(), fc.group_scale.clone(), fc.codes().clone()

    near = run("")
    damped = run("+gptq:embed_damp=1e6")
    plain = run("+gptq:refit=0")
    refit = run("+gptq")  # one round of refit by default
    assert torch.equal(damped[0], near[0]) and not torch.equal(plain[0], near[0])
    assert not torch.equal(damped[2], near[2])  # the other layers still take GPTQ codes
    assert torch.equal(plain[1], near[1]) and not torch.equal(refit[1], plain[1])
    g = get_recipe("scaled+gptq").gptq
    assert (g.embed_damp, g.refit) == (0.1, 1)  # the measured defaults
    for bad in ("embed_damp=0", "embed_damp=true", "refit=-1", "refit=1.5"):
        with pytest.raises(wclust.ConfigError, match="gptq"):
            get_recipe(f"scaled+gptq:{bad}")


def test_cross_hessians_of_a_model_and_its_copy_are_its_hessians():
    import copy

    from wclust.stages.gptq import collect_cross_hessians, cross_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    batches = [{"input": correlated_inputs(40, 32, s)} for s in range(3)]
    h, c = collect_cross_hessians(model, copy.deepcopy(model), batches)
    ref = collect_hessians(model, batches)
    assert set(h) == set(c) == set(ref) == {"0", "2"}
    for n in ref:
        torch.testing.assert_close(h[n], ref[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[n], ref[n], rtol=1e-5, atol=1e-6)
    w = model[2].weight.detach()
    torch.testing.assert_close(cross_target(w, h["2"], c["2"], 0.01), w, rtol=1e-4, atol=1e-5)


def test_cross_target_makes_up_for_the_error_of_the_layers_before():
    # layer 0 coarsely clustered: layer 2 sees changed inputs. Rounding layer 2 toward
    # the original's output on the original's inputs (cross statistics) beats rounding
    # it toward its own weight on the same inputs, for the model's output.
    import copy

    from wclust.stages.gptq import collect_cross_hessians

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32))
    batches = [{"input": correlated_inputs(128, 64, s)} for s in range(4)]
    x = torch.cat([b["input"] for b in batches])
    cfg = wclust.ClusterConfig(bits=2, group_size=32, method="scaled-lloyd", min_numel=1)
    originals = {"2": reference[2].weight.detach().clone()}

    def out_err(cross: bool) -> float:
        model = copy.deepcopy(reference)
        wclust.compress_(model, cfg)
        h, c = collect_cross_hessians(model, reference, batches)
        gptq_refine_(model, h, originals, cross=c if cross else None)
        with torch.no_grad():
            return float(((model(x) - reference(x)) ** 2).mean())

    own, toward_original = out_err(False), out_err(True)
    assert toward_original < 0.8 * own


def test_hessians_of_a_clustered_model_are_those_of_its_decoded_weights():
    """``collect_hessians`` on a compressed model: every clustered Linear keeps its
    name, and its inputs are those the decoded weights before it produce."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    batches = [{"input": correlated_inputs(40, 64, s)} for s in range(3)]
    clustered = copy.deepcopy(model)
    cfg = wclust.ClusterConfig(bits=2, group_size=16, method="scaled-lloyd", min_numel=1)
    wclust.compress_(clustered, cfg)
    decoded = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 2):
            decoded[i].weight.copy_(clustered[i].clustered.dense())
    h, ref = collect_hessians(clustered, batches), collect_hessians(decoded, batches)
    assert set(h) == set(ref) == {"0", "2"}
    for n in ref:
        torch.testing.assert_close(h[n], ref[n], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(h["2"], collect_hessians(model, batches)["2"], rtol=1e-2)


def test_refit_codebook_solves_the_output_error_for_fixed_codes():
    """For fixed codes and scales the re-fitted centroids (scalar and pairs) are the
    least-squares optimum of the layer's output error, found from the normal
    equations written out densely, and a few steps already lower the error."""
    torch.manual_seed(0)
    out_f, in_f, gs = 8, 32, 16
    x = correlated_inputs(256, in_f)
    h = x.T @ x / x.shape[0]
    w = torch.randn(out_f, in_f)
    scale = torch.rand(out_f * in_f // gs) + 0.5
    s = scale.double().reshape(out_f, -1).repeat_interleave(gs, 1)
    for k, d in ((8, 1), (6, 2)):
        codes = torch.randint(0, k, (out_f, in_f // d))
        start = torch.randn(k, d).squeeze(1)
        idx = (codes.reshape(out_f, -1, 1) * d + torch.arange(d)).reshape(-1)
        a = torch.zeros(out_f * in_f, k * d, dtype=torch.float64)
        a[torch.arange(out_f * in_f), idx] = s.reshape(-1)
        hb = torch.block_diag(*[h.double()] * out_f)
        best = torch.linalg.lstsq(a.T @ hb @ a, a.T @ hb @ w.double().reshape(-1)).solution

        def err(c, a=a, hb=hb):
            e = w.double().reshape(-1) - a @ c.reshape(-1).double()
            return float(e @ hb @ e)

        new = refit_codebook(w, h, codes, start, scale, gs, damp=1e-12, iters=k * d)
        assert new.shape == start.shape
        assert torch.allclose(new.reshape(-1), best, atol=1e-6)
        few = refit_codebook(w, h, codes, start, scale, gs, damp=1e-12, iters=2)
        assert err(best) <= err(few) < 0.9 * err(start)


def test_gptq_refine_with_refit_codebook_lowers_the_output_error():
    """``refit_codebook=True`` moves the shared codebooks (scalar, and pairs with
    ``cluster_dim=2``) and lowers each layer's output error below scales-only refit."""
    batches = [
        {"input": correlated_inputs(64, 128, s) * torch.linspace(0.2, 3, 128)} for s in range(4)
    ]
    x = torch.cat([b["input"] for b in batches])
    cfg = wclust.ClusterConfig(bits=3, group_size=64, method="scaled-fit", min_numel=1)
    for dim in (2, 1):
        errs = []
        for update in (False, True):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
            h = collect_hessians(m, batches)
            originals = {n: c.weight.detach().clone() for n, c in m.named_children() if n != "1"}
            ref = x @ originals["0"].T
            wclust.compress_(m, cfg)
            gptq_refine_(m, h, originals, refit=1, cluster_dim=dim, refit_codebook=update)
            with torch.no_grad():
                errs.append(float(((m[0](x) - m[0].bias - ref) ** 2).mean()))
        # scales re-fitted to the output already take most of the gain on this layer
        assert errs[1] < 0.995 * errs[0], (dim, errs)


def test_recipe_gptq_refit_codebook_keeps_the_token_tables_codebook():
    from wclust.recipes import get_recipe

    def run(extra):
        model = tiny_whisper()
        spec = "scaled:bits=3,group_size=32+exclude:none+gptq" + extra
        wclust.compress_(model, get_recipe(spec), whisper_batches(6))
        table = model.model.decoder.embed_tokens.clustered
        fc = model.model.decoder.layers[0].fc1.clustered
        return table.codebook.clone(), fc.codebook.clone()

    plain, moved = run(""), run(":refit_codebook=true")
    assert torch.equal(moved[0], plain[0])
    assert not torch.equal(moved[1], plain[1])
    assert get_recipe("scaled+gptq:refit_codebook=true").gptq.refit_codebook is True
    for bad in ("refit_codebook=1", "refit_codebook=true,refit=0"):
        with pytest.raises(wclust.ConfigError, match="gptq"):
            get_recipe(f"scaled+gptq:{bad}")
