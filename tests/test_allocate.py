import pytest

import wclust
from tests.conftest import tiny_gpt2
from wclust.stages.allocate import allocate_bits


@pytest.mark.parametrize("target", [5.0, 7.0])
def test_budget_is_met_everything_counted(target):
    m = tiny_gpt2()
    base = wclust.ClusterConfig(granularity="channel", codebook_dtype="float16")
    cfg, summary = allocate_bits(m, target, base)
    rep = wclust.compress_(m, cfg)
    assert rep.bits_per_weight <= target
    assert rep.bits_per_weight == pytest.approx(summary["bits_per_weight"])
    assert {r.name: r.bits for r in rep.clustered} == summary["bits"]


def test_more_budget_gives_more_bits_and_less_predicted_loss():
    base = wclust.ClusterConfig(granularity="channel", codebook_dtype="float16")
    _, lo = allocate_bits(tiny_gpt2(), 5.0, base)
    _, hi = allocate_bits(tiny_gpt2(), 8.0, base)
    assert sum(hi["bits"].values()) > sum(lo["bits"].values())
    assert hi["predicted_loss"] < lo["predicted_loss"]


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="below what 2-bit everywhere costs"):
        allocate_bits(tiny_gpt2(), 1.0, wclust.ClusterConfig())


def test_scale_group_sizes_are_candidates_too():
    m = tiny_gpt2()
    base = wclust.ClusterConfig(method="scaled-lloyd", group_size=64, min_numel=1)
    cands = ((3, 64), (4, 64), (4, 32))
    _, cheap = allocate_bits(m, 4.5, base, candidates=cands)
    cfg, rich = allocate_bits(m, 6.0, base, candidates=cands)
    rep = wclust.compress_(m, cfg)
    assert rep.bits_per_weight <= 6.0
    assert rep.bits_per_weight == pytest.approx(rich["bits_per_weight"])
    assert {r.name: (r.bits, r.group_size) for r in rep.clustered} == {
        n: (b, rich["group_size"][n]) for n, b in rich["bits"].items()
    }
    assert set(rich["group_size"].values()) == {32}  # enough budget: the finest everywhere
    assert cheap["bits_per_weight"] <= 4.5 and 3 in cheap["bits"].values()
    assert rich["predicted_loss"] < cheap["predicted_loss"]
    with pytest.raises(ValueError, match="3-bit in groups of 64 everywhere"):
        allocate_bits(m, 1.0, base, candidates=cands)
