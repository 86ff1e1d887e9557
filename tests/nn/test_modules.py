"""Compressed modules: decoding only some rows must equal decoding everything."""

import pytest
import torch
from torch import nn

import wclust
from wclust.nn.modules import ClusteredWeight


@pytest.mark.parametrize(
    ("method", "group_size"),
    [("rtn", 128), ("nf4", 64), ("exact", None)],  # 96-wide rows: groups of 128 straddle rows
)
def test_embedding_row_decode_matches_dense(method, group_size):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(40, 96)})
    gran = "channel" if method == "exact" else "tensor"
    cfg = wclust.ClusterConfig(bits=4, method=method, group_size=group_size, granularity=gran)
    wclust.compress_(model, cfg)
    emb = model["emb"]
    cw = next(b for b in emb.modules() if isinstance(b, ClusteredWeight))
    idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
    with torch.no_grad():  # inference: the row-decoding path
        out = emb(idx)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, cw.dense()[idx], rtol=0, atol=0)


class _PositionTable(nn.Embedding):
    """Like Whisper's positional embedding: its own forward with extra arguments."""

    def forward(self, input_ids, past_key_values_length=0, position_ids=None):
        start = past_key_values_length
        return self.weight[start : start + input_ids.shape[-1]]


def test_embedding_subclass_with_own_forward_and_kwargs():
    torch.manual_seed(0)
    model = nn.ModuleDict({"pos": _PositionTable(32, 64)})
    wclust.compress_(model, wclust.ClusterConfig(bits=4, exclude=()))
    pos = model["pos"]
    assert wclust.nn.modules.is_clustered(pos)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        out = pos(ids, past_key_values_length=3)
    torch.testing.assert_close(out, pos.clustered.dense()[3:8], rtol=0, atol=0)


def test_position_table_decoded_once_per_change(monkeypatch):
    # a positional table read whole per generated token is decoded once for inference,
    # again after its codebook changes, and never kept while training
    torch.manual_seed(0)
    model = nn.ModuleDict({"pos": _PositionTable(32, 64)})
    wclust.compress_(model, wclust.ClusterConfig(bits=4, exclude=()))
    pos, cw = model["pos"], model["pos"].clustered
    calls = []
    dense = type(cw).dense
    monkeypatch.setattr(type(cw), "dense", lambda self: calls.append(1) or dense(self))
    ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        first = [pos(ids, past_key_values_length=t) for t in range(5)]
        assert len(calls) == 1
        cw.codebook.mul_(2)  # an in-place change: decoded again, with the new values
        again = pos(ids, past_key_values_length=4)
    assert len(calls) == 2
    torch.testing.assert_close(again, 2 * first[4], rtol=0, atol=0)
    pos(ids, past_key_values_length=1)  # grad mode: no kept table
    pos(ids, past_key_values_length=1)
    assert len(calls) == 4
    cw.set_cache(False)  # the memory setting drops the kept table
    assert "_table" not in cw.__dict__


def test_few_and_many_rows_never_build_the_dense_weight(monkeypatch):
    # up to 8 rows share each code look-up; more rows decode blocks of the weight
    # inside the kernel: the module never holds a dense copy of the weight
    from wclust.nn import modules

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48))
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    with torch.no_grad():
        w = m[0].weight.clone()

        def no_dense(self):
            raise AssertionError("the dense weight was built")

        monkeypatch.setattr(modules.ClusteredWeight, "dense", no_dense)
        for n in (1, 3, 9, 40):
            x = torch.randn(1, n, 128)
            ref = torch.nn.functional.linear(x, w, m[0].bias)
            torch.testing.assert_close(m[0](x), ref, rtol=1e-4, atol=1e-4)
        m[0].clustered.cache = True  # the user chose the dense weight: it is used
        with pytest.raises(AssertionError, match="dense weight was built"):
            m[0](torch.randn(1, 128))


def test_threads_sharing_a_model_switch_the_layout_once(monkeypatch):
    import threading
    import time

    from wclust.nn import modules

    layout, calls = modules.kernel_ops.kernel_layout, []

    def slow_layout(*args):  # widen the window in which a second thread could switch again
        calls.append(1)
        time.sleep(0.05)
        return layout(*args)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 96, bias=False))
    wclust.compress_(m, wclust.ClusterConfig(bits=3, method="kmeans", granularity="tensor"))
    ref_codes = m[0].clustered.codes().clone()
    monkeypatch.setattr(modules.kernel_ops, "kernel_layout", slow_layout)
    x = torch.randn(1, 256)
    outs, errors = [], []

    def run():
        try:
            with torch.no_grad():
                outs.append(m[0](x))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 8
    assert m[0].clustered.layout == "nibbles" and len(calls) == 1
    monkeypatch.undo()
    assert torch.equal(m[0].clustered.codes(), ref_codes)
    assert all(torch.allclose(o, outs[0], atol=1e-6) for o in outs)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, method="nf4"),
        dict(bits=3, method="scaled-fit", group_size=64),
        dict(bits=5, method="rtn", group_size=64),
        dict(bits=8, method="kmeans", granularity="tensor"),
        dict(bits=4),
        dict(bits=4, outliers=0.02),
    ],
)
def test_other_devices_decode_with_torch_ops_only(cfg, monkeypatch):
    # On a GPU the compiled kernels cannot read the codes: dense(), rows() and forward
    # use torch ops only, also when the codes were switched to the kernel layout on
    # the CPU and the model was then moved (as `wclust compare` does before its GPU
    # pass). Simulated on the CPU by declaring the weight unfit for the kernels.
    from wclust.kernels import ops
    from wclust.nn import modules

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48), nn.Embedding(20, 128))
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    cw = m[0].clustered
    x, ids = torch.randn(1, 128), torch.tensor([3, 7, 19])
    with torch.no_grad():
        ref_y = m[0](x)  # batch 1 on the CPU: a LUT kernel, tiled layout where it applies
        ref_w = cw.dense().clone()
        ref_e = m[1](ids)
        codes = cw.codes().clone()

        def no_kernel(*args, **kwargs):
            raise AssertionError("a compiled kernel ran")

        monkeypatch.setattr(modules.ClusteredWeight, "kernel_ok", lambda self: False)
        for name in ("decode", "linear", "rows"):
            monkeypatch.setattr(ops, name, no_kernel)
        torch.testing.assert_close(cw.dense(), ref_w, rtol=1e-6, atol=1e-6)
        assert cw.layout != "rows" and torch.equal(cw.codes(), codes)
        torch.testing.assert_close(m[0](x), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m[1](ids), ref_e, rtol=1e-6, atol=1e-7)
