"""The numba AVX-512 register-table kernel (kernels.simd, the reference the compiled
kernels replaced; benchmarks/kernel_speed.py times both) against dense references."""

import numpy as np
import pytest
import torch

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
    run = simd.gemv4_fn(packed, cb, out_f, in_f, sc, off, gs)
    x = np.empty(in_f + 1, np.float32)[1:]  # not 64-byte aligned: the loads must not assume it
    x[:] = rng.standard_normal(in_f)
    np.testing.assert_allclose(run(x), w @ x, rtol=1e-4, atol=1e-4)
    X = rng.standard_normal((simd.MAX_BATCH, in_f)).astype(np.float32)
    for n in (2, 5, simd.MAX_BATCH):  # batched: each chunk looked up once for n rows
        np.testing.assert_allclose(run(X[:n]), X[:n] @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        simd.decode4(packed, cb, out_f, in_f, sc, off, gs), w, rtol=1e-6, atol=1e-6
    )


def test_shapes_it_cannot_take_are_refused():
    assert not simd.simd_ok(40, 4)  # rows not a multiple of 16
    assert not simd.simd_ok(64, 4, 24)  # group not a multiple of 16
    assert not simd.simd_ok(64, 3) and not simd.simd_ok(64, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        simd.gemv4_fn(np.zeros(20, np.uint8), np.zeros((1, 16), np.float32), 1, 40)
    with pytest.raises(ValueError, match="codebook must be"):
        simd.gemv4_fn(np.zeros(16, np.uint8), np.zeros((2, 16), np.float32), 1, 32)
    run = simd.gemv4_fn(np.zeros(16, np.uint8), np.zeros((1, 16), np.float32), 1, 32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        run(np.zeros((9, 32), np.float32))


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("WCLUST_SIMD", "0")
    assert simd.available.__wrapped__() is False


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
