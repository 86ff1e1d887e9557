"""The AVX-512 register-table kernel (kernels.simd) against dense references."""

import numpy as np
import pytest
import torch
from torch import nn

import wclust
from wclust.core.packing import pack_codes
from wclust.kernels import simd

needs_simd = pytest.mark.skipif(not simd.available(), reason="no AVX-512F on this CPU")


@needs_simd
@pytest.mark.parametrize(
    "out_f,in_f,gs,per_row,offset,k",
    [
        (37, 64, 0, False, False, 16),
        (5, 16, 0, True, False, 16),
        (16, 128, 64, False, True, 16),
        (50, 256, 128, False, False, 11),  # fewer entries than codes allow: padded
        (21, 96, 32, True, True, 16),  # per-row codebooks with scales and offsets
        (3, 48, 16, False, False, 16),
    ],
)
def test_gemv_matches_dense_reference(out_f, in_f, gs, per_row, offset, k):
    rng = np.random.default_rng(out_f * in_f + gs)
    codes = rng.integers(0, k, (out_f, in_f))
    packed = pack_codes(torch.from_numpy(codes.reshape(-1)), 4).numpy()
    cb = rng.standard_normal((out_f if per_row else 1, k)).astype(np.float32)
    w = np.take_along_axis(np.broadcast_to(cb, (out_f, k)), codes, 1)
    sc = off = None
    if gs:
        sc = rng.random((out_f, in_f // gs)).astype(np.float32) + 0.5
        w = w * np.repeat(sc, gs, 1)
        if offset:
            off = rng.standard_normal((out_f, in_f // gs)).astype(np.float32)
            w = w + np.repeat(off, gs, 1)
    x = rng.standard_normal(in_f).astype(np.float32)
    y = simd.gemv4_fn(packed, cb, out_f, in_f, sc, off, gs)(x)
    np.testing.assert_allclose(y, w @ x, rtol=1e-4, atol=1e-4)


def test_shapes_it_cannot_take_are_refused():
    assert not simd.simd_ok(40, 4)  # rows not a multiple of 16
    assert not simd.simd_ok(64, 4, 24)  # group not a multiple of 16
    assert not simd.simd_ok(64, 3) and not simd.simd_ok(64, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        simd.gemv4_fn(np.zeros(20, np.uint8), np.zeros((1, 16), np.float32), 1, 40)
    with pytest.raises(ValueError, match="codebook must be"):
        simd.gemv4_fn(np.zeros(16, np.uint8), np.zeros((2, 16), np.float32), 1, 32)


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("WCLUST_SIMD", "0")
    assert simd.available.__wrapped__() is False


@needs_simd
@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, method="nf4"),
        dict(bits=4, method="kmeans", granularity="tensor"),
        dict(bits=4, method="scaled-fit", group_size=32),
        dict(bits=4, method="rtn", group_size=64),  # offsets
        dict(bits=4),  # one codebook per row
        dict(bits=4, outliers=0.02),
    ],
)
def test_module_runs_it_on_the_stored_rows(cfg, monkeypatch):
    # 4-bit weights keep their row-major codes (no tiled copy) and the batch-1 call
    # runs the register-table kernel; outputs equal the dense reference.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48))
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    cw = m[0].clustered
    calls = []
    perm = simd._gemv4_perm

    def counted(*args):
        calls.append(1)
        return perm(*args)

    monkeypatch.setattr(simd, "_gemv4_perm", counted)
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, cw.dense(), m[0].bias)
        y = m[0](x)
    assert calls and cw.layout == "rows"
    assert torch.allclose(y, ref, atol=1e-5)


def test_available_wherever_the_cpu_has_avx512(monkeypatch):
    # a broken kernel fails its self-test and would silently fall back: on an
    # AVX-512 CPU that must show up here, not as skipped tests
    from llvmlite.binding import get_host_cpu_features

    monkeypatch.delenv("WCLUST_SIMD", raising=False)
    host = bool(get_host_cpu_features().get("avx512f", False))
    import numba

    if numba.config.CPU_NAME:
        pytest.skip("numba compiles for a named CPU, not the host")
    assert simd.available.__wrapped__() is host
