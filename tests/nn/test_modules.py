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


@pytest.mark.parametrize(
    "method,bits",
    [
        ("nf4", 4),
        ("rtn", 4),
        ("kmeans", 4),
        ("scaled-fit", 4),
        ("kmeans", 3),
        ("scaled-fit", 3),
        ("rtn", 5),
        ("scaled-fit", 6),
        ("kmeans", 8),
        ("exact", 4),  # one codebook per row (per channel)
        ("exact", 3),
    ],
)
@pytest.mark.parametrize("kernels", ["portable", "simd"])
def test_tiled_layout_keeps_every_view_of_the_weight(method, bits, kernels, tmp_path, monkeypatch):
    # A tied head/embedding with one codebook per tensor: the first batch-1 call
    # moves its codes to the tiled kernel layout (4-bit pairs up to 4 bits, bytes
    # above); dense(), rows(), codes() and the saved file must not change.
    # With the AVX-512 kernel, 4-bit codes stay in rows and 2-3 bit codes are widened
    # to 4-bit rows ("nibbles") instead.
    from wclust.kernels import simd

    if kernels == "portable":
        monkeypatch.setattr(simd, "available", lambda: False)
        layout = "tiles" if bits <= 4 else "tiles8"
    elif not simd.available():
        pytest.skip("no AVX-512F on this CPU")
    else:
        layout = {4: "rows", 3: "nibbles"}.get(bits, "tiles8")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(40, 128), nn.Linear(128, 40, bias=False))
    m[1].weight = m[0].weight
    cfg = dict(bits=bits, method=method)
    if method == "kmeans":
        cfg["granularity"] = "tensor"
    if method == "exact":
        cfg["granularity"] = "channel"
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    cw = m[1].clustered
    assert cw is m[0].clustered and cw.tiles_ok() and cw.layout == "rows"
    codes = cw.codes().clone()  # read from the row-major layout
    wclust.save(m, tmp_path / "a.wclust")
    assert cw.layout == "rows"
    cb = cw.codebook_float()
    dense = cb[torch.arange(cb.shape[0])[:, None], codes.long()]  # 1 or one per row
    if cw.group_scale is not None:
        dense = dense.view(cw.group_scale.numel(), -1) * cw.group_scale.float()[:, None]
        if cw.group_offset is not None:
            dense = dense + cw.group_offset.float()[:, None]
    dense = dense.view(cw.shape)
    x = torch.randn(1, 128)
    ids = torch.tensor([0, 17, 39, 16, 15])
    with torch.no_grad():
        y = m[1](x)
        assert cw.layout == layout
        assert torch.allclose(y, x @ dense.T, atol=1e-5)
        assert torch.allclose(m[0](ids), dense[ids], rtol=1e-6, atol=1e-7)
    assert torch.allclose(cw.dense(), dense, rtol=1e-6, atol=1e-7)
    assert torch.equal(cw.codes(), codes)
    wclust.save(m, tmp_path / "b.wclust")
    assert (tmp_path / "a.wclust").read_bytes() == (tmp_path / "b.wclust").read_bytes()
    cw.set_packed(cw.packed_rows().clone())
    assert cw.layout == "rows" and torch.equal(cw.codes(), codes)


def test_few_rows_on_a_large_weight_use_the_lut_kernel_per_row(monkeypatch):
    from wclust.nn import modules

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48))
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, m[0].weight, m[0].bias)
        monkeypatch.setattr(modules, "FEW_ROWS_MIN_NUMEL", 0)  # 48x128 counts as large

        def no_dense(self):
            raise AssertionError("the dense weight was built")

        monkeypatch.setattr(modules.ClusteredWeight, "dense", no_dense)
        y = m[0](x)
        assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-5)
        with pytest.raises(AssertionError, match="dense weight was built"):
            m[0](torch.randn(9, 128))  # more than FEW_ROWS rows: the dense path


def test_threads_sharing_a_model_switch_the_layout_once(monkeypatch, portable_kernels):
    import threading
    import time

    from wclust.kernels import lut

    tile4, calls = lut.tile4, []

    def slow_tile4(*args):  # widen the window in which a second thread could tile again
        calls.append(1)
        time.sleep(0.05)
        return tile4(*args)

    monkeypatch.setattr(lut, "tile4", slow_tile4)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 96, bias=False))
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    ref_codes = m[0].clustered.codes().clone()
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
    assert m[0].clustered.layout == "tiles" and len(calls) == 1
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
    # On a GPU the numba kernels cannot read the codes: dense(), rows() and forward
    # use torch ops only, also when the codes were tiled on the CPU and the model was
    # then moved (as `wclust compare` does before its GPU pass). Simulated on the CPU
    # by declaring its tensors unreadable for numba.
    from wclust.kernels import lut
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

        def no_numba(*args, **kwargs):
            raise AssertionError("a numba kernel ran")

        monkeypatch.setattr(modules, "_numba_ok", lambda t: False)
        for name in ("decode", "decode_tiles", "tile4", "tile8", "lut_gemv", "gemv_fn"):
            monkeypatch.setattr(lut, name, no_numba)
        torch.testing.assert_close(cw.dense(), ref_w, rtol=1e-6, atol=1e-6)
        assert cw.layout == "rows" and torch.equal(cw.codes(), codes)
        torch.testing.assert_close(m[0](x), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m[1](ids), ref_e, rtol=1e-6, atol=1e-7)
