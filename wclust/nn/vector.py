"""A compressed weight with a vector codebook (``core.vector``): one code per
``cluster_dim`` consecutive weights of a row.

``VectorWeight`` answers what the compressed modules of ``nn.modules`` ask of a
``ClusteredWeight`` (``dense``, ``rows``, ``kernel_ok``, ``linear``, ``trainable``,
``set_cache``, ``nbytes``), so ``swap_weight`` and the Linear / Embedding mixins run
it unchanged: linear layers take ``linear`` (a table of centroid dot products per
input row, in torch ops), embeddings ``rows``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.packing import pack_codes, packed_nbytes, unpack_codes
from ..kernels import ops as kernel_ops
from .modules import ClusteredWeight, _version_key

# rows of input a vector Linear runs through the table (a decoder step, beams): up to
# COMPILED_ROWS through the compiled operator, else TABLE_ROWS through torch ops; more
# (the encoder's frames) go through the decoded weight and one matmul
COMPILED_ROWS = 8
TABLE_ROWS = 1

__all__ = ["VectorWeight"]


class VectorWeight(nn.Module):
    """One weight stored as packed vector codes, codebooks of d-dim centroids and
    optional float16 scales per group of consecutive weights.

    Args:
        packed: 1-D uint8 packed codes, one per ``cluster_dim`` weights (row-major
            order of the (out, in) view; ``core.packing`` format, ``bits`` wide).
        codebook: (n_codebooks, n_clusters, cluster_dim) centroids in their storage
            dtype (float32/float16/bfloat16, or int8 with ``codebook_scale``).
        codebook_scale: (n_codebooks,) float32 scales of an int8 codebook, else None.
        shape: shape of the clustered (out, in...) view.
        bits: code width (``ceil(log2(n_clusters))``, up to 16).
        cluster_dim: weights per code.
        dtype: dtype of the rebuilt weight.
        transpose: the module stores the weight transposed (Conv1D).
        meta: free-form description kept for reports and files.
        group_scale: optional (n_groups,) scale per group of consecutive weights.
    """

    # What the fine-tuning code reads on every clustered weight.
    group_offset = None
    outlier_idx = None
    outlier_val = None

    def __init__(
        self,
        packed: torch.Tensor,
        codebook: torch.Tensor,
        codebook_scale: torch.Tensor | None,
        shape: tuple[int, ...],
        bits: int,
        cluster_dim: int,
        dtype: torch.dtype = torch.float32,
        transpose: bool = False,
        meta: dict | None = None,
        group_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.bits = int(bits)
        self.cluster_dim = int(cluster_dim)
        self.dtype = dtype
        self.transpose = bool(transpose)
        self.meta = dict(meta or {})
        d = self.cluster_dim
        row = self.numel // self.shape[0] if len(self.shape) > 1 else self.numel
        if d < 1 or row % d:
            raise ValueError(f"cluster_dim {d} does not divide the rows of {self.shape}")
        if codebook.dim() != 3 or codebook.shape[2] != d:
            raise ValueError(f"a vector codebook is (n_codebooks, n_clusters, {d})")
        if codebook.shape[1] > 1 << self.bits:
            raise ValueError(f"more centroids than {self.bits}-bit codes can address")
        if packed.dim() != 1 or packed.numel() != packed_nbytes(self.numel // d, self.bits):
            raise ValueError("packed codes do not match shape, cluster_dim and bits")
        if (self.numel // d) % codebook.shape[0]:
            raise ValueError("codebooks do not divide the vectors")
        if (codebook_scale is not None) != (codebook.dtype == torch.int8):
            raise ValueError("an int8 codebook needs its scales, and only it has them")
        if codebook_scale is not None and codebook_scale.shape != (codebook.shape[0],):
            raise ValueError("codebook scales: one per codebook")
        if group_scale is not None and (group_scale.dim() != 1 or self.numel % group_scale.numel()):
            raise ValueError("group scales do not divide the number of weights")
        if group_scale is not None and (self.numel // group_scale.numel()) % d:
            raise ValueError("scale groups must hold whole vectors")
        self.register_buffer("packed", packed)
        self.register_buffer("codebook", codebook)
        self.register_buffer("codebook_scale", codebook_scale)
        self.register_buffer("group_scale", group_scale)
        self.cache = False
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_clustered(cls, vc, transpose: bool = False, meta=None) -> VectorWeight:
        """Build from a ``core.vector.VectorClusteredTensor``."""
        if vc.codebook_dtype == "int8":
            cb, scale = vc.codebook_int8, vc.codebook_scale.float()
        else:
            cb, scale = vc.codebook.to(getattr(torch, vc.codebook_dtype)), None
        return cls(
            pack_codes(vc.codes, vc.code_bits),
            cb,
            scale,
            vc.shape,
            vc.code_bits,
            vc.cluster_dim,
            vc.dtype,
            transpose,
            meta,
            vc.scale,
        )

    @property
    def n_codebooks(self) -> int:
        return self.codebook.shape[0]

    @property
    def n_clusters(self) -> int:
        return self.codebook.shape[1]

    @property
    def layout(self) -> str:
        return "rows"

    def codebook_float(self) -> torch.Tensor:
        """(n_codebooks, n_clusters, d) float32 centroids."""
        cb = self.codebook.float()
        if self.codebook_scale is not None:
            cb = cb * self.codebook_scale[:, None, None]
        return cb

    def packed_rows(self) -> torch.Tensor:
        """The packed codes in the ``core.packing`` order (what files store)."""
        return self.packed

    def codes(self) -> torch.Tensor:
        """Unpacked codes, (numel // cluster_dim,)."""
        return unpack_codes(self.packed, self.bits, self.numel // self.cluster_dim)

    def set_packed(self, packed: torch.Tensor) -> None:
        if packed.numel() != packed_nbytes(self.numel // self.cluster_dim, self.bits):
            raise ValueError("packed codes do not match shape and bits")
        self.packed = packed.reshape(-1)
        self.__dict__.pop("_lut", None)
        self.__dict__.pop("_vq", None)

    def trainable(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.codebook, self.group_scale))

    def _flat_index(self) -> torch.Tensor:
        """int64 index of each vector's centroid in the (n_cb * k, d) codebook."""
        n_cb, k = self.codebook.shape[:2]
        idx = self.codes().long().view(n_cb, -1)
        if n_cb > 1:
            idx = idx + (torch.arange(n_cb, device=idx.device) * k)[:, None]
        return idx.reshape(-1)

    def dense(self) -> torch.Tensor:
        """The dense weight as the owning module expects it (differentiable in the
        codebook and scales)."""
        if self._dense is not None:
            return self._dense
        cb = self.codebook_float()
        d = self.cluster_dim
        w = cb.reshape(-1, d).index_select(0, self._flat_index()).reshape(-1)
        if self.group_scale is not None:
            w = (w.view(self.group_scale.numel(), -1) * self.group_scale.float()[:, None]).reshape(
                -1
            )
        w = w.view(self.shape).to(self.dtype)
        if self.transpose:
            w = w.t()
        if self.cache:
            self._dense = w
        return w

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the (out, in) weight, decoding only those rows' codes
        (when codes, codebooks and scale groups do not straddle rows)."""
        n_rows = self.shape[0]
        per_row = self.numel // n_rows  # weights per row
        vecs = per_row // self.cluster_dim  # codes per row
        n_cb = self.n_codebooks
        gs = self.group_scale
        if (
            self.transpose
            or (vecs * self.bits) % 8
            or (n_cb > 1 and n_cb % n_rows)
            or (gs is not None and gs.numel() % n_rows)
        ):
            return self.dense()[idx]
        row_bytes = vecs * self.bits // 8
        sel = self.packed.view(n_rows, row_bytes).index_select(0, idx).reshape(-1)
        codes = unpack_codes(sel, self.bits, idx.numel() * vecs).long().view(idx.numel(), vecs)
        cb = self.codebook_float()  # (n_cb, k, d)
        k, d = cb.shape[1:]
        if n_cb == 1:
            w = cb[0][codes]  # (n, vecs, d)
        else:  # n_cb // n_rows codebooks per row, each over consecutive vectors
            g = n_cb // n_rows
            cbr = cb.view(n_rows, g * k, d).index_select(0, idx)  # (n, g*k, d)
            off = (torch.arange(g, device=codes.device) * k).repeat_interleave(vecs // g)
            w = cbr.gather(1, (codes + off)[:, :, None].expand(-1, -1, d))
        w = w.reshape(idx.numel(), per_row)
        if gs is not None:
            per = gs.numel() // n_rows
            sc = gs.float().view(n_rows, per).index_select(0, idx)[:, :, None]
            w = (w.view(idx.numel(), per, -1) * sc).reshape(idx.numel(), per_row)
        return w.to(self.dtype)

    def lut_ok(self) -> bool:
        """``matvec`` runs on any 2-D weight with one codebook per tensor or per
        group of whole rows, and scale groups within rows."""
        if len(self.shape) != 2:
            return False
        out_f, in_f = self.shape
        n_cb = self.n_codebooks
        if n_cb > 1 and out_f % n_cb:
            return False
        gs = self.group_scale
        return gs is None or in_f % (self.numel // gs.numel()) == 0

    def kernel_ok(self) -> bool:
        """Whether ``linear`` takes the table path: frozen codes in CPU memory and a
        layout ``lut_ok`` accepts."""
        return self.packed.device.type == "cpu" and not self.trainable() and self.lut_ok()

    def _compiled_args(self):
        """(codes, codebook (K, d) float32, scales or None) for ``kernels.ops.vq_linear``:
        up to 256 entries tiles of 16 rows (``vq_tiles``), more int16 rows; kept per
        state of the buffers; None where the compiled operator does not apply (several
        codebooks, scale groups that split a code, the library missing)."""
        if not kernel_ops.available() or self.n_codebooks != 1 or self.n_clusters > 65536:
            return None
        out_f, in_f = self.shape
        d = self.cluster_dim
        gs = self.group_scale
        if in_f % d or (gs is not None and (self.numel // gs.numel()) % d):
            return None
        b = self._buffers
        key = tuple(
            _version_key(b[n]) for n in ("packed", "codebook", "codebook_scale", "group_scale")
        )
        cached = self.__dict__.get("_vq")
        if cached is not None and cached[0] == key:
            return cached[1]
        codes = self.codes().view(out_f, in_f // d)
        if codes.numel() and int(codes.max()) >= self.n_clusters:
            raise ValueError("vector codes point past the codebook; the weight is corrupt")
        scale = None if gs is None else gs.float().view(out_f, -1)
        if self.n_clusters <= 256:  # tiles of 16 rows: one permute per 16 codes
            codes, scale = kernel_ops.vq_tiles(codes.to(torch.uint8), scale, self.n_clusters)
        else:
            codes = codes.to(torch.int16).contiguous()
            scale = None if scale is None else scale.reshape(-1).contiguous()
        args = (codes, self.codebook_float()[0].contiguous(), scale)
        self.__dict__["_vq"] = (key, args)
        return args

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for the (out, in) view: up to ``COMPILED_ROWS`` rows of
        x through the compiled table operator (``kernels.ops.vq_linear``) where it
        applies, else up to ``TABLE_ROWS`` rows each through the torch-op table
        (``matvec``); more rows through the decoded weight. x: (..., in) -> (..., out)."""
        in_f = self.shape[1]
        x2 = x.reshape(-1, in_f)
        args = self._compiled_args() if 0 < x2.shape[0] <= COMPILED_ROWS else None
        if args is not None:
            y = kernel_ops.vq_linear(x2.float().contiguous(), *args, None, self.shape[0])
            y = y.to(x.dtype)
        elif x2.shape[0] <= TABLE_ROWS:
            y = (
                torch.stack([self.matvec(r) for r in x2])
                if x2.shape[0]
                else x2.new_zeros(0, self.shape[0])
            )
        else:
            y = torch.nn.functional.linear(x2.float(), self.dense().float()).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.shape[0])

    def _lut_index(self) -> torch.Tensor:
        """int32 index of each code's entry in the per-call table (kept per state of
        the codes and codebook): rows of ``in / d`` codes, entry ``code * n_vec + j``
        for the j-th vector of a row (its table column), offset per codebook."""
        key = (_version_key(self.packed), self.codebook.shape)
        cached = self.__dict__.get("_lut")
        if cached is not None and cached[0] == key:
            return cached[1]
        out_f, in_f = self.shape
        n_vec = in_f // self.cluster_dim
        n_cb, k = self.codebook.shape[:2]
        codes = self.codes().to(torch.int32).view(out_f, n_vec)
        idx = codes * n_vec + torch.arange(n_vec, dtype=torch.int32)[None, :]
        if n_cb > 1:
            rows_per = out_f // n_cb
            cb_of_row = torch.arange(out_f, dtype=torch.int32) // rows_per
            idx = idx + (cb_of_row * (k * n_vec))[:, None]
        self.__dict__["_lut"] = (key, idx)
        return idx

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x`` for one vector x of the (out, in) view, without the dense weight:
        a table of every centroid's dot product with every d-slice of x
        (``n_clusters x in/d`` per codebook), then one gather per code and a sum per
        row (scaled per group)."""
        if not self.lut_ok():
            raise ValueError("no table matvec for this vector weight; use dense()")
        out_f, in_f = self.shape
        d = self.cluster_dim
        xs = x.detach().float().reshape(in_f // d, d)  # (in/d, d)
        cb = self.codebook_float()  # (n_cb, k, d)
        # (n_cb, k, in/d); one plain 2-D product for a single codebook
        table = cb[0] @ xs.t() if cb.shape[0] == 1 else torch.matmul(cb, xs.t())
        vals = table.reshape(-1).index_select(0, self._lut_index().reshape(-1))
        vals = vals.view(out_f, -1)  # (out, in/d)
        if self.group_scale is None:
            y = vals.sum(1)
        else:
            g = self.group_scale.numel() // out_f
            y = (vals.view(out_f, g, -1).sum(2) * self.group_scale.float().view(out_f, g)).sum(1)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    set_cache = ClusteredWeight.set_cache

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: packed codes, codebooks and scales (not the matvec
        index, built on first use)."""
        n = self.packed.numel() + self.codebook.numel() * self.codebook.element_size()
        for t in (self.codebook_scale, self.group_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, bits={self.bits}, cluster_dim={self.cluster_dim}, "
            f"codebooks={self.n_codebooks}"
        )
