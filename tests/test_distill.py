"""Distillation toward the uncompressed model: what trains, what stays, what it fixes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wclust
from tests.conftest import tiny_whisper, whisper_batches
from wclust.nn.owners import clustered_weights
from wclust.recipes import Calibration, Distill, KMeans


def kl_to(teacher, student, batches):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            t = F.log_softmax(teacher(**inputs).logits, -1)
            s = F.log_softmax(student(**inputs).logits, -1)
            total += float(F.kl_div(s, t, log_target=True, reduction="batchmean"))
    return total / len(batches)


@pytest.fixture(scope="module")
def clustered_pair():
    """fp32 tiny Whisper and a 2-bit copy with fp16 per-group scales."""
    teacher = tiny_whisper()
    student = copy.deepcopy(teacher)
    cfg = wclust.ClusterConfig(bits=2, group_size=64, method="scaled-fit", exclude=())
    wclust.compress_(student, cfg)
    return teacher, student


def test_distillation_lowers_the_kl_and_keeps_codes_and_storage(clustered_pair):
    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cws = [cw for cw, _ in clustered_weights(student).values()]
    codes = [cw.codes().clone() for cw in cws]
    scale_dtypes = [cw.group_scale.dtype for cw in cws]
    assert torch.float16 in scale_dtypes
    scales = [cw.group_scale.clone() for cw in cws]
    batches = whisper_batches()
    before = kl_to(teacher, student, batches)
    epochs = []
    out = wclust.distill_(
        student, teacher, batches, epochs=3, lr=1e-2, log=lambda e, kl, v, s: epochs.append(e)
    )
    after = kl_to(teacher, student, batches)
    assert after < 0.7 * before, (before, after)
    assert out["steps"] == 18 and len(out["kl"]) == 3 and epochs == [0, 1, 2]
    for cw, c, dt in zip(cws, codes, scale_dtypes, strict=True):
        assert torch.equal(cw.codes(), c)  # codes fixed
        assert "codebook" in cw._buffers and cw.group_scale.dtype == dt  # frozen, as stored
        assert not isinstance(cw.group_scale, nn.Parameter)
    assert any(not torch.equal(cw.group_scale, sc) for cw, sc in zip(cws, scales, strict=True))
    for k, v in teacher.state_dict().items():  # the teacher is not touched
        assert torch.equal(v, teacher_state[k]), k


def test_distilled_model_saves_and_loads_with_the_same_outputs(clustered_pair, tmp_path):
    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    wclust.distill_(student, teacher, whisper_batches(3), epochs=1, lr=1e-2)
    path = wclust.save(student, tmp_path / "d.wclust")
    loaded = wclust.load(path)
    b = {k: v for k, v in whisper_batches(1, seed=5)[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(loaded(**b).logits, student(**b).logits, atol=1e-5)


def test_scales_stay_fixed_when_asked_and_the_teacher_can_be_recomputed(clustered_pair):
    teacher, clustered = clustered_pair
    a, b = copy.deepcopy(clustered), copy.deepcopy(clustered)
    scales = [cw.group_scale.clone() for cw, _ in clustered_weights(a).values()]
    batches = whisper_batches(3)
    ra = wclust.distill_(a, teacher, batches, epochs=1, lr=1e-2, scales=False, dense_lr=0)
    for (cw, _), sc in zip(clustered_weights(a).values(), scales, strict=True):
        assert torch.equal(cw.group_scale, sc)
    # without room for the teacher's outputs they are recomputed: same training
    rb = wclust.distill_(
        b, teacher, batches, epochs=1, lr=1e-2, scales=False, dense_lr=0, cache_bytes=0
    )
    assert ra["kl"] == pytest.approx(rb["kl"], rel=1e-5)
    # room for some of them: those are kept, the rest recomputed, the same training
    from wclust.stages.train import _nbytes, _Targets

    one = _nbytes(_Targets(teacher, batches[:1], 1, 0.0, 0).target(0))
    assert len(_Targets(teacher, batches, 3, 0.0, 1.5 * one).cache) == 1
    c = copy.deepcopy(clustered)
    rc = wclust.distill_(
        c, teacher, batches, epochs=1, lr=1e-2, scales=False, dense_lr=0, cache_bytes=1.5 * one
    )
    assert ra["kl"] == pytest.approx(rc["kl"], rel=1e-5)


def test_any_module_with_tensor_outputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    student = copy.deepcopy(teacher)
    wclust.compress_(student, wclust.ClusterConfig(bits=2, granularity="tensor"))
    xs = [torch.randn(16, 32) for _ in range(4)]

    def kl():
        with torch.no_grad():
            return sum(
                float(
                    F.kl_div(
                        F.log_softmax(student(x), -1),
                        F.log_softmax(teacher(x), -1),
                        log_target=True,
                        reduction="batchmean",
                    )
                )
                for x in xs
            )

    before = kl()
    wclust.distill_(student, teacher, xs, epochs=5, lr=1e-2)
    assert kl() < before


def test_bad_input_gets_one_clear_error(clustered_pair):
    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    with pytest.raises(ValueError, match="separate, uncompressed"):
        wclust.distill_(student, student, whisper_batches(1))
    with pytest.raises(ValueError, match="at least one batch"):
        wclust.distill_(student, teacher, [])
    with pytest.raises(ValueError, match="epochs"):
        wclust.distill_(student, teacher, whisper_batches(1), epochs=0)
    with pytest.raises(ValueError, match="no clustered weight"):
        wclust.distill_(tiny_whisper(), teacher, whisper_batches(1))

    class Features(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"features": self.inner(x)}

    student = Features(nn.Linear(8, 8))
    teacher = copy.deepcopy(student)
    wclust.compress_(student, wclust.ClusterConfig(bits=2, granularity="tensor"))
    with pytest.raises(ValueError, match="must return logits"):
        wclust.distill_(student, teacher, [torch.randn(2, 8)])


def test_holdout_split_spreads_and_never_overlaps():
    items = list(range(10))
    train, val = wclust.split_holdout(items, 0.2)
    assert val == [4, 9] and train == [0, 1, 2, 3, 5, 6, 7, 8]
    assert wclust.split_holdout(items, 0.0) == (items, [])
    assert wclust.split_holdout([1, 2], 0.1) == ([1], [2])
    with pytest.raises(ValueError, match="fraction"):
        wclust.split_holdout(items, 1.0)


def test_early_stopping_keeps_the_best_held_out_state(clustered_pair):
    """A learning rate far too large ruins the model; the held-out KL measured
    before training then wins and the model ends where it started."""
    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    train, val = whisper_batches(8), whisper_batches(3, seed=1)
    start = kl_to(teacher, student, val)
    out = wclust.distill_(student, teacher, train, val_batches=val, epochs=2, lr=10.0)
    assert len(out["val_kl"]) == 3 and out["val_kl"][0] == pytest.approx(start, rel=1e-4)
    assert out["best_epoch"] == 0 and max(out["val_kl"][1:]) > start
    assert kl_to(teacher, student, val) == pytest.approx(start, rel=1e-4)
    # a sensible one improves on the held-out clips and keeps a trained state
    student = copy.deepcopy(clustered)
    out = wclust.distill_(student, teacher, train, val_batches=val, epochs=2, lr=1e-3)
    assert out["best_epoch"] > 0 and kl_to(teacher, student, val) < start


def test_augmented_batches_train_but_are_never_held_out(clustered_pair):
    """The pipeline asks the data to augment the training positions only; the
    augmented batches count as training items."""
    teacher, _ = clustered_pair
    batches, asked = whisper_batches(5), []

    class Data:
        def batches(self, model):
            return batches

        def augment(self, positions, speeds, teacher):
            asked.append((list(positions), speeds))
            return whisper_batches(2 * len(positions), seed=7)

    recipe = wclust.Recipe(
        quantizer=KMeans(bits=2),
        exclude=(),
        distill=Distill(epochs=1, lr=1e-3, holdout=0.2, speeds=(0.9, 1.1)),
    )
    report = wclust.compress_(copy.deepcopy(teacher), recipe, Data())
    assert asked == [([0, 1, 2, 3], (0.9, 1.1))]  # every 5th (position 4) held out
    assert (report.distill["items"], report.distill["held_out"]) == (12, 1)


def _hidden_error(teacher, student, batches):
    from wclust.stages.train import _hidden_states

    total = 0.0
    with torch.no_grad():
        for b in batches:
            x = {k: v for k, v in b.items() if k != "labels"}
            s = _hidden_states(student(**x, output_hidden_states=True))
            t = _hidden_states(teacher(**x, output_hidden_states=True))
            total += sum(
                float((u - v).pow(2).mean() / v.pow(2).mean()) for u, v in zip(s, t, strict=True)
            )
    return total / len(batches)


def test_hidden_state_matching_reconstructs_every_layer(clustered_pair):
    """With ``hidden`` the layers' outputs, not only the final distribution, move
    toward the teacher's, on examples it did not train on."""
    teacher, clustered = clustered_pair
    train, val = whisper_batches(8), whisper_batches(3, seed=1)
    start = _hidden_error(teacher, clustered, val)
    errors, kls = {}, {}
    for hidden in (0.0, 1.0):
        student = copy.deepcopy(clustered)
        out = wclust.distill_(student, teacher, train, epochs=3, lr=1e-3, hidden=hidden)
        errors[hidden], kls[hidden] = _hidden_error(teacher, student, val), out["kl"]
        assert kls[hidden][-1] < kls[hidden][0]  # the reported loss is still the output KL
        assert len(out["hidden"]) == (3 if hidden else 0)
    assert out["hidden"][-1] < out["hidden"][0]  # and the layers' error is reported apart
    assert errors[1.0] < 0.9 * errors[0.0] < start
    # recomputed teacher states (no cache) train the same
    student = copy.deepcopy(clustered)
    out = wclust.distill_(student, teacher, train, epochs=3, lr=1e-3, hidden=1.0, cache_bytes=0)
    assert out["kl"] == pytest.approx(kls[1.0], rel=1e-2)
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        wclust.distill_(copy.deepcopy(clustered), teacher, train, hidden=-1.0)


def test_hidden_state_matching_needs_a_model_with_hidden_states():
    teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 5))
    student = copy.deepcopy(teacher)
    wclust.compress_(student, wclust.ClusterConfig(bits=2, exclude=()))
    with pytest.raises(ValueError, match="dict inputs"):
        wclust.distill_(student, teacher, [torch.randn(2, 8)], hidden=1.0)


def test_nearest_codes_picks_the_closest_centroid_in_any_order():
    from wclust.stages.train import nearest_codes

    cb = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -2.0, 0.0]])
    x = torch.tensor([[0.2, 0.3, -0.6, 1.3, 9.0, -9.0], [2.1, 1.9, -0.9, -1.1, 0.4, 0.6]])
    want = (x[:, :, None] - cb[:, None, :]).abs().argmin(2)
    assert torch.equal(nearest_codes(x, cb), want)
    # centroid 0 (the pruned weights' zero) never chosen
    got = nearest_codes(x, cb, skip_zero=True)
    assert not (got == 0).any()
    far = (x[:, :, None] - cb[:, None, 1:]).abs().argmin(2) + 1
    assert torch.equal(got, far)


def test_reassignment_moves_codes_and_lowers_the_kl(clustered_pair):
    """Codes move under distillation with re-assignment, the model ends closer to the
    teacher than it started, and it is frozen for inference."""
    teacher, clustered = clustered_pair
    train = whisper_batches(8)
    moved = copy.deepcopy(clustered)
    start = kl_to(teacher, moved, train)
    before = {n: cw.codes().clone() for n, (cw, _) in _by_name(moved).items()}
    out = wclust.distill_(
        moved, teacher, train, epochs=3, lr=1e-3, reassign_every=2, reassign_lr=1e-4
    )
    after = {n: cw.codes() for n, (cw, _) in _by_name(moved).items()}
    assert out["reassigned"] > 0
    assert out["reassigned"] >= sum(int((before[n] != after[n]).sum()) for n in before) > 0
    assert kl_to(teacher, moved, train) < 0.6 * start
    for cw, _ in clustered_weights(moved).values():
        assert not isinstance(cw.codebook, nn.Parameter)


def test_reassignment_starts_from_the_teachers_weights(clustered_pair):
    """With shadows that do not move, re-assignment gives each weight the code nearest
    the original weight: the codes the clustering chose (no Fisher weighting here)."""
    from wclust.stages.train import _all_cws, _Reassigner, _teacher_weights

    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    cws = _all_cws(student)
    before = [cw.codes().clone() for cw in cws]
    assert _Reassigner(cws, 1e-3, _teacher_weights(student, teacher)).reassign() == 0
    assert all(torch.equal(cw.codes(), b) for cw, b in zip(cws, before, strict=True))
    # from the decoded weights instead: every weight sits on its centroid already
    assert _Reassigner(cws, 1e-3).reassign() == 0


def test_reassignment_rolls_the_codes_back_with_the_best_held_out_state(clustered_pair):
    teacher, clustered = clustered_pair
    student = copy.deepcopy(clustered)
    before = {n: cw.codes().clone() for n, (cw, _) in _by_name(student).items()}
    train, val = whisper_batches(8), whisper_batches(3, seed=1)
    out = wclust.distill_(
        student,
        teacher,
        train,
        val_batches=val,
        epochs=2,
        lr=10.0,
        reassign_every=1,
        reassign_lr=1.0,
    )  # ruinous: the state before training wins, codes included
    assert out["best_epoch"] == 0 and out["reassigned"] > 0
    for n, (cw, _) in _by_name(student).items():
        assert torch.equal(cw.codes(), before[n]), n


def test_a_recipe_moves_the_codes_when_it_says_reassign(clustered_pair):
    teacher, _ = clustered_pair
    recipe = wclust.Recipe(
        quantizer=KMeans(bits=2), exclude=(), distill=Distill(epochs=1, lr=1e-3, reassign=1)
    )
    report = wclust.compress_(copy.deepcopy(teacher), recipe, whisper_batches(4))
    assert report.distill["reassigned"] > 0
    still = wclust.Recipe(quantizer=KMeans(bits=2), exclude=(), distill=Distill(epochs=1))
    assert (
        wclust.compress_(copy.deepcopy(teacher), still, whisper_batches(4)).distill["reassigned"]
        == 0
    )


@pytest.mark.parametrize("items, seen", [(None, 5), (2, 2)])
def test_calibration_counts_its_own_items_when_the_recipe_distils(
    clustered_pair, monkeypatch, items, seen
):
    """Fisher weights come from the recipe's own count of items when it gives one,
    else from all of the distillation data."""
    import wclust.stages.calibrate as cal

    teacher, _ = clustered_pair
    real, counts = cal.calibrate, []

    def spy(model, batches, **kw):
        counts.append(len(batches))
        return real(model, batches, **kw)

    monkeypatch.setattr(cal, "calibrate", spy)
    recipe = wclust.Recipe(
        quantizer=KMeans(bits=2),
        exclude=(),
        calibration=Calibration(items=items),
        distill=Distill(epochs=1, lr=1e-3),
    )
    report = wclust.compress_(copy.deepcopy(teacher), recipe, whisper_batches(5))
    assert counts == [seen] and report.distill["items"] == 5
    # without distillation: the recipe's own count too, else 16
    counts.clear()
    plain = wclust.Recipe(
        quantizer=KMeans(bits=2), exclude=(), calibration=Calibration(items=items)
    )
    wclust.compress_(copy.deepcopy(teacher), plain, whisper_batches(18))
    assert counts == [items or 16]


def test_reassignment_arguments_are_checked(clustered_pair):
    teacher, clustered = clustered_pair
    with pytest.raises(ValueError, match="reassign_every"):
        wclust.distill_(copy.deepcopy(clustered), teacher, whisper_batches(2), reassign_every=-1)
    with pytest.raises(ValueError, match="reassign_lr"):
        wclust.distill_(
            copy.deepcopy(clustered), teacher, whisper_batches(2), reassign_every=1, reassign_lr=0
        )


def _by_name(model):
    return {owners[0][0]: (cw, owners) for cw, owners in clustered_weights(model).values()}
