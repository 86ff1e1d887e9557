import pytest

import wclust
from tests.conftest import tiny_gpt2
from wclust.allocate import allocate_bits


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
