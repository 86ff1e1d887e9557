"""Compressed modules: the weight lives in memory as packed codes + codebooks.

``ClusteredWeight`` holds one clustered tensor (packed codes, codebooks) and rebuilds
the dense weight on demand. ``swap_weight`` turns any module with a ``weight``
parameter (Linear, Conv, Embedding, transformers' Conv1D) into a subclass of its own
class whose ``weight`` is a property calling the shared ``ClusteredWeight``: the
module's own forward runs unchanged, ``isinstance`` checks still hold, and two
modules that shared a weight (tied embeddings) share one ``ClusteredWeight``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..core.codebook import ClusteredTensor
from ..core.packing import pack_codes, packed_nbytes, unpack_codes

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ClusteredWeight",
    "RowSplitWeight",
    "base_class",
    "clustered_parts",
    "is_clustered",
    "swap_weight",
    "unswap_weight",
]


_LAYOUT_LOCK = threading.Lock()


def _layout_of(packed: torch.Tensor) -> str:
    return {4: "tiles", 3: "tiles8", 2: "nibbles"}.get(packed.dim(), "rows")


class ClusteredWeight(nn.Module):
    """One clustered weight: packed codes and codebooks as buffers.

    Args:
        packed: 1-D uint8 packed codes (``core.packing`` format).
        codebook: (n_codebooks, n_clusters) centroids in their storage dtype
            (float32/float16/bfloat16, or int8 with ``codebook_scale``).
        codebook_scale: (n_codebooks,) float32 scales for an int8 codebook, else None.
        shape: shape of the clustered tensor (for transformers' Conv1D, the
            transposed (out, in) view).
        bits: code width.
        dtype: dtype of the rebuilt weight.
        transpose: the module stores the weight transposed (Conv1D).
        meta: free-form description kept for reports and files.
        group_scale: optional (n_groups,) scale per group of consecutive weights;
            the weight is then ``codebook[code] * scale[g] + offset[g]`` (NF4, integer
            round-to-nearest, k-means over normalized groups).
        group_offset: optional (n_groups,) offset per group.
        outlier_idx: optional int32 flat indices into the (out, in) clustered view of
            weights stored exactly (dense-and-sparse split, as in SqueezeLLM).
        outlier_val: their float16 values.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        codebook: torch.Tensor,
        codebook_scale: torch.Tensor | None,
        shape: tuple[int, ...],
        bits: int,
        dtype: torch.dtype = torch.float32,
        transpose: bool = False,
        meta: dict | None = None,
        group_scale: torch.Tensor | None = None,
        group_offset: torch.Tensor | None = None,
        outlier_idx: torch.Tensor | None = None,
        outlier_val: torch.Tensor | None = None,
    ):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.bits = int(bits)
        self.dtype = dtype
        self.transpose = bool(transpose)
        self.meta = dict(meta or {})
        if packed.numel() != packed_nbytes(self.numel, self.bits):
            raise ValueError("packed codes do not match shape and bits")
        if self.numel % codebook.shape[0]:
            raise ValueError("codebook rows do not divide the number of weights")
        self.register_buffer("packed", packed)
        self.register_buffer("codebook", codebook)
        if group_scale is not None and self.numel % group_scale.numel():
            raise ValueError("group scales do not divide the number of weights")
        if group_offset is not None and (
            group_scale is None or group_offset.shape != group_scale.shape
        ):
            raise ValueError("group offsets need group scales of the same shape")
        self.register_buffer("codebook_scale", codebook_scale)
        self.register_buffer("group_scale", group_scale)
        self.register_buffer("group_offset", group_offset)
        if (outlier_idx is None) != (outlier_val is None):
            raise ValueError("outlier indices and values go together")
        if outlier_idx is not None:
            if outlier_idx.shape != outlier_val.shape or outlier_idx.dim() != 1:
                raise ValueError("outlier indices and values must be 1-D of one length")
            if outlier_idx.numel() and (
                int(outlier_idx.min()) < 0 or int(outlier_idx.max()) >= self.numel
            ):
                raise ValueError("outlier index out of range")
        self.register_buffer("outlier_idx", outlier_idx)
        self.register_buffer("outlier_val", outlier_val)
        self.cache = False
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_clustered(cls, ct: ClusteredTensor, transpose: bool = False, meta=None):
        """Build from a ``ClusteredTensor`` (codebook cast to its storage dtype)."""
        if ct.codebook_dtype == "int8":
            cb, scale = ct.codebook_int8, ct.codebook_scale.float()
        else:
            cb, scale = ct.codebook.to(getattr(torch, ct.codebook_dtype)), None
        return cls(
            pack_codes(ct.codes, ct.bits), cb, scale, ct.shape, ct.bits, ct.dtype, transpose, meta
        )

    @classmethod
    def from_scaled(cls, sc, transpose: bool = False, meta=None):
        """Build from a ``core.quantizers.ScaledCodes``."""
        return cls(
            pack_codes(sc.codes, sc.bits),
            sc.codebook.float(),
            None,
            sc.shape,
            sc.bits,
            sc.dtype,
            transpose,
            meta,
            sc.scale,
            sc.offset,
        )

    @property
    def n_codebooks(self) -> int:
        return self.codebook.shape[0]

    @property
    def n_clusters(self) -> int:
        """Centroids per codebook."""
        return self.codebook.shape[1]

    def codebook_float(self) -> torch.Tensor:
        cb = self.codebook.float()
        if self.codebook_scale is not None:
            cb = cb * self.codebook_scale[:, None]
        return cb

    @property
    def layout(self) -> str:
        """ "rows": ``packed`` holds the codes 1-D in the ``core.packing`` order;
        "tiles": 4-D, codes of up to 4 bits as 4-bit pairs in the layout of
        ``kernels.lut.tile4``; "tiles8": 3-D, 5- to 8-bit codes one per byte in the
        layout of ``kernels.lut.tile8``; "nibbles": 2-D (out, in / 2), codes of 2 or 3
        bits widened to 4 in row order, for the register-table kernel
        (``kernels.simd``). Such a layout is set on first use when its kernel applies
        (``to_tiles``, ``to_nibbles``). Derived from ``packed`` alone, so a thread
        reading ``packed`` once always sees codes and layout that go together."""
        return _layout_of(self.packed)

    def packed_rows(self) -> torch.Tensor:
        """The packed codes in the ``core.packing`` order (what files store)."""
        p = self.packed
        layout = _layout_of(p)
        if layout == "rows":
            return p
        if layout == "nibbles":  # widened for the kernel: back to the stored width
            return pack_codes(unpack_codes(p.reshape(-1), 4, self.numel), self.bits)
        from ..kernels.lut import untile4, untile8

        out_f = self.shape[0]
        host = p.cpu().numpy()  # the tiled layouts are made and read on the CPU
        if layout == "tiles8":
            rows = pack_codes(torch.from_numpy(untile8(host, out_f)).reshape(-1), self.bits)
        else:
            rows = torch.from_numpy(untile4(host, out_f, self.numel // out_f))
            if self.bits != 4:  # codes of fewer bits were widened to 4 for the kernel
                rows = pack_codes(unpack_codes(rows, 4, self.numel), self.bits)
        return rows.to(p.device)

    def set_packed(self, packed: torch.Tensor) -> None:
        """Replace the codes (``core.packing`` order), e.g. after re-assignment."""
        if packed.numel() != packed_nbytes(self.numel, self.bits):
            raise ValueError("packed codes do not match shape and bits")
        self.packed = packed.reshape(-1)
        self.__dict__.pop("_delta", None)

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, shape ``self.shape``."""
        return unpack_codes(self.packed_rows(), self.bits, self.numel).view(self.shape)

    def trainable(self) -> bool:
        """Whether the codebook, scales or offsets take gradients (fine-tuning)."""
        return any(
            t is not None and t.requires_grad
            for t in (self.codebook, self.group_scale, self.group_offset)
        )

    def dense(self) -> torch.Tensor:
        """The dense weight as the owning module expects it."""
        if self._dense is not None:
            return self._dense
        cb = self.codebook_float()
        n_cb, k = cb.shape
        scaled = False
        trainable = self.trainable()
        on_cpu = _numba_ok(self.packed)
        # the numba decodes: frozen codebook and scales, codes in CPU memory; else
        # the differentiable torch decode (fine-tuning, and GPUs)
        kernels = on_cpu and not trainable
        if not on_cpu and self.layout != "rows":  # tiled on the CPU, then moved
            with _LAYOUT_LOCK:
                self.packed = self.packed_rows()  # back to rows, once
        elif kernels:
            self._to_kernel_layout()  # one layout for both paths; its decode fuses the scales
        packed = self.packed
        tiled = _layout_of(packed) in ("tiles", "tiles8")
        if tiled and kernels:  # scales fused in the pass
            from ..kernels.lut import decode_tiles

            table, sc, off, _ = self._kernel_arrays(table=True)
            dense = decode_tiles(packed.numpy(), table, self.shape[0], sc, off)
            w, scaled = torch.from_numpy(dense.reshape(-1)), True
        elif not tiled and kernels and self.simd_ok():  # register table, scales fused
            from ..kernels.simd import decode4

            table, sc, off, gs = self._kernel_arrays(table=True)
            out_f = self.shape[0]
            dense = decode4(
                packed.numpy().reshape(-1), table, out_f, self.numel // out_f, sc, off, gs
            )
            w, scaled = torch.from_numpy(dense.reshape(-1)), True
        elif not tiled and self.bits in (4, 8) and kernels and not cb.requires_grad:
            from ..kernels.lut import decode  # fused unpack + lookup, parallel

            flat = decode(packed.numpy(), self.bits, cb.contiguous().numpy(), self.numel)
            w = torch.from_numpy(flat)
        else:  # differentiable path (trainable codebook or scales), other widths, GPUs
            w = self._decode_torch(cb)
        if self.group_scale is not None and not scaled:
            w = w.view(self.group_scale.numel(), -1) * self.group_scale.float()[:, None]
            if self.group_offset is not None:
                w = w + self.group_offset.float()[:, None]
        if self.outlier_idx is not None:
            w = w.reshape(-1).index_put((self.outlier_idx.long(),), self.outlier_val.to(w.dtype))
        w = w.view(self.shape).to(self.dtype)
        if self.transpose:
            w = w.t()
        if self.cache:
            self._dense = w
        return w

    def _decode_torch(self, cb: torch.Tensor) -> torch.Tensor:
        n_cb, k = cb.shape
        codes = unpack_codes(self.packed_rows(), self.bits, self.numel).view(n_cb, -1)
        # Flat index into the (n_cb * k) codebook: int32 keeps the temporary small.
        idx = codes.to(torch.int32)
        if n_cb > 1:
            idx = idx + (torch.arange(n_cb, dtype=torch.int32, device=idx.device) * k)[:, None]
        return cb.reshape(-1).index_select(0, idx.reshape(-1))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the (out, in) weight, decoding only those rows' codes."""
        n_rows, d = self.shape[0], self.numel // self.shape[0]
        n_cb = self.n_codebooks
        if (
            self.transpose
            or (d * self.bits) % 8
            or (n_cb > 1 and n_cb % n_rows)
            or (self.group_scale is not None and self.group_scale.numel() % n_rows)
        ):  # codes, codebooks or scale groups straddle rows: decode everything
            return self.dense()[idx]
        per_row = d * self.bits // 8
        packed = self.packed
        layout = _layout_of(packed)
        if layout == "rows":
            sel = packed.view(n_rows, per_row).index_select(0, idx).reshape(-1)
            codes = unpack_codes(sel, self.bits, idx.numel() * d)
        elif layout == "nibbles":
            codes = unpack_codes(packed.index_select(0, idx).reshape(-1), 4, idx.numel() * d)
        else:  # each row's codes: P[:, row // 16, :, row % 16], tile after tile
            from ..kernels.lut import TILE8_IN, TILE_ROWS

            if layout == "tiles8":
                packed = packed.view(packed.shape[0], packed.shape[1], TILE8_IN, TILE_ROWS)
            sel = packed[:, idx // TILE_ROWS, :, idx % TILE_ROWS].reshape(-1)
            codes = sel if layout == "tiles8" else unpack_codes(sel, 4, idx.numel() * d)
        codes = codes.view(idx.numel(), d).long()
        cb = self.codebook_float()
        if n_cb == 1:
            w = cb[0][codes]
        else:  # n_cb // n_rows codebooks per row, each over consecutive elements
            g = n_cb // n_rows
            cbr = cb.view(n_rows, g, -1).index_select(0, idx)  # (n, g, k)
            w = cbr.gather(2, codes.view(idx.numel(), g, -1)).view(idx.numel(), d)
        if self.group_scale is not None:
            gs = self.group_scale.numel() // n_rows
            sc = self.group_scale.float().view(n_rows, gs).index_select(0, idx)[:, :, None]
            w = w.view(idx.numel(), gs, -1) * sc
            if self.group_offset is not None:
                off = self.group_offset.float().view(n_rows, gs).index_select(0, idx)[:, :, None]
                w = w + off
            w = w.reshape(idx.numel(), d)
        if self.outlier_idx is not None and self.outlier_idx.numel():
            # outliers of the selected rows, placed at (position in idx, column)
            o = self.outlier_idx.long()
            o_row, o_col = o // d, o % d
            hit = o_row[:, None] == idx[None, :]  # (n_outliers, n_selected)
            oi, si = hit.nonzero(as_tuple=True)
            w = w.clone()
            w[si, o_col[oi]] = self.outlier_val[oi].to(w.dtype)
        return w.to(self.dtype)

    def lut_ok(self) -> bool:
        """Whether ``matvec`` can run on the packed codes: a tiled layout applies
        (``tiles_ok``), or 4/8-bit codes with one codebook per output row (4-bit
        may add per-group scales) or per tensor."""
        if self.tiles_ok() or self.simd_ok():
            return True
        out_f, in_f = self.shape[0], self.numel // self.shape[0]
        n_cb = self.n_codebooks
        if self.bits == 8:
            return self.group_scale is None and n_cb in (1, out_f)
        if self.bits != 4 or in_f % 2:
            return False
        if self.group_scale is None:
            return n_cb in (1, out_f)
        gs = self.numel // self.group_scale.numel()
        return n_cb == 1 and gs % 2 == 0 and in_f % gs == 0

    def simd_ok(self) -> bool:
        """Whether the AVX-512 register-table kernel (``kernels.simd``) takes this
        weight: codes of 2 to 4 bits (below 4 widened in memory, ``to_nibbles``),
        one codebook per tensor or per output row (of at most 16 entries), rows and
        scale groups of a multiple of 16, on a CPU where the kernel is available."""
        from ..kernels import simd

        out_f, in_f = self.shape[0], self.numel // self.shape[0]
        if not 2 <= self.bits <= 4 or self.layout in ("tiles", "tiles8"):
            return False
        if self.n_codebooks not in (1, out_f) or self.codebook.shape[1] > 16:
            return False
        gs = self.numel // self.group_scale.numel() if self.group_scale is not None else 0
        return simd.simd_ok(in_f, 4, gs) and simd.available()

    def to_nibbles(self) -> None:
        """Widen codes of 2 or 3 bits to 4-bit rows (layout "nibbles") for the
        register-table kernel; files, ``codes()``, ``dense()`` and ``rows()`` are
        unchanged."""
        if not (self.bits < 4 and self.simd_ok()):
            raise ValueError(
                "the nibble layout is for codes of 2 or 3 bits the AVX-512 kernel takes"
            )
        with _LAYOUT_LOCK:
            if self.layout != "rows":
                return
            wide = pack_codes(unpack_codes(self.packed, self.bits, self.numel), 4)
            self.packed = wide.view(self.shape[0], -1)  # one assignment: codes and layout

    def _to_kernel_layout(self) -> None:
        """On first kernel use, move codes stored as rows to the layout their fast
        kernel reads: 2-3-bit codes the register-table kernel takes to nibbles (it
        reads 4-bit rows as stored), other weights a tiled kernel takes to tiles."""
        if self.layout != "rows":
            return
        if self.simd_ok():
            if self.bits < 4:
                self.to_nibbles()
        elif self.tiles_ok():
            self.to_tiles()

    def _kernel_arrays(self, table: bool):
        """(codebook, scale, offset, group size) as the numba kernels read them:
        float32 numpy arrays (None where absent), the codebook padded to ``2**bits``
        entries per row when ``table``; group size 0 without scales."""
        cb = self.codebook_float().detach()
        if table:
            cb = self._table_codebook(cb)
        sc, off = self.group_scale, self.group_offset
        return (
            cb.contiguous().numpy(),
            None if sc is None else sc.detach().float().contiguous().numpy(),
            None if off is None else off.detach().float().contiguous().numpy(),
            self.numel // sc.numel() if sc is not None else 0,
        )

    def tiles_ok(self) -> bool:
        """Whether a tiled kernel applies: one codebook for the tensor and codes of up
        to 8 bits, or one codebook per output row, codes of up to 4 bits and no
        scales; rows (and scale groups within a row) of a multiple of 64 weights
        (codes of up to 4 bits) or of 32 (5 to 8 bits)."""
        from ..kernels.lut import tile_inputs, tiles_ok

        out_f, in_f = self.shape[0], self.numel // self.shape[0]
        n_cb = self.n_codebooks
        per_row = n_cb > 1 and n_cb == out_f and self.bits <= 4 and self.group_scale is None
        if (n_cb != 1 and not per_row) or not tiles_ok(out_f, in_f, self.bits):
            return False
        if self.codebook.shape[1] > (1 << self.bits):
            return False
        if self.group_scale is None:
            return True
        gs = self.numel // self.group_scale.numel()
        return gs % tile_inputs(self.bits) == 0 and in_f % gs == 0

    def to_tiles(self) -> None:
        """Store the codes in the tiled layout of the fast kernels (``layout``):
        codes of up to 4 bits as 4-bit pairs (3-bit codes take 4 bits in memory),
        5- to 8-bit codes one per byte; rows padded to a multiple of 16. Files,
        ``codes()``, ``dense()`` and ``rows()`` are unchanged."""
        from ..kernels.lut import tile4, tile8

        if not self.tiles_ok():
            raise ValueError(
                "the tiled layout needs codes of up to 8 bits, one codebook per tensor, "
                "rows of a multiple of 64 weights (32 for 5 to 8 bits) and scale groups "
                "of such a multiple within a row"
            )
        with _LAYOUT_LOCK:  # two threads running the model must not tile twice
            if self.layout != "rows":
                return
            out_f = self.shape[0]
            in_f = self.numel // out_f
            packed = self.packed
            if self.bits <= 4:
                if self.bits != 4:
                    packed = pack_codes(unpack_codes(packed, self.bits, self.numel), 4)
                tiled = tile4(packed.numpy(), out_f, in_f)
            else:
                codes = unpack_codes(packed, self.bits, self.numel).view(out_f, in_f)
                tiled = tile8(codes.numpy())
            self.packed = torch.from_numpy(tiled)  # one assignment: codes and layout

    def _table_codebook(self, cb: torch.Tensor) -> torch.Tensor:
        """The codebooks as the tiled kernels read them: (n_codebooks, 2**bits), each
        padded with zeros (every code of ``bits`` bits then has an entry)."""
        full = 1 << self.bits
        if cb.shape[1] < full:
            cb = torch.cat([cb, cb.new_zeros(cb.shape[0], full - cb.shape[1])], 1)
        return cb

    def matvec(self, x: torch.Tensor, plan: _Plan | None = None) -> torch.Tensor:
        """``W @ x`` for one vector x of the (out, in) clustered view, read from the
        packed codes (no dense weight is built); with a batched kernel
        (``plan.batched``) x may also be (n <= ``kernels.simd.MAX_BATCH``, in) and
        the result (n, out). Weights that a tiled kernel takes switch to its layout
        on first use (``to_tiles``)."""
        plan = plan or self._plan()
        if not plan.lut_ok:
            raise ValueError(
                f"no lookup-table kernel for this weight ({self.bits}-bit codes, "
                f"{self.n_codebooks} codebooks); use dense()"
            )
        in_f = self.numel // self.shape[0]
        xs = x.detach().float()
        n = xs.numel() // in_f
        xs = xs.reshape(-1) if n == 1 or not plan.batched else xs.reshape(n, in_f)
        y = torch.from_numpy(plan.run(xs.contiguous().numpy()))
        if plan.outliers:
            # the kernel used the codebook value at outlier positions: add the difference
            idx = self.outlier_idx.long()
            y.index_add_(y.dim() - 1, idx // in_f, self._outlier_delta(idx) * xs[..., idx % in_f])
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _plan(self) -> _Plan:
        """What ``matvec`` needs, worked out once per state of the weight (the key
        changes whenever codes, codebook, scales or outliers are replaced or
        modified in place): whether a kernel applies and the call that runs it. A
        weight that a tiled kernel takes switches to its layout here."""
        b = self._buffers
        key = tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS)
        cached = self.__dict__.get("_kargs")
        if cached is not None and cached[0] == key:
            return cached[1]
        if not self.lut_ok():
            plan = _Plan(False, False, False, None, False)
        else:
            from ..kernels.lut import gemv_fn

            self._to_kernel_layout()
            key = tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS)
            simd = self.simd_ok()  # (rows of 4-bit codes or nibbles)
            fast = simd or self.layout != "rows"
            table, sc, off, gs = self._kernel_arrays(table=fast)
            packed, out_f = self.packed.numpy(), self.shape[0]
            in_f = self.numel // out_f
            if simd:
                from ..kernels.simd import gemv4_fn

                run = gemv4_fn(packed.reshape(-1), table, out_f, in_f, sc, off, gs)  # nibbles: 2-D
            else:
                run = gemv_fn(packed, self.bits, table, out_f, in_f, sc, off, gs)
            outliers = self.outlier_idx is not None and self.outlier_idx.numel() > 0
            plan = _Plan(True, fast, simd, run, outliers)
        self.__dict__["_kargs"] = (key, plan)
        return plan

    def _outlier_delta(self, idx: torch.Tensor) -> torch.Tensor:
        """Outlier value minus the codebook value stored at its position (cached: it
        needs a full unpack; the key changes whenever the codebook is modified)."""
        key = (_version_key(self.codebook), idx.numel())
        cached = self.__dict__.get("_delta")
        if cached is not None and cached[0] == key:
            return cached[1]
        codes = unpack_codes(self.packed_rows(), self.bits, self.numel).index_select(0, idx).long()
        cb = self.codebook_float()
        base = cb[idx // (self.numel // cb.shape[0]), codes]
        delta = self.outlier_val.float() - base
        self.__dict__["_delta"] = (key, delta)
        return delta

    def set_cache(self, enabled: bool) -> None:
        """Keep the rebuilt dense weight (speed) or rebuild it per call (memory)."""
        self.cache = bool(enabled)
        if not enabled:
            self._dense = None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: packed codes, codebooks and scales."""
        n = self.packed.numel() + self.codebook.numel() * self.codebook.element_size()
        for t in (
            self.codebook_scale,
            self.group_scale,
            self.group_offset,
            self.outlier_idx,
            self.outlier_val,
        ):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, codebooks={self.n_codebooks}"


class RowSplitWeight(nn.Module):
    """A weight clustered in row ranges, each its own ``ClusteredWeight`` with its own
    code width, codebook and scales (e.g. a token embedding whose frequent rows get
    4-bit codes and the rare rest 3-bit ones). Rows are those of the (out, in)
    clustered view; the parts, in row order, cover it exactly.

    It answers what the compressed modules ask of a ``ClusteredWeight`` (``dense``,
    ``rows``, ``matvec``, ``nbytes``, ...) by asking its parts: each part runs its own
    kernel, and fine-tuning trains every part's codebook and scales.
    """

    def __init__(self, parts: list[ClusteredWeight], transpose: bool = False, meta=None):
        super().__init__()
        if len(parts) < 2:
            raise ValueError("a row split needs at least two parts")
        rest = parts[0].shape[1:]
        if any(p.shape[1:] != rest or p.transpose for p in parts):
            raise ValueError("row-split parts must share their trailing shape, untransposed")
        if len({p.dtype for p in parts}) != 1:
            raise ValueError("row-split parts must rebuild to one dtype")
        self.parts = nn.ModuleList(parts)
        self.shape = (sum(p.shape[0] for p in parts), *rest)
        self.numel = math.prod(self.shape)
        self.dtype = parts[0].dtype
        self.transpose = bool(transpose)
        self.meta = dict(meta or {})
        self.cache = False
        self._dense: torch.Tensor | None = None

    @property
    def bounds(self) -> list[int]:
        """First row of each part, then the number of rows."""
        out = [0]
        for p in self.parts:
            out.append(out[-1] + p.shape[0])
        return out

    @property
    def bits(self) -> int:
        """The widest part's code width."""
        return max(p.bits for p in self.parts)

    @property
    def n_codebooks(self) -> int:
        return sum(p.n_codebooks for p in self.parts)

    @property
    def n_clusters(self) -> int:
        """The largest part's centroids per codebook."""
        return max(p.n_clusters for p in self.parts)

    def trainable(self) -> bool:
        return any(p.trainable() for p in self.parts)

    def dense(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        w = torch.cat([p.dense() for p in self.parts], 0)
        if self.transpose:
            w = w.t()
        if self.cache:
            self._dense = w
        return w

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the (out, in) weight, each decoded by the part holding it."""
        if self.transpose:
            return self.dense()[idx]
        b = torch.tensor(self.bounds, device=idx.device)
        which = torch.bucketize(idx, b[1:], right=True)
        out = None
        for i, p in enumerate(self.parts):
            sel = (which == i).nonzero(as_tuple=True)[0]
            if not sel.numel():
                continue
            r = p.rows(idx[sel] - int(b[i]))
            if out is None:
                out = r.new_empty((idx.numel(), *r.shape[1:]))
            out[sel] = r
        if out is None:  # no rows asked for
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype, device=idx.device)
        return out

    def _plan(self) -> _Plan:
        plans = [p._plan() for p in self.parts]
        return _Plan(
            all(q.lut_ok for q in plans),
            all(q.fast for q in plans),
            all(q.batched for q in plans),
            None,
            False,
        )

    def matvec(self, x: torch.Tensor, plan: _Plan | None = None) -> torch.Tensor:
        """``W @ x``: each part's kernel gives its rows of the result."""
        return torch.cat([p.matvec(x) for p in self.parts], -1)

    set_cache = ClusteredWeight.set_cache  # the same ``cache`` / ``_dense`` pair

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rows={self.bounds}, bits={[p.bits for p in self.parts]}"


def clustered_parts(cw) -> list[ClusteredWeight]:
    """The ``ClusteredWeight``s a clustered weight is made of (itself, or a row
    split's parts)."""
    return list(cw.parts) if isinstance(cw, RowSplitWeight) else [cw]


class _Plan(NamedTuple):
    lut_ok: bool  # matvec applies (see ClusteredWeight.lut_ok)
    fast: bool  # a fast kernel runs (tiled layout, or the AVX-512 register table)
    batched: bool  # run also takes (n <= kernels.simd.MAX_BATCH, in) inputs
    run: Callable[[np.ndarray], np.ndarray] | None  # x (in,) float32 -> W @ x
    outliers: bool  # exact outliers to add after the kernel


_KERNEL_BUFFERS = (
    "packed",
    "codebook",
    "codebook_scale",
    "group_scale",
    "group_offset",
    "outlier_idx",
    "outlier_val",
)


def _numba_ok(t: torch.Tensor) -> bool:
    """Whether the numba kernels can read this tensor (CPU memory)."""
    return t.device.type == "cpu"


def _version_key(t: torch.Tensor | None):
    """Identity of a tensor's current contents (tensors made under
    ``torch.inference_mode`` have no version counter)."""
    if t is None:
        return None
    return (t.data_ptr(), t._version if not t.is_inference() else -1)


class _ClusteredMixin:
    """Mixed in before a module class: ``weight`` comes from ``clustered``."""

    @property
    def weight(self):  # noqa: D401 - property
        return self.clustered.dense()


# A few input rows (a prompt's first decoding step, beam search) take the batched
# register-table kernel, or on a weight this large one tiled matvec per row: both
# beat decoding the dense weight (and keep it from being a temporary the size of
# the fp32 weight: 106 MB for Whisper's output projection).
FEW_ROWS = 8  # at most kernels.simd.MAX_BATCH
FEW_ROWS_MIN_NUMEL = 1 << 22


def _lut_rows(x: torch.Tensor, cw: ClusteredWeight) -> tuple[int, _Plan | None]:
    """How many rows the LUT kernel should take one by one (0: use the dense path),
    and the weight's kernel plan.

    Batch-1 inference on CPU (token-by-token decoding) always; up to ``FEW_ROWS``
    rows with a batched kernel (one call), or for large weights in a tiled layout
    (one call per row)."""
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if n == 0 or not _numba_ok(x) or cw.cache:  # cache: the user chose the dense weight
        return 0, None
    if cw.trainable() or (torch.is_grad_enabled() and x.requires_grad):
        return 0, None  # training (even when evaluating under no_grad): the torch path
    plan = cw._plan()
    if not plan.lut_ok:
        return 0, None
    if n == 1:
        return 1, plan
    if n <= FEW_ROWS and (plan.batched or (cw.numel >= FEW_ROWS_MIN_NUMEL and plan.fast)):
        return n, plan
    return 0, None


class _ClusteredLinearMixin(_ClusteredMixin):
    def forward(self, x):
        cw = self.clustered
        n, plan = _lut_rows(x, cw)
        if n == 1:
            y = cw.matvec(x, plan).view(*x.shape[:-1], -1)
        elif n:
            rows = x.reshape(n, x.shape[-1])
            if plan.batched:
                y = cw.matvec(rows, plan)
            else:
                y = torch.stack([cw.matvec(r, plan) for r in rows])
            y = y.view(*x.shape[:-1], -1)
        else:
            return super().forward(x)
        return y + self.bias if self.bias is not None else y


class _ClusteredEmbeddingMixin(_ClusteredMixin):
    def forward(self, ids, *args, **kwargs):
        cw = self.clustered
        if (
            not args
            and not kwargs
            and base_class(self).forward is nn.Embedding.forward  # not a subclass' own lookup
            and cw._dense is None
            and self.max_norm is None
            and not torch.is_grad_enabled()
        ):
            # decode only those rows (embedding_dim, not -1: no ids is a valid lookup too)
            return cw.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
        # subclasses with their own forward (e.g. Whisper's positional embedding,
        # called with cache_length=...) see the decoded weight through the property
        return super().forward(ids, *args, **kwargs)


def _mixin_for(cls: type) -> type:
    names = {c.__name__ for c in cls.__mro__}
    if issubclass(cls, nn.Linear) or "Conv1D" in names:
        return _ClusteredLinearMixin
    if issubclass(cls, nn.Embedding):
        return _ClusteredEmbeddingMixin
    return _ClusteredMixin


_SUBCLASSES: dict[type, type] = {}


def _clustered_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Clustered{cls.__name__}", (_mixin_for(cls), cls), {})
    return _SUBCLASSES[cls]


def base_class(module: nn.Module) -> type:
    """The original class of a clustered module (the class itself otherwise)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, _ClusteredMixin))


def is_clustered(module: nn.Module) -> bool:
    return isinstance(module, _ClusteredMixin)


def swap_weight(module: nn.Module, cw: ClusteredWeight) -> nn.Module:
    """A copy of ``module`` (same attributes, submodules and other parameters) whose
    weight is rebuilt from ``cw``. The original module is left untouched."""
    new = object.__new__(_clustered_class(type(module)))
    new.__dict__ = dict(module.__dict__)
    new._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._modules["clustered"] = cw
    return new


def unswap_weight(module: nn.Module) -> nn.Module:
    """Plain module of the original class with a dense ``weight`` parameter."""
    base = base_class(module)
    new = object.__new__(base)
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: v for k, v in module._modules.items() if k != "clustered"}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    with torch.no_grad():
        w = module.clustered.dense().detach().clone()
    new._parameters["weight"] = nn.Parameter(w, requires_grad=True)
    return new
