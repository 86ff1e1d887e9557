"""Register-table GEMV for 4-bit codes on CPUs with AVX-512 (numba + one LLVM intrinsic).

A 16-entry float32 codebook fits one 512-bit register, so ``vpermps``
(``llvm.x86.avx512.permvar.sf.512``) looks up 16 codes at once, with no table in
memory and no gather: per 16 weights the kernel loads 8 bytes of packed codes,
splits them into 16 indices, permutes the codebook register and does one fused
multiply-add with 16 inputs (the way llama.cpp's IQ4_NL kernels use ``pshufb``).
It reads the codes in their stored row-major order (``core.packing``: byte ``k`` of
a row holds inputs ``2k`` (low nibble) and ``2k+1``), so no re-layout is needed,
and one codebook per tensor or one per output row cost the same (the row's
codebook is one register load). Scales and offsets apply per group of consecutive
inputs of a row (a multiple of 16).

numba has no vector types, so the 16-lane loop is written as LLVM IR in an
``@intrinsic`` and inlined into an ordinary ``prange`` over rows. It is used only
where the host CPU has AVX-512F and a one-time self-test passes; elsewhere (or with
``WCLUST_SIMD=0``) the portable kernels of ``kernels.lut`` run.
"""

from __future__ import annotations

import functools
import os

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["available", "gemv4_fn", "simd_ok"]

_F32 = ir.FloatType()
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V16F = ir.VectorType(_F32, 16)
_V8I8, _V8I32 = ir.VectorType(_I8, 8), ir.VectorType(_I32, 8)
_V16I32 = ir.VectorType(_I32, 16)


def _elem_ptr(context, builder, arr_type, arr, offset, elem):
    a = context.make_array(arr_type)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [offset]), elem.as_pointer())


@intrinsic
def _dot16(typingctx, cb, cb_off, codes, code_off, x, x_off, n_chunks):
    """``sum(cb[cb_off + code[i]] * x[x_off + i])`` over ``16 * n_chunks`` weights
    whose 4-bit codes start at byte ``code_off`` of ``codes``."""
    sig = types.float32(cb, types.intp, codes, types.intp, x, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        cb_v, cbo, codes_v, co, x_v, xo, n = args
        mod = builder.module
        perm = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V16F, [_V16F, _V16I32]), "llvm.x86.avx512.permvar.sf.512"
        )
        fma = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]), "llvm.fma.v16f32"
        )
        ty = signature.args
        table = builder.load(_elem_ptr(context, builder, ty[0], cb_v, cbo, _V16F), align=4)
        cptr = _elem_ptr(context, builder, ty[2], codes_v, co, _I8)
        xptr = _elem_ptr(context, builder, ty[4], x_v, xo, _F32)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
        low4 = ir.Constant(_V8I32, [15] * 8)
        four = ir.Constant(_V8I32, [4] * 8)
        # lanes (lo0, hi0, lo1, hi1, ...): inputs in their natural order
        interleave = ir.Constant(_V16I32, [v for k in range(8) for v in (k, k + 8)])
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            c8 = builder.gep(cptr, [builder.mul(i, ir.Constant(i.type, 8))])
            w = builder.zext(builder.load(builder.bitcast(c8, _V8I8.as_pointer()), align=1), _V8I32)
            idx = builder.shuffle_vector(builder.and_(w, low4), builder.lshr(w, four), interleave)
            vals = builder.call(perm, [table, idx])
            x16 = builder.gep(xptr, [builder.mul(i, ir.Constant(i.type, 16))])
            xv = builder.load(builder.bitcast(x16, _V16F.as_pointer()), align=4)
            builder.store(builder.call(fma, [vals, xv, builder.load(acc)]), acc)
        v = builder.load(acc)
        for half in (8, 4, 2, 1):  # pairwise sum of the 16 lanes
            lo = ir.Constant(ir.VectorType(_I32, half), list(range(half)))
            hi = ir.Constant(ir.VectorType(_I32, half), list(range(half, 2 * half)))
            v = builder.fadd(builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return sig, codegen


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv4_perm(packed, x, cb, cb_rows, scale, offset, chunks, n_groups, out_f, in_f):
    # packed: row-major 4-bit codes; cb: (n_cb * 16,) flat, 16 entries per codebook;
    # scale/offset: (out_f * n_groups,) or empty; a group is 16 * chunks inputs.
    y = np.empty(out_f, dtype=np.float32)
    row_bytes = in_f // 2
    xsum = np.zeros(n_groups, dtype=np.float32)
    if offset.shape[0] > 0:
        for g in range(n_groups):
            for j in range(g * chunks * 16, (g + 1) * chunks * 16):
                xsum[g] += x[j]
    for o in nb.prange(out_f):
        cbo = o * 16 if cb_rows else 0
        s = np.float32(0.0)
        for g in range(n_groups):
            d = _dot16(cb, cbo, packed, o * row_bytes + g * chunks * 8, x, g * chunks * 16, chunks)
            if scale.shape[0] > 0:
                d *= scale[o * n_groups + g]
                if offset.shape[0] > 0:
                    d += offset[o * n_groups + g] * xsum[g]
            s += d
        y[o] = s
    return y


_EMPTY = np.zeros(0, dtype=np.float32)


def simd_ok(in_features: int, bits: int, group_size: int = 0) -> bool:
    """Whether a weight of this shape can take the register-table kernel (when
    ``available()``): codes of 4 bits, rows and scale groups of a multiple of 16."""
    return (
        bits == 4
        and in_features > 0
        and in_features % 16 == 0
        and (group_size == 0 or (group_size % 16 == 0 and in_features % group_size == 0))
    )


def gemv4_fn(
    packed: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    in_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
):
    """``W @ x`` as a function of ``x`` (float32, (in,)) for row-major packed 4-bit
    codes.

    Args:
        packed: uint8 ``core.packing`` codes of W (out, in), row-major.
        codebook: (1, <=16) shared or (out, <=16) per-row float32; padded to 16.
        scale, offset: optional (out * in / group_size,) float32, by (row, group).
    """
    if not simd_ok(in_features, 4, group_size if scale is not None else 0):
        raise ValueError(
            f"the register-table kernel needs rows of a multiple of 16 inputs and scale "
            f"groups of such a multiple (in_features {in_features}, group {group_size})"
        )
    cb = np.asarray(codebook, dtype=np.float32).reshape(-1, codebook.shape[-1])
    if cb.shape[0] not in (1, out_features) or cb.shape[1] > 16:
        raise ValueError(f"codebook must be (1 or {out_features}, <= 16), got {tuple(cb.shape)}")
    if cb.shape[1] < 16:  # unused codes: zeros
        cb = np.concatenate([cb, np.zeros((cb.shape[0], 16 - cb.shape[1]), np.float32)], 1)
    cb = np.ascontiguousarray(cb).reshape(-1)
    rows = cb.shape[0] > 16
    gs = group_size if scale is not None else in_features
    sc = _EMPTY if scale is None else np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    off = _EMPTY if offset is None else np.ascontiguousarray(offset, dtype=np.float32).reshape(-1)
    if scale is None and offset is not None:
        raise ValueError("offsets need scales")
    args = (cb, rows, sc, off, gs // 16, in_features // gs, out_features, in_features)
    return lambda x: _gemv4_perm(packed, x, *args)


@functools.cache
def available() -> bool:
    """Whether the register-table kernel runs here: AVX-512F on the host CPU, numba
    compiling for the host, ``WCLUST_SIMD`` not ``0``, and a self-test passing."""
    if os.environ.get("WCLUST_SIMD", "1") == "0" or nb.config.CPU_NAME:
        return False
    try:
        from llvmlite.binding import get_host_cpu_features

        if not get_host_cpu_features().get("avx512f", False):
            return False
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 16, (3, 32))
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        cb = rng.standard_normal((1, 16)).astype(np.float32)
        x = rng.standard_normal(32).astype(np.float32)
        y = gemv4_fn(packed, cb, 3, 32)(x)
        return bool(np.allclose(y, cb[0][codes] @ x, rtol=1e-4, atol=1e-4))
    except Exception:  # no such intrinsic, compile error: the portable kernels run
        return False
