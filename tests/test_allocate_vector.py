"""The allocator choosing vector codebooks (cluster_dim) per layer under a budget."""

import copy

import torch
from torch import nn

import wclust
from wclust.config import ClusterConfig
from wclust.stages.allocate import allocate_bits


def test_allocator_chooses_cluster_dim_within_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    base = ClusterConfig(method="scaled-exact", group_size=64, codebook_dtype="float16")
    cands = ((2, 64), (3, 64), (2, 64, 2), (3, 64, 2))
    target = 3.6  # room for 3-bit codes everywhere, not for 4
    cfg, summary = allocate_bits(model, target, base, candidates=cands)
    assert summary["bits_per_weight"] <= target
    assert set(summary["cluster_dim"].values()) == {2}  # the vector codebook wins each layer
    assert set(summary["bits"].values()) == {3}
    rep = wclust.compress_(copy.deepcopy(model), cfg)
    assert rep.bits_per_weight <= target + 1e-9
    assert {r.cluster_dim for r in rep.layers} == {2}
    # scalar-only candidates at the same budget: a higher predicted loss
    _, scalar = allocate_bits(model, target, base, candidates=cands[:2])
    assert scalar["predicted_loss"] > summary["predicted_loss"]
