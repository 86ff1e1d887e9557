"""CPU lookup-table kernels that read packed codes directly (numba).

``lut_gemv``: ``y = W @ x`` for one input vector, ``W`` given as packed 4- or 8-bit
codes with one codebook per output row (or one shared codebook, optionally with a
scale/offset per group of consecutive weights). Per row (or group) the kernel
accumulates the inputs into one bin per code (one add per weight, reading
``bits/8`` bytes per weight instead of 4), then takes the dot product of the bins
with the codebook. Rows run in parallel.

``decode``: the dense weight rebuilt from packed codes in one fused parallel pass.

Compiled on first use and cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["decode", "lut_gemv"]


_BLOCK = 64  # output rows per parallel work item (8-bit kernel)


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv4(packed, x0, x1, cb, cb_rows, scale, offset, gsum, gsize, out_f, in_f, y):
    # x0/x1: even/odd inputs (the low/high nibble of each byte), unit-stride loads.
    # Each weight: a lookup in the row's 16-entry codebook (L1-resident) and an FMA.
    nbytes_row = in_f // 2
    has_scale = scale.shape[0] > 0
    has_off = offset.shape[0] > 0
    gpr = in_f // gsize if has_scale else 1  # groups per row
    half = gsize // 2 if has_scale else nbytes_row
    stride = 1 if cb_rows > 1 else 0  # per-row codebooks, or one shared
    for o in nb.prange(out_f):
        t = cb[o * stride]
        base = o * nbytes_row
        acc = np.float32(0.0)
        for gi in range(gpr):
            s = np.float32(0.0)
            for j in range(gi * half, (gi + 1) * half):
                b = packed[base + j]
                s += t[b & 15] * x0[j] + t[b >> 4] * x1[j]
            if has_scale:
                g = o * gpr + gi
                s *= scale[g]
                if has_off:
                    s += offset[g] * gsum[gi]
            acc += s
        y[o] = acc


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv8(packed, x, cb, cb_rows, out_f, in_f, y):
    stride = 1 if cb_rows > 1 else 0
    nblk = (out_f + _BLOCK - 1) // _BLOCK
    for blk in nb.prange(nblk):
        bins = np.empty(256, dtype=np.float32)
        for o in range(blk * _BLOCK, min(out_f, (blk + 1) * _BLOCK)):
            r = o * stride
            base = o * in_f
            bins[:] = 0.0
            for j in range(in_f):
                bins[packed[base + j]] += x[j]
            s = np.float32(0.0)
            for c in range(256):
                s += bins[c] * cb[r, c]
            y[o] = s


@nb.njit(parallel=True, cache=True)
def _decode4(packed, cb, per_cb, out):
    n = out.shape[0]
    half = n // 2
    for j in nb.prange(half):
        b = packed[j]
        i0 = 2 * j
        out[i0] = cb[i0 // per_cb, b & 15]
        out[i0 + 1] = cb[(i0 + 1) // per_cb, b >> 4]
    if n % 2:
        out[n - 1] = cb[(n - 1) // per_cb, packed[half] & 15]


@nb.njit(parallel=True, cache=True)
def _decode8(packed, cb, per_cb, out):
    for i in nb.prange(out.shape[0]):
        out[i] = cb[i // per_cb, packed[i]]


_EMPTY = np.zeros(0, dtype=np.float32)


def lut_gemv(
    packed: np.ndarray,
    bits: int,
    x: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    in_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
) -> np.ndarray:
    """``W @ x`` from packed codes.

    Args:
        packed: uint8 packed codes of W (out, in), row-major, ``core.packing`` format.
        bits: 4 or 8.
        x: (in,) float32.
        codebook: (out, 2**bits) or (1, 2**bits) float32.
        scale, offset: optional (n_groups,) float32 per group of ``group_size``
            consecutive weights of a row (4-bit only).

    Returns:
        (out,) float32.
    """
    y = np.empty(out_features, dtype=np.float32)
    if bits == 4:
        x0 = np.ascontiguousarray(x[0::2])
        x1 = np.ascontiguousarray(x[1::2])
        gsum = _EMPTY
        if offset is not None:  # the offset term needs each group's input sum
            gsum = x.reshape(-1, group_size).sum(1).astype(np.float32)
        sc = _EMPTY if scale is None else scale
        off = _EMPTY if offset is None else offset
        gs = max(group_size, 1)
        _gemv4(
            packed,
            x0,
            x1,
            codebook,
            codebook.shape[0],
            sc,
            off,
            gsum,
            gs,
            out_features,
            in_features,
            y,
        )
    elif bits == 8:
        _gemv8(packed, x, codebook, codebook.shape[0], out_features, in_features, y)
    else:
        raise ValueError(f"lut_gemv supports 4- and 8-bit codes, got {bits}")
    return y


def decode(packed: np.ndarray, bits: int, codebook: np.ndarray, numel: int) -> np.ndarray:
    """Dense values ``codebook[i // per_codebook, code[i]]`` (flat float32)."""
    out = np.empty(numel, dtype=np.float32)
    per = numel // codebook.shape[0]
    if bits == 4:
        _decode4(packed, codebook, per, out)
    elif bits == 8:
        _decode8(packed, codebook, per, out)
    else:
        raise ValueError(f"decode supports 4- and 8-bit codes, got {bits}")
    return out
