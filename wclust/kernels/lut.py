"""CPU lookup-table kernels that read packed codes directly (numba).

``lut_gemv``: ``y = W @ x`` for one input vector, ``W`` given as packed 4- or 8-bit
codes with one codebook per output row (or one shared codebook, optionally with a
scale/offset per group of consecutive weights). Per row (or group) the kernel
accumulates the inputs into one bin per code (one add per weight, reading
``bits/8`` bytes per weight instead of 4), then takes the dot product of the bins
with the codebook. Rows run in parallel.

``decode``: the dense weight rebuilt from packed codes in one fused parallel pass.

``lut_gemv_tiles``: the fast path for codes with ONE codebook shared by the
whole tensor (NF4, int4, the learned per-tensor codebook over scaled groups), with
optional per-group scales and offsets. Activation-side lookup tables (T-MAC, arXiv
2407.00088): for each pair of inputs ``(x[2j], x[2j+1])`` a 256-entry table holds
``cb[lo] * x[2j] + cb[hi] * x[2j+1]`` for every byte ``hi << 4 | lo``, so one table
read serves two weights and no multiply is left per weight. The codes are stored
in a tiled layout (``tile4``): tiles of 32 input pairs (64 inputs; the table of a
tile is 32 KB and stays in L1) x blocks of 16 output rows, the 16 rows' bytes of one
pair adjacent, so one block reads 16 independent entries of one table row. Each
thread takes its own range of tiles (it builds only those tables) and keeps a
partial output; the partials are summed at the end. Codes of fewer bits (2, 3) use
the same layout and kernel (the codebook padded to 16 entries). Codes of 5 to 8
bits use a byte layout (``tile8``: tiles of 32 inputs x 16 rows, one code per
byte) and one table of ``cb * x[j]`` per input (at most 32 x 256 floats = 32 KB):
one table read and add per weight, a quarter of the bytes fp32 reads. One 16-entry
codebook per output row (per-channel k-means, codes of up to 4 bits) takes the 4-bit
tiled layout too (``_gemv4_tiles_rowcb``): the codebooks of a block of 16 rows (1 KB)
stay in L1 and each weight is one look-up and one multiply-add, 16 rows at a time.

Compiled on first use and cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = [
    "decode",
    "decode_tiles",
    "gemv_fn",
    "lut_gemv",
    "lut_gemv_tiles",
    "tile4",
    "tile8",
    "untile4",
    "untile8",
]


_BLOCK = 64  # output rows per parallel work item (8-bit kernel)
TILE_PAIRS = 32  # input pairs per tile of the tiled 4-bit layout (64 inputs)
TILE_ROWS = 16  # output rows per block of the tiled layouts
TILE8_IN = 32  # inputs per tile of the tiled byte layout (5- to 8-bit codes)


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


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv4_tiles(P, x, cb, scale, offset, tiles_per_group, out_f, n_thr):
    # P: (n_tiles, n_blocks, TILE_PAIRS, TILE_ROWS) uint8, byte = hi << 4 | lo of a
    # row's inputs (2j, 2j+1). scale/offset: (out_f, n_groups) or empty.
    # Thread t sums its tiles into its own partial output; returns (out_f,).
    n_tiles, n_blocks = P.shape[0], P.shape[1]
    ypart = np.zeros((n_thr, n_blocks * TILE_ROWS), dtype=np.float32)
    K = cb.shape[0]
    for t in nb.prange(n_thr):
        T = np.empty((TILE_PAIRS, K * K), dtype=np.float32)
        acc = np.empty(TILE_ROWS, dtype=np.float32)
        yp = ypart[t]
        for jt in range(t * n_tiles // n_thr, (t + 1) * n_tiles // n_thr):
            xs = np.float32(0.0)
            for jj in range(TILE_PAIRS):
                xa = x[2 * (jt * TILE_PAIRS + jj)]
                xb = x[2 * (jt * TILE_PAIRS + jj) + 1]
                xs += xa + xb
                # K (= 16) read at run time: with a constant 16, LLVM unrolls the
                # inner loop and vectorizes the outer one into scatters (40% of the
                # time on 512x2048); this way each table row is 16 contiguous stores.
                for hi in range(K):
                    h = cb[hi] * xb
                    for lo in range(K):
                        T[jj, hi * K + lo] = cb[lo] * xa + h
            g = jt // tiles_per_group
            for rb in range(n_blocks):
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = np.float32(0.0)
                for jj in range(TILE_PAIRS):
                    Tj = T[jj]
                    p = P[jt, rb, jj]
                    a0 += Tj[p[0]]
                    a1 += Tj[p[1]]
                    a2 += Tj[p[2]]
                    a3 += Tj[p[3]]
                    a4 += Tj[p[4]]
                    a5 += Tj[p[5]]
                    a6 += Tj[p[6]]
                    a7 += Tj[p[7]]
                    a8 += Tj[p[8]]
                    a9 += Tj[p[9]]
                    a10 += Tj[p[10]]
                    a11 += Tj[p[11]]
                    a12 += Tj[p[12]]
                    a13 += Tj[p[13]]
                    a14 += Tj[p[14]]
                    a15 += Tj[p[15]]
                acc[0], acc[1], acc[2], acc[3] = a0, a1, a2, a3
                acc[4], acc[5], acc[6], acc[7] = a4, a5, a6, a7
                acc[8], acc[9], acc[10], acc[11] = a8, a9, a10, a11
                acc[12], acc[13], acc[14], acc[15] = a12, a13, a14, a15
                _add_block(yp, acc, rb * TILE_ROWS, out_f, scale, offset, g, xs)
    return _sum_parts(ypart, out_f)


@nb.njit(inline="always", cache=True)
def _add_block(yp, acc, o, out_f, scale, offset, g, xs):
    # A block's sums (rows o .. o + 15 of one tile) into the thread's partial output,
    # times the rows' scale of group g (+ offset * the tile's input sum) when given.
    n = min(TILE_ROWS, out_f - o)
    if scale.shape[0] > 0:
        for r in range(n):
            acc[r] *= scale[o + r, g]
            if offset.shape[0] > 0:
                acc[r] += offset[o + r, g] * xs
    for r in range(n):
        yp[o + r] += acc[r]


@nb.njit(cache=True)
def _sum_parts(ypart, out_f):
    y = np.empty(out_f, dtype=np.float32)
    for o in range(out_f):
        s = np.float32(0.0)
        for t in range(ypart.shape[0]):
            s += ypart[t, o]
        y[o] = s
    return y


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv4_tiles_rowcb(P, x, cbs, out_f, n_thr):
    # One 16-entry codebook per output row (per-channel k-means), same tiled layout.
    # cbs: (n_blocks, 16 rows, 16 entries), the codebooks of a block of 16 rows (1 KB,
    # in L1) next to each other: per weight one look-up in its row's codebook and one
    # multiply-add, 16 rows at a time (no activation tables: they would differ per row).
    n_tiles, n_blocks = P.shape[0], P.shape[1]
    ypart = np.zeros((n_thr, n_blocks * TILE_ROWS), dtype=np.float32)
    for t in nb.prange(n_thr):
        acc = np.empty(TILE_ROWS, dtype=np.float32)
        yp = ypart[t]
        for jt in range(t * n_tiles // n_thr, (t + 1) * n_tiles // n_thr):
            for rb in range(n_blocks):
                C = cbs[rb]
                for r in range(TILE_ROWS):
                    acc[r] = 0.0
                for jj in range(TILE_PAIRS):
                    xa = x[2 * (jt * TILE_PAIRS + jj)]
                    xb = x[2 * (jt * TILE_PAIRS + jj) + 1]
                    p = P[jt, rb, jj]
                    for r in range(TILE_ROWS):
                        b = p[r]
                        acc[r] += C[r, b & 15] * xa + C[r, b >> 4] * xb
                o = rb * TILE_ROWS
                for r in range(TILE_ROWS):
                    yp[o + r] += acc[r]
    return _sum_parts(ypart, out_f)


@nb.njit(parallel=True, cache=True, fastmath=True)
def _gemv8_tiles(P, x, cb, scale, offset, tiles_per_group, out_f, n_thr):
    # P: (n_tiles, n_blocks, TILE8_IN * TILE_ROWS) uint8 codes, the 16 rows' codes of
    # one input adjacent; cb: (K,) with every code < K. For each input of a tile a
    # K-entry table cb * x[j] (32 x 256 floats = 32 KB at most, in L1): one table
    # read and add per weight, 16 rows at a time.
    n_tiles, n_blocks = P.shape[0], P.shape[1]
    K = cb.shape[0]
    ypart = np.zeros((n_thr, n_blocks * TILE_ROWS), dtype=np.float32)
    for t in nb.prange(n_thr):
        T = np.empty((TILE8_IN, K), dtype=np.float32)
        acc = np.empty(TILE_ROWS, dtype=np.float32)
        yp = ypart[t]
        for jt in range(t * n_tiles // n_thr, (t + 1) * n_tiles // n_thr):
            xs = np.float32(0.0)
            for jj in range(TILE8_IN):
                xj = x[jt * TILE8_IN + jj]
                xs += xj
                for c in range(K):
                    T[jj, c] = cb[c] * xj
            g = jt // tiles_per_group
            for rb in range(n_blocks):
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = np.float32(0.0)
                pb = P[jt, rb]
                for jj in range(TILE8_IN):
                    Tj = T[jj]
                    q = jj * TILE_ROWS
                    a0 += Tj[pb[q]]
                    a1 += Tj[pb[q + 1]]
                    a2 += Tj[pb[q + 2]]
                    a3 += Tj[pb[q + 3]]
                    a4 += Tj[pb[q + 4]]
                    a5 += Tj[pb[q + 5]]
                    a6 += Tj[pb[q + 6]]
                    a7 += Tj[pb[q + 7]]
                    a8 += Tj[pb[q + 8]]
                    a9 += Tj[pb[q + 9]]
                    a10 += Tj[pb[q + 10]]
                    a11 += Tj[pb[q + 11]]
                    a12 += Tj[pb[q + 12]]
                    a13 += Tj[pb[q + 13]]
                    a14 += Tj[pb[q + 14]]
                    a15 += Tj[pb[q + 15]]
                acc[0], acc[1], acc[2], acc[3] = a0, a1, a2, a3
                acc[4], acc[5], acc[6], acc[7] = a4, a5, a6, a7
                acc[8], acc[9], acc[10], acc[11] = a8, a9, a10, a11
                acc[12], acc[13], acc[14], acc[15] = a12, a13, a14, a15
                _add_block(yp, acc, rb * TILE_ROWS, out_f, scale, offset, g, xs)
    return _sum_parts(ypart, out_f)


@nb.njit(parallel=True, cache=True)
def _decode8_tiles(P, cb, scale, offset, out):
    # out: (out_f, in_f) float32 = cb[code] (* scale + offset), from the byte tiles.
    n_tiles, n_blocks = P.shape[0], P.shape[1]
    out_f, in_f = out.shape
    K = cb.shape[0]
    has_scale = scale.shape[0] > 0
    has_off = offset.shape[0] > 0
    gsize = in_f // scale.shape[1] if has_scale else in_f
    for rb in nb.prange(n_blocks):
        t = np.empty(K, dtype=np.float32)
        for jt in range(n_tiles):
            c0 = jt * TILE8_IN
            g = c0 // gsize
            for r in range(min(TILE_ROWS, out_f - rb * TILE_ROWS)):
                o = rb * TILE_ROWS + r
                s = scale[o, g] if has_scale else np.float32(1.0)
                b0 = offset[o, g] if has_off else np.float32(0.0)
                for c in range(K):
                    t[c] = cb[c] * s + b0
                row = out[o]
                for jj in range(TILE8_IN):
                    row[c0 + jj] = t[P[jt, rb, jj * TILE_ROWS + r]]


@nb.njit(parallel=True, cache=True)
def _decode4_tiles(P, cb, scale, offset, out):
    # out: (out_f, in_f) float32 in the canonical row order; cb: (1, 16) shared or
    # (>= out_f, 16) one per row; scale/offset: (out_f, n_groups) or empty: out =
    # cb[code] * scale + offset, fused (a tile of 64 inputs lies in one group). Each
    # (tile, row) writes 64 consecutive floats.
    n_tiles, n_blocks = P.shape[0], P.shape[1]
    per_row = cb.shape[0] > 1
    out_f, in_f = out.shape
    has_scale = scale.shape[0] > 0
    has_off = offset.shape[0] > 0
    gsize = in_f // scale.shape[1] if has_scale else in_f
    for rb in nb.prange(n_blocks):
        t = np.empty(16, dtype=np.float32)
        for jt in range(n_tiles):
            g = (jt * 2 * TILE_PAIRS) // gsize
            c0 = jt * 2 * TILE_PAIRS
            for r in range(min(TILE_ROWS, out_f - rb * TILE_ROWS)):
                o = rb * TILE_ROWS + r
                s = scale[o, g] if has_scale else np.float32(1.0)
                b0 = offset[o, g] if has_off else np.float32(0.0)
                cr = cb[o] if per_row else cb[0]
                for c in range(16):
                    t[c] = cr[c] * s + b0
                row = out[o]
                for jj in range(TILE_PAIRS):
                    b = P[jt, rb, jj, r]
                    row[c0 + 2 * jj] = t[b & 15]
                    row[c0 + 2 * jj + 1] = t[b >> 4]


def tile_inputs(bits: int) -> int:
    """Inputs per tile of the tiled layout for codes of this width: 64 for codes of
    up to 4 bits (stored as 4-bit pairs), 32 for 5 to 8 bits (stored as bytes)."""
    return 2 * TILE_PAIRS if bits <= 4 else TILE8_IN


def tiles_ok(out_features: int, in_features: int, bits: int = 4) -> bool:
    """Whether a weight of this shape and code width can use a tiled layout."""
    return (
        1 <= bits <= 8
        and out_features > 0
        and in_features > 0
        and in_features % tile_inputs(bits) == 0
    )


def tile4(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """Row-major packed 4-bit codes (``core.packing``) -> the tiled layout
    ``(n_tiles, n_blocks, TILE_PAIRS, TILE_ROWS)``; rows padded to a multiple of 16
    with code 0 (ignored by the kernel)."""
    if not tiles_ok(out_features, in_features):
        raise ValueError(
            f"the tiled 4-bit layout needs in_features divisible by {2 * TILE_PAIRS}, "
            f"got {in_features}"
        )
    n_pairs = in_features // 2
    n_blocks = -(-out_features // TILE_ROWS)
    rows = np.zeros((n_blocks * TILE_ROWS, n_pairs), dtype=np.uint8)
    rows[:out_features] = packed[: out_features * n_pairs].reshape(out_features, n_pairs)
    t = rows.reshape(n_blocks, TILE_ROWS, n_pairs // TILE_PAIRS, TILE_PAIRS)
    return np.ascontiguousarray(t.transpose(2, 0, 3, 1))


def untile4(tiled: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """Inverse of ``tile4``: flat row-major packed codes."""
    n_tiles, n_blocks = tiled.shape[:2]
    rows = tiled.transpose(1, 3, 0, 2).reshape(n_blocks * TILE_ROWS, n_tiles * TILE_PAIRS)
    return np.ascontiguousarray(rows[:out_features]).reshape(-1)


def tile8(codes: np.ndarray) -> np.ndarray:
    """(out, in) uint8 codes, one per byte -> the tiled byte layout
    ``(n_tiles, n_blocks, TILE8_IN * TILE_ROWS)``: tiles of 32 inputs x blocks of 16
    rows, the 16 rows' codes of one input adjacent; rows padded with code 0."""
    out_f, in_f = codes.shape
    if not tiles_ok(out_f, in_f, 8):
        raise ValueError(
            f"the tiled byte layout needs in_features divisible by {TILE8_IN}, got {in_f}"
        )
    n_blocks = -(-out_f // TILE_ROWS)
    rows = np.zeros((n_blocks * TILE_ROWS, in_f), dtype=np.uint8)
    rows[:out_f] = codes
    t = rows.reshape(n_blocks, TILE_ROWS, in_f // TILE8_IN, TILE8_IN).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(t).reshape(in_f // TILE8_IN, n_blocks, TILE8_IN * TILE_ROWS)


def untile8(tiled: np.ndarray, out_features: int) -> np.ndarray:
    """Inverse of ``tile8``: (out, in) uint8 codes."""
    n_tiles, n_blocks = tiled.shape[:2]
    t = tiled.reshape(n_tiles, n_blocks, TILE8_IN, TILE_ROWS).transpose(1, 3, 0, 2)
    return np.ascontiguousarray(t.reshape(n_blocks * TILE_ROWS, n_tiles * TILE8_IN)[:out_features])


def _tile_args(tiled, codebook, out_features, scale, offset, group_size):
    """Shared checks of the tiled kernels: (in_features, codebook, scale, offset,
    tiles per scale group)."""
    nibbles = tiled.ndim == 4
    tin = 2 * TILE_PAIRS if nibbles else TILE8_IN  # inputs per tile
    in_f = tiled.shape[0] * tin
    cb = codebook.reshape(-1, codebook.shape[-1])  # (1, K) shared or (out, K) per row
    if cb.shape[0] not in (1, out_features) or (cb.shape[0] > 1 and not nibbles):
        raise ValueError(
            f"codebook rows must be 1 (shared) or {out_features} (per row, codes of up to "
            f"4 bits), got {cb.shape[0]}"
        )
    if nibbles and cb.shape[1] != 16:  # codes of fewer bits: the unused entries stay 0
        if cb.shape[1] > 16:
            raise ValueError(f"4-bit tiles need at most 16 codebook entries, got {cb.shape[1]}")
        cb = np.concatenate([cb, np.zeros((cb.shape[0], 16 - cb.shape[1]), np.float32)], 1)
    if cb.shape[0] > 1:
        if scale is not None:
            raise ValueError("per-row codebooks take no group scales")
        n_blocks = tiled.shape[1]  # one (16, 16) block of codebooks per block of rows
        full = np.zeros((n_blocks * TILE_ROWS, 16), dtype=np.float32)
        full[:out_features] = cb
        cb = full.reshape(n_blocks, TILE_ROWS, 16)
    tiles_per_group = 1
    sc = off = _EMPTY2
    if scale is not None:
        if group_size <= 0 or group_size % tin or in_f % group_size:
            raise ValueError(
                f"group size {group_size} must be a multiple of {tin} dividing in_features {in_f}"
            )
        tiles_per_group = group_size // tin
        sc = scale.reshape(out_features, in_f // group_size)
        if offset is not None:
            off = offset.reshape(out_features, in_f // group_size)
    return in_f, cb, sc, off, tiles_per_group


def lut_gemv_tiles(
    tiled: np.ndarray,
    x: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
) -> np.ndarray:
    """``W @ x`` for codes in a tiled layout with one codebook shared by the whole
    tensor, optionally times ``scale`` (+ ``offset``) per group of ``group_size``
    consecutive inputs of a row.

    Args:
        tiled: uint8 codes from ``tile4`` (4-D: codes of up to 4 bits, pair tables;
            ``group_size`` a multiple of 64) or ``tile8`` (3-D: 5- to 8-bit codes,
            one table per input; ``group_size`` a multiple of 32).
        x: (in,) float32.
        codebook: (K,) or (1, K) float32 shared by the tensor: K <= 16 for
            ``tile4``; for ``tile8`` every code must be < K (pad the codebook to
            ``2**bits`` entries). Or (out, K <= 16): one codebook per row, ``tile4``
            only, no scales.
        scale, offset: (out * in / group_size,) float32, row-major by (row, group).

    Returns:
        (out,) float32.
    """
    return _tiles_fn(tiled, codebook, out_features, scale, offset, group_size)(x)


def _tiles_fn(tiled, codebook, out_features, scale, offset, group_size):
    """The tiled GEMV for this layout and codebook, as a function of x."""
    _, cb, sc, off, tpg = _tile_args(tiled, codebook, out_features, scale, offset, group_size)
    n_thr = max(1, min(nb.get_num_threads(), tiled.shape[0]))
    if cb.ndim == 3:  # one codebook per row
        return lambda x: _gemv4_tiles_rowcb(tiled, x, cb, out_features, n_thr)
    kernel = _gemv4_tiles if tiled.ndim == 4 else _gemv8_tiles
    cb = cb[0]
    return lambda x: kernel(tiled, x, cb, sc, off, tpg, out_features, n_thr)


def gemv_fn(
    packed: np.ndarray,
    bits: int,
    codebook: np.ndarray,
    out_features: int,
    in_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    group_size: int = 0,
):
    """``W @ x`` as a function of ``x`` alone, with the checks and reshaping done
    once (what a compressed layer calls once per decoding step). ``packed`` in a
    tiled layout (3-D or 4-D) runs ``lut_gemv_tiles``, row-major packed codes
    ``lut_gemv``; arguments as there."""
    if packed.ndim == 1:
        return lambda x: lut_gemv(
            packed, bits, x, codebook, out_features, in_features, scale, offset, group_size
        )
    return _tiles_fn(packed, codebook, out_features, scale, offset, group_size)


def decode_tiles(
    tiled: np.ndarray,
    codebook: np.ndarray,
    out_features: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Dense (out, in) float32 ``codebook[code] (* scale + offset)`` from a tiled
    layout (``tile4`` or ``tile8``); ``scale``/``offset`` per group of consecutive
    inputs of a row, row-major."""
    in_f = tiled.shape[0] * (2 * TILE_PAIRS if tiled.ndim == 4 else TILE8_IN)
    gs = 0 if scale is None else in_f * out_features // scale.size
    in_f, cb, sc, off, _ = _tile_args(tiled, codebook, out_features, scale, offset, gs)
    out = np.empty((out_features, in_f), dtype=np.float32)
    if tiled.ndim == 4:
        _decode4_tiles(tiled, cb.reshape(-1, 16), sc, off, out)
    else:
        _decode8_tiles(tiled, cb[0], sc, off, out)
    return out


_EMPTY = np.zeros(0, dtype=np.float32)
_EMPTY2 = np.zeros((0, 0), dtype=np.float32)


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
