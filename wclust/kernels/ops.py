"""The compiled lookup-table kernels as torch operators, with a torch-op fallback.

``wclust._C`` (built from ``wclust/csrc/lut.cpp`` by ``pip install``) registers
``torch.ops.wclust.lut_linear``, ``lut_decode``, ``lut_rows`` and ``vq_linear``; this module gives
them fake (meta) implementations, so ``torch.compile`` and ``torch.export`` see one
operator per compressed layer, and wraps them. Where the library is missing (not
built, build failed) or ``WCLUST_KERNELS=torch`` is set, the same functions run
plain torch ops (decode, then ``F.linear``) after one warning.

Kernel layouts (derived at load from the canonical file packing):
    codes (out, in / 2) uint8 with ``code_bits`` 4: two codes per byte, input 2k in
        the low nibble (codes of 1 to 3 bits widened to 4);
    codes (out, in) uint8 with ``code_bits`` 8: one code per byte (5 to 8 bits).
A weight is ``codebook[row or 0, code] * scale[g] + offset[g]``; ``codebook`` is
(1 or out, K) float32, ``scale``/``offset`` (out * in / group,) float32 by (row,
group); outliers (int32 flat indices into (out, in), float16 values) replace it.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch
import torch.nn.functional as F

__all__ = ["available", "decode", "isa", "linear", "rows", "vq_linear", "vq_tiles"]


_AVAILABLE: bool | None = None  # decided on first use


def available() -> bool:
    """Whether the compiled kernels run (the library loads, ``WCLUST_KERNELS`` is not
    ``torch``); warns once when they do not."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _load()
    return _AVAILABLE


def _load() -> bool:
    if os.environ.get("WCLUST_KERNELS", "") == "torch":
        return False
    try:
        importlib.import_module("wclust._C")  # loading the library registers the operators
    except ImportError as e:
        warnings.warn(
            f"wclust: compiled kernels not built ({e}); running torch ops instead (slower, "
            "more memory). Build them with `pip install -e .` in the wclust checkout.",
            stacklevel=3,
        )
        return False
    _register_fakes()
    return True


def isa(cap: str = "") -> str:
    """The instruction set the compiled kernels use ("avx512", "avx2", "portable"),
    or "torch" without them; ``cap`` lowers it (tests, comparisons) or "best" restores
    it."""
    return torch.ops.wclust.isa(cap) if available() else "torch"


def _in_features(codes: torch.Tensor, code_bits: int) -> int:
    return codes.shape[1] * (2 if code_bits == 4 else 1)


_FAKES: list = []  # registered once per process (a second registration is an error)


def _register_fakes() -> None:
    if _FAKES:
        return
    _FAKES.append(True)

    @torch.library.register_fake("wclust::lut_linear")
    def _(x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("wclust::lut_decode")
    def _(codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val):
        return codebook.new_empty(codes.shape[0], _in_features(codes, code_bits))

    @torch.library.register_fake("wclust::lut_linear_int8")
    def _(x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("wclust::kernel_layout")
    def _(packed, bits, rows, cols):
        return packed.new_empty(rows, cols // 2 if bits < 4 else cols)

    @torch.library.register_fake("wclust::vq_linear")
    def _(x, codes, codebook, scale, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("wclust::lut_rows")
    def _(codes, code_bits, codebook, scale, offset, idx):
        return codebook.new_empty(idx.numel(), _in_features(codes, code_bits))


def kernel_layout(packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """Codes of 1-3 or 5-7 bits from their canonical bit stream (``core.packing``) to
    the layout the kernels read: 4-bit pairs (rows, cols / 2) for up to 3 bits, one
    byte per code (rows, cols) above."""
    if available():
        return torch.ops.wclust.kernel_layout(packed, bits, rows, cols)
    from ..core.packing import pack_codes, unpack_codes

    codes = unpack_codes(packed, bits, rows * cols)
    return (pack_codes(codes, 4) if bits < 4 else codes).view(rows, -1)


def linear(x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias):
    """``x @ W.T + bias`` read from the codes: x (n, in) float32 -> (n, out). Up to 8
    rows share each code look-up; more rows decode blocks of W for the BLAS matmul."""
    if available():
        return torch.ops.wclust.lut_linear(
            x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias
        )
    w = decode(codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val)
    return F.linear(x, w, bias)


def linear_int8(x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias):
    """``linear`` in int8 arithmetic for many rows: x quantized per row (absmax),
    W decoded block by block and quantized per output row, an int8 GEMM summing in
    int32 (VNNI where the CPU has it). Adds the error of 8-bit activations and of
    rounding the decoded weights to 8 bits per row."""
    if available():
        return torch.ops.wclust.lut_linear_int8(
            x, codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val, bias
        )
    w = decode(codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val)

    def quantize(v):  # per row, as the compiled operator rounds
        amax = v.abs().amax(1, keepdim=True)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        return torch.round(v * (1 / s)).to(torch.int32), s

    (qx, sx), (qw, sw) = quantize(x.float()), quantize(w)
    y = (qx @ qw.t()).float() * sx * sw.t()
    return y if bias is None else y + bias


def vq_linear(x, codes, codebook, scale, bias, out_features):
    """``x @ W.T + bias`` for vector codes: one code per ``d`` consecutive inputs of a
    row, one codebook (K, d) float32 for the tensor, scale per group of whole codes
    within a row or None. Codes as rows (out, in / d) uint8 or int16 (read as uint16)
    with scale (out * groups,), or uint8 tiles of 16 rows with scales tiled alike (the
    layouts of ``vq_tiles``). Codes must lie below K. Per row of x a
    table of every centroid's dot product with every d-slice of x, then one look-up per
    code (16 codes per permute for tiles). On AVX2, tiles of up to 64 centroids look up
    int16-rounded tables by byte shuffles (32 codes per shuffle): one table scale per
    chunk of up to 8 slices within a scale group, each output off by at most half a
    table step per code (1/8190 of the chunk's largest entry) times its scale."""
    if available():
        return torch.ops.wclust.vq_linear(x, codes, codebook, scale, bias, out_features)
    if codes.dim() == 3:  # tiles back to rows
        if codebook.shape[0] > 64:  # slice-major
            codes = codes.permute(1, 0, 2)
        codes = codes.permute(0, 2, 1).reshape(-1, codes.shape[1])[:out_features]
        if scale is not None:
            scale = scale.permute(0, 2, 1).reshape(-1, scale.shape[1])[:out_features]
    idx = codes.long() & 0xFFFF if codes.dtype == torch.int16 else codes.long()
    w = codebook[idx].reshape(out_features, -1)
    if scale is not None:
        scale = scale.reshape(-1)
        w = (w.view(scale.numel(), -1) * scale[:, None]).view(out_features, -1)
    return F.linear(x, w, bias)


def vq_tiles(codes: torch.Tensor, scale: torch.Tensor | None, n_clusters: int):
    """Row codes (out, in / d) uint8 and scales (out, groups) or None -> the tiled
    layout ``vq_linear`` reads fastest: blocks of 16 rows side by side, rows padded with
    code 0 and scale 0. Codes (ceil(out / 16), in / d, 16) for up to 64 centroids
    (a slice's table stays in registers across a block), slice-major (in / d,
    ceil(out / 16), 16) above (a slice's table serves every block); scales
    (ceil(out / 16), groups, 16) either way."""
    out_f = codes.shape[0]
    pad = -out_f % 16
    c = torch.nn.functional.pad(codes, (0, 0, 0, pad)).view(-1, 16, codes.shape[1])
    c = (c.permute(0, 2, 1) if n_clusters <= 64 else c.permute(2, 0, 1)).contiguous()
    if scale is None:
        return c, None
    s = torch.nn.functional.pad(scale.reshape(out_f, -1), (0, 0, 0, pad))
    return c, s.view(-1, 16, s.shape[1]).permute(0, 2, 1).contiguous()


def decode(codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val):
    """The dense (out, in) float32 weight."""
    if available():
        return torch.ops.wclust.lut_decode(
            codes, code_bits, codebook, scale, offset, outlier_idx, outlier_val
        )
    w = _decode_torch(codes, code_bits, codebook, scale, offset)
    if outlier_idx is not None:
        w = w.view(-1).index_put((outlier_idx.long(),), outlier_val.float()).view(w.shape)
    return w


def rows(codes, code_bits, codebook, scale, offset, idx):
    """Rows ``idx`` (1-D int64) of the dense weight, (len(idx), in) float32, without
    outliers (the caller places them)."""
    if available():
        return torch.ops.wclust.lut_rows(codes, code_bits, codebook, scale, offset, idx)
    out_f = codes.shape[0]
    cb = codebook if codebook.shape[0] == 1 else codebook.index_select(0, idx)
    if scale is not None:
        scale = scale.view(out_f, -1).index_select(0, idx)
        offset = None if offset is None else offset.view(out_f, -1).index_select(0, idx)
    return _decode_torch(codes.index_select(0, idx), code_bits, cb, scale, offset)


def _decode_torch(codes, code_bits, codebook, scale, offset):
    out_f = codes.shape[0]
    if code_bits == 4:  # (out, in / 2) -> (out, in): low nibble first
        codes = torch.stack([codes & 15, codes >> 4], -1).view(out_f, -1)
    idx = codes.long()
    w = codebook[0][idx] if codebook.shape[0] == 1 else codebook.gather(1, idx)
    if scale is not None:
        n_groups = scale.numel() // out_f
        w = w.view(out_f, n_groups, -1) * scale.view(out_f, n_groups, 1)
        if offset is not None:
            w = w + offset.view(out_f, n_groups, 1)
        w = w.view(out_f, -1)
    return w
