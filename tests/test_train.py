"""Cluster-aware fine-tuning: the centroid-gradient rule, keep_zeros, save/load."""

import pytest
import torch
from torch import nn

import wclust
from wclust.core.packing import pack_codes
from wclust.nn.modules import ClusteredWeight, swap_weight


def hand_model(keep_zeros: bool) -> nn.Module:
    codes = torch.tensor([[1, 2, 1], [3, 1, 0]])
    cb = torch.tensor([[0.0, 0.5, -1.0, 2.0]])
    cw = ClusteredWeight(pack_codes(codes, 2), cb, None, (2, 3), 2, meta={"keep_zeros": keep_zeros})
    return nn.Sequential(swap_weight(nn.Linear(3, 2, bias=False), cw))


@pytest.mark.parametrize("keep_zeros", [False, True])
def test_centroid_gradient_is_the_sum_of_its_weights_gradients(keep_zeros):
    m = hand_model(keep_zeros)
    (cb,) = wclust.trainable_codebooks_(m)
    assert isinstance(cb, nn.Parameter) and any(p is cb for p in m.parameters())
    m(torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    # dL/dW[i, j] = x[j] = [[1, 2, 3], [1, 2, 3]]; codes [[1, 2, 1], [3, 1, 0]]:
    # c0 <- W[1,2] = 3; c1 <- W[0,0] + W[0,2] + W[1,1] = 1 + 3 + 2; c2 <- W[0,1] = 2; c3 <- W[1,0] = 1
    want = torch.tensor([[0.0 if keep_zeros else 3.0, 6.0, 2.0, 1.0]])
    assert torch.equal(cb.grad, want)


def synthetic(n=256, d_in=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, 4, generator=g)
    y = (x @ teacher).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def pruned_clustered(seed=0, bits=3):
    m = mlp(seed)
    wclust.prune_(m, 0.7)
    cfg = wclust.ClusterConfig(bits=bits, granularity="tensor", keep_zeros=True)
    wclust.compress_(m, cfg)
    return m


def mean_loss(m, data):
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(m(x), y)) for x, y in data) / len(data)


def test_finetune_keeps_zeros_exact_and_lowers_the_loss():
    data = synthetic()
    m = pruned_clustered()
    zeros = {i: m[i].weight == 0 for i in (0, 2)}
    before = {i: m[i].clustered.codebook.clone() for i in (0, 2)}
    loss0 = mean_loss(m, data)
    opt_params = wclust.trainable_codebooks_(m)
    # weight decay and momentum would move a zero centroid that had any gradient
    opt = torch.optim.SGD(
        opt_params + [m[0].bias, m[2].bias], lr=0.02, momentum=0.9, weight_decay=0.1
    )
    out = wclust.finetune(
        m, data, nn.functional.cross_entropy, epochs=5, optimizer=opt, reassign_every=0
    )
    assert out["steps"] == 40 and len(out["loss"]) == 5
    assert mean_loss(m, data) < loss0
    for i in (0, 2):
        cw = m[i].clustered
        assert not isinstance(cw.codebook, nn.Parameter)  # frozen back to a buffer
        assert torch.equal(cw.codebook[:, 0], torch.zeros(1))
        assert not torch.equal(cw.codebook, before[i])  # the centroids did train
        assert torch.equal(m[i].weight == 0, zeros[i])  # same zeros, exactly


def test_finetuned_model_saves_and_loads_with_entropy_coding(tmp_path):
    data = synthetic()
    m = pruned_clustered()
    wclust.finetune(m, data, nn.functional.cross_entropy, epochs=3, lr=0.02)
    trained = m[0].clustered.codebook.clone()
    p = wclust.save(m, tmp_path / "ft.wclust", entropy="huffman")
    m2 = wclust.load(p, mlp)
    assert torch.equal(m2[0].clustered.codebook, trained)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        assert torch.equal(m2[0].weight == 0, m[0].weight == 0)


def test_save_while_trainable_and_float16_codebooks(tmp_path):
    m = mlp()
    wclust.compress_(m, wclust.ClusterConfig(bits=2, codebook_dtype="float16"))
    wclust.trainable_codebooks_(m)
    assert m[0].clustered.codebook.dtype == torch.float32
    wclust.load(wclust.save(m, tmp_path / "t.wclust"), mlp)  # no error while trainable
    wclust.freeze_codebooks_(m)
    assert m[0].clustered.codebook.dtype == torch.float16


def test_straight_through_reassignment_moves_codes_but_not_pruned_weights():
    data = synthetic()
    m = pruned_clustered(bits=2)
    zeros = m[0].weight == 0
    out = wclust.finetune(m, data, nn.functional.cross_entropy, epochs=3, lr=0.05, reassign_every=2)
    assert out["reassigned"] > 0
    assert torch.equal(m[0].weight == 0, zeros)


def test_finetune_needs_a_clustered_model():
    with pytest.raises(ValueError, match="compress_"):
        wclust.finetune(mlp(), synthetic(), nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="epochs"):
        wclust.finetune(pruned_clustered(), synthetic(), nn.functional.cross_entropy, epochs=-1)


def test_pruning_masks_survive_retraining_then_cluster():
    m = mlp()
    fr = wclust.prune_(m, {"0": 0.9, "2": 0.5}, mask=True)
    assert fr["0"] == pytest.approx(0.9, abs=0.01) and fr["2"] == pytest.approx(0.5, abs=0.01)
    zeros = m[0].weight == 0
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    for x, y in synthetic():
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert torch.equal(m[0].weight == 0, zeros)
    with pytest.raises(ValueError, match="remove_masks_"):
        wclust.compress_(m)
    assert wclust.remove_masks_(m) == 2
    wclust.compress_(m, wclust.ClusterConfig(bits=3, keep_zeros=True))
    assert torch.equal(m[0].weight == 0, zeros)


def test_global_pruning_threshold():
    m = mlp()
    wclust.prune_(m, 0.8, scope="global")
    w = torch.cat([m[0].weight.reshape(-1), m[2].weight.reshape(-1)])
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    with pytest.raises(ValueError, match="scope='layer'"):
        wclust.prune_(m, {"*": 0.5}, scope="global")
