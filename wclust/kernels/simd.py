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
inputs of a row (a multiple of 16). Up to ``MAX_BATCH`` input rows share each
look-up (``_gemm4_perm``); ``decode4`` writes the dense weight with the same look-up.

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

__all__ = ["MAX_BATCH", "available", "decode4", "gemv4_fn", "simd_ok"]

_F32 = ir.FloatType()
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V16F = ir.VectorType(_F32, 16)
_V8I8, _V8I32 = ir.VectorType(_I8, 8), ir.VectorType(_I32, 8)
_V16I32 = ir.VectorType(_I32, 16)


def _elem_ptr(context, builder, arr_type, arr, offset, elem):
    a = context.make_array(arr_type)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [offset]), elem.as_pointer())


def _lookup16(builder, table, cptr, i):
    """Chunk ``i``: its 8 code bytes -> the 16 codebook values, inputs in order."""
    mod = builder.module
    perm = cgutils.get_or_insert_function(
        mod, ir.FunctionType(_V16F, [_V16F, _V16I32]), "llvm.x86.avx512.permvar.sf.512"
    )
    c8 = builder.gep(cptr, [builder.mul(i, ir.Constant(i.type, 8))])
    w = builder.zext(builder.load(builder.bitcast(c8, _V8I8.as_pointer()), align=1), _V8I32)
    lo = builder.and_(w, ir.Constant(_V8I32, [15] * 8))
    hi = builder.lshr(w, ir.Constant(_V8I32, [4] * 8))
    # byte k holds inputs 2k (low nibble) and 2k+1: lanes (lo0, hi0, lo1, hi1, ...)
    interleave = ir.Constant(_V16I32, [v for k in range(8) for v in (k, k + 8)])
    return builder.call(perm, [table, builder.shuffle_vector(lo, hi, interleave)])


def _fma(builder, a, b, c):
    f = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]), "llvm.fma.v16f32"
    )
    return builder.call(f, [a, b, c])


def _vec_at(builder, base, index):
    """The 16 floats from element ``index`` of float pointer ``base``."""
    return builder.bitcast(builder.gep(base, [index]), _V16F.as_pointer())


def _hsum(builder, v):
    for half in (8, 4, 2, 1):  # pairwise sum of the 16 lanes
        lo = ir.Constant(ir.VectorType(_I32, half), list(range(half)))
        hi = ir.Constant(ir.VectorType(_I32, half), list(range(half, 2 * half)))
        v = builder.fadd(builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _common(context, builder, ty, args):
    """(codebook register, code pointer) from (cb, cb_off, codes, code_off, ...)."""
    table = builder.load(_elem_ptr(context, builder, ty[0], args[0], args[1], _V16F), align=4)
    return table, _elem_ptr(context, builder, ty[2], args[2], args[3], _I8)


@intrinsic
def _dot16(typingctx, cb, cb_off, codes, code_off, x, x_off, n_chunks):
    """``sum(cb[cb_off + code[i]] * x[x_off + i])`` over ``16 * n_chunks`` weights
    whose 4-bit codes start at byte ``code_off`` of ``codes``."""
    sig = types.float32(cb, types.intp, codes, types.intp, x, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        table, cptr = _common(context, builder, signature.args, args)
        xptr = _elem_ptr(context, builder, signature.args[4], args[4], args[5], _F32)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
        with cgutils.for_range(builder, args[6]) as loop:
            i = loop.index
            vals = _lookup16(builder, table, cptr, i)
            xv = builder.load(
                _vec_at(builder, xptr, builder.mul(i, ir.Constant(i.type, 16))), align=4
            )
            builder.store(_fma(builder, vals, xv, builder.load(acc)), acc)
        return _hsum(builder, builder.load(acc))

    return sig, codegen


MAX_BATCH = 8  # input rows one call of the batched kernel takes


@intrinsic
def _dot16_batch(typingctx, cb, cb_off, codes, code_off, x, x_off, ldx, nb_, n_chunks, out):
    """``out[b] = sum(cb[cb_off + code[i]] * x[b * ldx + x_off + i])`` for ``b <
    nb_ <= MAX_BATCH``: each chunk's 16 values are looked up once for all rows. For a
    single row ``_dot16`` stays: its accumulator lives in a register, and it ran
    3-5x faster than this one with ``nb_ = 1`` (512x512 to 4096x4096)."""
    sig = types.void(
        cb, types.intp, codes, types.intp, x, types.intp, types.intp, types.intp, types.intp, out
    )

    def codegen(context, builder, signature, args):
        ty = signature.args
        table, cptr = _common(context, builder, ty, args)
        xptr = _elem_ptr(context, builder, ty[4], args[4], args[5], _F32)
        ldx, nrows, n = args[6], args[7], args[8]
        optr = _elem_ptr(context, builder, ty[9], args[9], ir.Constant(ldx.type, 0), _F32)
        accs = cgutils.alloca_once(builder, _V16F, size=MAX_BATCH)
        with cgutils.for_range(builder, nrows) as r:
            builder.store(ir.Constant(_V16F, [0.0] * 16), builder.gep(accs, [r.index]))
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            vals = _lookup16(builder, table, cptr, i)
            col = builder.mul(i, ir.Constant(i.type, 16))
            with cgutils.for_range(builder, nrows) as r:
                b = r.index
                xv = builder.load(
                    _vec_at(builder, xptr, builder.add(builder.mul(b, ldx), col)), align=4
                )
                slot = builder.gep(accs, [b])
                builder.store(_fma(builder, vals, xv, builder.load(slot)), slot)
        with cgutils.for_range(builder, nrows) as r:
            b = r.index
            builder.store(
                _hsum(builder, builder.load(builder.gep(accs, [b]))), builder.gep(optr, [b])
            )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _decode16(typingctx, cb, cb_off, codes, code_off, out, out_off, n_chunks, scale, offset):
    """``out[out_off + i] = cb[cb_off + code[i]] * scale + offset`` for ``16 *
    n_chunks`` weights."""
    sig = types.void(
        cb, types.intp, codes, types.intp, out, types.intp, types.intp, types.float32, types.float32
    )

    def codegen(context, builder, signature, args):
        ty = signature.args
        table, cptr = _common(context, builder, ty, args)
        optr = _elem_ptr(context, builder, ty[4], args[4], args[5], _F32)
        sv = ir.Constant(_V16F, ir.Undefined)
        ov = ir.Constant(_V16F, ir.Undefined)
        for k in range(16):
            sv = builder.insert_element(sv, args[7], ir.Constant(_I32, k))
            ov = builder.insert_element(ov, args[8], ir.Constant(_I32, k))
        with cgutils.for_range(builder, args[6]) as loop:
            i = loop.index
            vals = _lookup16(builder, table, cptr, i)
            dst = _vec_at(builder, optr, builder.mul(i, ir.Constant(i.type, 16)))
            builder.store(_fma(builder, vals, sv, ov), dst, align=4)
        return context.get_dummy_value()

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


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemm4_perm(packed, X, cb, cb_rows, scale, offset, chunks, n_groups, out_f, in_f):
    # X: (n <= MAX_BATCH, in_f) C-contiguous; returns (n, out_f).
    n = X.shape[0]
    Y = np.zeros((n, out_f), dtype=np.float32)
    row_bytes = in_f // 2
    xsum = np.zeros((n, n_groups), dtype=np.float32)
    if offset.shape[0] > 0:
        for b in range(n):
            for g in range(n_groups):
                for j in range(g * chunks * 16, (g + 1) * chunks * 16):
                    xsum[b, g] += X[b, j]
    Xf = X.reshape(-1)
    for o in nb.prange(out_f):
        cbo = o * 16 if cb_rows else 0
        d = np.empty(MAX_BATCH, dtype=np.float32)
        for g in range(n_groups):
            _dot16_batch(
                cb,
                cbo,
                packed,
                o * row_bytes + g * chunks * 8,
                Xf,
                g * chunks * 16,
                in_f,
                n,
                chunks,
                d,
            )
            for b in range(n):
                v = d[b]
                if scale.shape[0] > 0:
                    v *= scale[o * n_groups + g]
                    if offset.shape[0] > 0:
                        v += offset[o * n_groups + g] * xsum[b, g]
                Y[b, o] += v
    return Y


@nb.njit(parallel=True, cache=True)
def _decode4_perm(packed, cb, cb_rows, scale, offset, chunks, n_groups, out_f, in_f):
    out = np.empty(out_f * in_f, dtype=np.float32)
    row_bytes = in_f // 2
    for o in nb.prange(out_f):
        cbo = o * 16 if cb_rows else 0
        for g in range(n_groups):
            s = scale[o * n_groups + g] if scale.shape[0] > 0 else np.float32(1.0)
            f = offset[o * n_groups + g] if offset.shape[0] > 0 else np.float32(0.0)
            _decode16(
                cb,
                cbo,
                packed,
                o * row_bytes + g * chunks * 8,
                out,
                o * in_f + g * chunks * 16,
                chunks,
                s,
                f,
            )
    return out.reshape(out_f, in_f)


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


def _kernel_args(codebook, out_features, in_features, scale, offset, group_size):
    if not simd_ok(in_features, 4, group_size if scale is not None else 0):
        raise ValueError(
            f"the register-table kernel needs rows of a multiple of 16 inputs and scale "
            f"groups of such a multiple (in_features {in_features}, group {group_size})"
        )
    cb = np.asarray(codebook, dtype=np.float32).reshape(-1, codebook.shape[-1])
    if cb.shape[0] not in (1, out_features) or cb.shape[1] > 16:
        raise ValueError(f"codebook must be (1 or {out_features}, <= 16), got {tuple(cb.shape)}")
    if scale is None and offset is not None:
        raise ValueError("offsets need scales")
    if cb.shape[1] < 16:  # unused codes: zeros
        cb = np.concatenate([cb, np.zeros((cb.shape[0], 16 - cb.shape[1]), np.float32)], 1)
    cb = np.ascontiguousarray(cb).reshape(-1)
    rows = cb.shape[0] > 16
    gs = group_size if scale is not None else in_features
    sc = _EMPTY if scale is None else np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    off = _EMPTY if offset is None else np.ascontiguousarray(offset, dtype=np.float32).reshape(-1)
    return (cb, rows, sc, off, gs // 16, in_features // gs, out_features, in_features)


def gemv4_fn(
    packed: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    in_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
):
    """``x @ W.T`` as a function of ``x`` for row-major packed 4-bit codes: ``x``
    float32 C-contiguous, (in,) -> (out,), or (n <= MAX_BATCH, in) -> (n, out) (each
    chunk of codes looked up once for all n rows).

    Args:
        packed: uint8 ``core.packing`` codes of W (out, in), row-major.
        codebook: (1, <=16) shared or (out, <=16) per-row float32; padded to 16.
        scale, offset: optional (out * in / group_size,) float32, by (row, group).
    """
    args = _kernel_args(codebook, out_features, in_features, scale, offset, group_size)

    def run(x):
        if x.ndim == 1:
            return _gemv4_perm(packed, x, *args)
        if x.shape[0] > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} rows per call, got {x.shape[0]}")
        return _gemm4_perm(packed, x, *args)

    return run


def decode4(
    packed: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    in_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
) -> np.ndarray:
    """The dense (out, in) float32 weight ``cb[code] (* scale + offset)`` from
    row-major packed 4-bit codes, in one parallel pass; arguments as ``gemv4_fn``."""
    args = _kernel_args(codebook, out_features, in_features, scale, offset, group_size)
    return _decode4_perm(packed, *args)


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
