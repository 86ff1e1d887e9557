import numpy as np
import pytest
import torch

import wclust
from wclust.core.packing import pack_codes
from wclust.kernels.lut import (
    decode,
    decode_tiles,
    lut_gemv,
    lut_gemv_tiles,
    tile4,
    tile8,
    untile4,
    untile8,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cb_rows", ["row", "shared"])
def test_gemv_matches_dense_reference(bits, cb_rows):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f = 37, 64
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8)
    cb = torch.randn(out_f if cb_rows == "row" else 1, 1 << bits, generator=g)
    x = torch.randn(in_f, generator=g)
    w = cb[torch.arange(out_f)[:, None] % cb.shape[0], codes.long()]
    y = lut_gemv(pack_codes(codes, bits).numpy(), bits, x.numpy(), cb.numpy(), out_f, in_f)
    np.testing.assert_allclose(y, (w @ x).numpy(), rtol=1e-5, atol=1e-5)
    flat = decode(pack_codes(codes, bits).numpy(), bits, cb.numpy(), out_f * in_f)
    assert np.array_equal(flat.reshape(out_f, in_f), w.numpy())


def test_gemv_with_group_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, gs = 8, 128, 32
    codes = torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8)
    cb = torch.randn(1, 16, generator=g)
    scale = torch.rand(out_f * in_f // gs, generator=g)
    offset = torch.randn(out_f * in_f // gs, generator=g)
    x = torch.randn(in_f, generator=g)
    w = (cb[0][codes.long()].view(-1, gs) * scale[:, None] + offset[:, None]).view(out_f, in_f)
    y = lut_gemv(
        pack_codes(codes, 4).numpy(),
        4,
        x.numpy(),
        cb.numpy(),
        out_f,
        in_f,
        scale.numpy(),
        offset.numpy(),
        gs,
    )
    np.testing.assert_allclose(y, (w @ x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4),
        dict(bits=4, granularity="tensor"),
        dict(bits=8),
        dict(bits=3),
        dict(bits=4, method="nf4"),
        dict(bits=4, method="rtn", group_size=64),
        dict(bits=4, codebook_dtype="int8"),
        dict(bits=4, outliers=0.02),
        dict(bits=8, outliers=0.01),
        dict(bits=4, granularity="group", group_size=32),
    ],
)
def test_module_fast_paths_agree_with_dense(cfg):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 48), torch.nn.Embedding(20, 128))
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    x = torch.randn(1, 1, 128)
    ids = torch.tensor([[3, 7, 3, 19]])
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, m[0].weight, m[0].bias)
        assert torch.allclose(m[0](x), ref, atol=1e-5)
        assert torch.equal(m[1](ids), m[1].weight[ids])
    # with gradients on (training), the dense differentiable path runs
    assert torch.allclose(m[0](x), ref, atol=1e-5)


_SHAPES = [  # out, in, scale group size (0: none), offsets
    (37, 64, 0, False),
    (16, 128, 64, True),
    (50, 256, 128, False),
    (3, 192, 64, True),
    (21, 96, 32, True),
]
# the combinations a tiled layout holds: codes of up to 4 bits need rows and groups of
# a multiple of 64 (5 to 8 bits: 32); per-row codebooks up to 4 bits and no scales
_TILED_CASES = [
    (bits, per_row, *shape)
    for bits in (3, 4, 5, 8)
    for per_row in (False, True)
    for shape in _SHAPES
    if not (shape[1] % (64 if bits <= 4 else 32) or shape[2] % (64 if bits <= 4 else 32))
    and not (per_row and (bits > 4 or shape[2]))
]


@pytest.mark.parametrize("bits,per_row,out_f,in_f,gs,offset", _TILED_CASES)
def test_tiled_gemv_matches_dense_reference(bits, per_row, out_f, in_f, gs, offset):
    # codes of up to 4 bits: 4-bit pairs (tile4, pair tables; a 3-bit codebook has
    # 8 entries), or one codebook per row (no scales); 5 to 8 bits: one byte per code
    # (tile8, one table per input)
    g = torch.Generator().manual_seed(out_f * bits)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8)
    cb = torch.randn(out_f if per_row else 1, 1 << bits, generator=g)
    x = torch.randn(in_f, generator=g)
    w = cb[torch.arange(out_f)[:, None] % cb.shape[0], codes.long()]
    sc = off = None
    if gs:
        sc = torch.rand(out_f * in_f // gs, generator=g)
        w = w.view(-1, gs) * sc[:, None]
        if offset:
            off = torch.randn(out_f * in_f // gs, generator=g)
            w = w + off[:, None]
        w = w.view(out_f, in_f)
    if bits <= 4:
        packed = pack_codes(codes, 4).numpy()
        tiled = tile4(packed, out_f, in_f)
        assert tiled.ndim == 4 and np.array_equal(untile4(tiled, out_f, in_f), packed)
    else:
        tiled = tile8(codes.numpy())
        assert tiled.ndim == 3 and np.array_equal(untile8(tiled, out_f), codes.numpy())
    w0 = cb[torch.arange(out_f)[:, None] % cb.shape[0], codes.long()]
    assert np.array_equal(decode_tiles(tiled, cb.numpy(), out_f), w0.numpy())
    y = lut_gemv_tiles(
        tiled,
        x.numpy(),
        cb.numpy(),
        out_f,
        None if sc is None else sc.numpy(),
        None if off is None else off.numpy(),
        gs,
    )
    np.testing.assert_allclose(y, (w @ x).numpy(), rtol=1e-4, atol=1e-4)
    dense = decode_tiles(
        tiled,
        cb.numpy(),
        out_f,
        None if sc is None else sc.numpy(),
        None if off is None else off.numpy(),
    )
    np.testing.assert_allclose(dense, w.numpy(), rtol=1e-6, atol=1e-6)


def test_tiled_layout_rejects_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="divisible by 64"):
        tile4(np.zeros(8 * 48 // 2, np.uint8), 8, 48)
    with pytest.raises(ValueError, match="divisible by 32"):
        tile8(np.zeros((8, 48), np.uint8))
    with pytest.raises(ValueError, match="at most 16 codebook entries"):
        lut_gemv_tiles(
            tile4(np.zeros(64, np.uint8), 2, 64),
            np.ones(64, np.float32),
            np.ones(32, np.float32),
            2,
        )
    tiled = tile4(np.zeros(4 * 128 // 2, np.uint8), 4, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        lut_gemv_tiles(
            tiled,
            np.ones(128, np.float32),
            np.ones(16, np.float32),
            4,
            np.ones(16, np.float32),
            None,
            32,
        )
