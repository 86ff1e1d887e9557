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

import torch
from torch import nn

from ..core.codebook import ClusteredTensor
from ..core.packing import pack_codes, packed_nbytes, unpack_codes
from ..kernels import ops as kernel_ops

__all__ = [
    "ClusteredWeight",
    "RowSplitWeight",
    "base_class",
    "clustered_parts",
    "is_clustered",
    "prepare_kernels",
    "set_int8_matmul",
    "swap_weight",
    "unswap_weight",
]


_LAYOUT_LOCK = threading.Lock()


def _layout_of(packed: torch.Tensor, bits: int) -> str:
    if packed.dim() == 1:
        return "rows"
    return "nibbles" if bits <= 4 else "bytes"


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
        self.int8_matmul = False  # many-row products in int8 (``set_int8_matmul``)
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
        """ "rows": ``packed`` holds the codes 1-D in the ``core.packing`` order (what
        files store); "nibbles": 2-D (out, in / 2), codes of up to 4 bits as 4-bit
        pairs (input 2k in the low nibble; 1- to 3-bit codes widened); "bytes": 2-D
        (out, in), one 5- to 8-bit code per byte. The compiled kernels
        (``kernels.ops``) read the 2-D layouts; a weight switches on first kernel use
        (for 4- and 8-bit codes the switch is a view, no copy). Derived from
        ``packed`` alone, so a thread reading ``packed`` once sees codes and layout
        that go together."""
        return _layout_of(self.packed, self.bits)

    def packed_rows(self) -> torch.Tensor:
        """The packed codes in the ``core.packing`` order (what files store)."""
        p = self.packed
        if p.dim() == 1:
            return p
        if self.bits in (4, 8):  # the kernel layout is a view of the rows
            return p.reshape(-1)
        if self.bits < 4:  # widened to 4 bits for the kernel: back to the stored width
            return pack_codes(unpack_codes(p.reshape(-1), 4, self.numel), self.bits)
        return pack_codes(p.reshape(-1), self.bits)

    def set_packed(self, packed: torch.Tensor) -> None:
        """Replace the codes (``core.packing`` order), e.g. after re-assignment."""
        if packed.numel() != packed_nbytes(self.numel, self.bits):
            raise ValueError("packed codes do not match shape and bits")
        self.packed = packed.reshape(-1)

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, shape ``self.shape``."""
        return self._flat_codes().view(self.shape)

    def _flat_codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, 1-D, read from whichever layout ``packed`` holds
        (no repacking: the torch decode runs at every training step)."""
        p = self.packed
        layout = _layout_of(p, self.bits)
        if layout == "bytes":
            return p.reshape(-1)
        if layout == "nibbles":
            return unpack_codes(p.reshape(-1), 4, self.numel)
        return unpack_codes(p, self.bits, self.numel)

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
        if self.kernel_ok():  # one fused pass: look-up, scales, outliers
            w = kernel_ops.decode(*self._kernel_args(), *self._outliers())
        else:  # differentiable path (trainable codebook or scales), GPUs, other shapes
            w = self._decode_torch(self.codebook_float())
            if self.group_scale is not None:
                w = w.view(self.group_scale.numel(), -1) * self.group_scale.float()[:, None]
                if self.group_offset is not None:
                    w = w + self.group_offset.float()[:, None]
            if self.outlier_idx is not None:
                idx = (self.outlier_idx.long(),)
                w = w.reshape(-1).index_put(idx, self.outlier_val.to(w.dtype))
        w = w.view(self.shape).to(self.dtype)
        if self.transpose:
            w = w.t()
        if self.cache:
            self._dense = w
        return w

    def _decode_torch(self, cb: torch.Tensor) -> torch.Tensor:
        n_cb, k = cb.shape
        codes = self._flat_codes().view(n_cb, -1)
        # Flat index into the (n_cb * k) codebook: int32 keeps the temporary small.
        idx = codes.to(torch.int32)
        if n_cb > 1:
            idx = idx + (torch.arange(n_cb, dtype=torch.int32, device=idx.device) * k)[:, None]
        return cb.reshape(-1).index_select(0, idx.reshape(-1))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the (out, in) weight, decoding only those rows' codes."""
        n_rows, d = self.shape[0], self.numel // self.shape[0]
        n_cb = self.n_codebooks
        if not self.transpose and self.kernel_ok():
            w = kernel_ops.rows(*self._kernel_args(), idx)
            return self._place_outliers(w, idx).to(self.dtype)
        if (
            self.transpose
            or (d * self.bits) % 8
            or (n_cb > 1 and n_cb % n_rows)
            or (self.group_scale is not None and self.group_scale.numel() % n_rows)
        ):  # codes, codebooks or scale groups straddle rows: decode everything
            return self.dense()[idx]
        per_row = d * self.bits // 8
        packed = self.packed
        layout = _layout_of(packed, self.bits)
        if layout == "rows":
            sel = packed.view(n_rows, per_row).index_select(0, idx).reshape(-1)
            codes = unpack_codes(sel, self.bits, idx.numel() * d)
        elif layout == "nibbles":
            codes = unpack_codes(packed.index_select(0, idx).reshape(-1), 4, idx.numel() * d)
        else:  # bytes: one code per byte
            codes = packed.index_select(0, idx)
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
        return self._place_outliers(w.reshape(idx.numel(), d), idx).to(self.dtype)

    def _place_outliers(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` decoded as ``w`` (n, in), with their outliers put in place."""
        if self.outlier_idx is None or not self.outlier_idx.numel():
            return w
        d = self.numel // self.shape[0]
        o = self.outlier_idx.long()
        o_row, o_col = o // d, o % d
        hit = o_row[:, None] == idx[None, :]  # (n_outliers, n_selected)
        oi, si = hit.nonzero(as_tuple=True)
        w = w.clone()
        w[si, o_col[oi]] = self.outlier_val[oi].to(w.dtype)
        return w

    def kernel_ok(self) -> bool:
        """Whether the compiled kernels (``kernels.ops``) take this weight: frozen
        (no trainable codebook or scales), codes in CPU memory, one codebook per
        tensor or per output row (of at most ``2**bits`` entries), rows of whole
        bytes for codes of up to 4 bits, scale groups within a row. Other weights
        decode with torch ops."""
        if self.packed.device.type != "cpu" or self.trainable():
            return False
        out_f, in_f = self.shape[0], self.numel // self.shape[0]
        if self.n_codebooks not in (1, out_f) or self.codebook.shape[1] > (1 << self.bits):
            return False
        if self.bits <= 4 and in_f % 2:
            return False
        if self.group_scale is not None:
            gs = self.numel // self.group_scale.numel()
            return in_f % gs == 0 and (self.bits > 4 or gs % 2 == 0)
        return True

    def kernel_codes(self) -> torch.Tensor:
        """The codes in the 2-D layout the compiled kernels read (``layout``),
        switching to it once: a view for 4- and 8-bit codes, codes of 1 to 3 bits
        widened to 4-bit pairs, 5 to 7 bits to bytes."""
        p = self.packed
        if p.dim() == 2:
            return p
        with _LAYOUT_LOCK:  # two threads running the model switch once
            p = self.packed
            if p.dim() == 1:
                out_f = self.shape[0]
                if self.bits in (4, 8):
                    p = p.view(out_f, -1)
                else:
                    p = kernel_ops.kernel_layout(p, self.bits, out_f, self.numel // out_f)
                self.packed = p  # one assignment: codes and layout
        return p

    def _kernel_args(self) -> tuple:
        """(codes, code_bits, codebook, scale, offset) as ``kernels.ops`` takes them."""
        cb = self.codebook_float().contiguous()
        sc, off = self.group_scale, self.group_offset
        return (
            self.kernel_codes(),
            4 if self.bits <= 4 else 8,
            cb,
            None if sc is None else sc.float().reshape(-1),
            None if off is None else off.float().reshape(-1),
        )

    def _call_args(self) -> tuple:
        """``_kernel_args()`` and ``_outliers()``, kept between calls in eager mode (a
        decoder runs each layer once per token: rebuilding them cost more than the
        kernel on small layers); the key changes whenever a buffer is replaced or
        modified in place. Under ``torch.compile`` they are traced, not kept."""
        if torch.compiler.is_compiling():
            return (*self._kernel_args(), *self._outliers())
        b = self._buffers
        key = tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS)
        cached = self.__dict__.get("_kargs")
        if cached is not None and cached[0] == key:
            return cached[1]
        args = (*self._kernel_args(), *self._outliers())  # may switch the layout
        key = tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS)
        self.__dict__["_kargs"] = (key, args)
        return args

    def table(self) -> torch.Tensor:
        """``dense()`` for inference code that reads the whole weight on every call (a
        positional embedding slices its table once per generated token): decoded once
        and kept while no buffer changes (the key of ``_call_args``). Rebuilding it per
        token cost time and left many same-sized temporaries on the heap."""
        if self.trainable() or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.dense()
        b = self._buffers
        key = tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS)
        kept = self.__dict__.get("_table")
        if kept is not None and kept[0] == key:
            return kept[1]
        w = self.dense()  # may switch the codes' layout: key them afterwards
        self.__dict__["_table"] = (tuple(_version_key(b[n]) for n in _KERNEL_BUFFERS), w)
        return w

    def _outliers(self) -> tuple:
        """(int32 indices, float16 values) of the exact outliers, or (None, None)."""
        if self.outlier_idx is None or not self.outlier_idx.numel():
            return None, None
        return self.outlier_idx.to(torch.int32), self.outlier_val.to(torch.float16)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for the (out, in) clustered view, read from the packed
        codes by the compiled kernel (``kernel_ok`` weights; no dense weight kept):
        up to 8 rows of x share each code look-up, more rows decode blocks of W for
        the BLAS matmul. x: (..., in) -> (..., out)."""
        in_f = self.numel // self.shape[0]
        x2 = x.reshape(-1, in_f).float()
        b = None if bias is None else bias.float()
        if self.int8_matmul and x2.shape[0] > INT8_MIN_ROWS:
            y = kernel_ops.linear_int8(x2, *self._call_args(), b)
        else:
            y = kernel_ops.linear(x2, *self._call_args(), b)
        return y.view(*x.shape[:-1], self.shape[0]).to(x.dtype)

    def set_cache(self, enabled: bool) -> None:
        """Keep the rebuilt dense weight (speed) or rebuild it per call (memory)."""
        self.cache = bool(enabled)
        if not enabled:
            self._dense = None
            self.__dict__.pop("_table", None)

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
    ``rows``, ``linear``, ``nbytes``, ...) by asking its parts: each part runs its own
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

    def kernel_ok(self) -> bool:
        return all(p.kernel_ok() for p in self.parts)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias``: each part's kernel gives its rows of the result."""
        y = torch.cat([p.linear(x) for p in self.parts], -1)
        return y if bias is None else y + bias

    set_cache = ClusteredWeight.set_cache  # the same ``cache`` / ``_dense`` pair

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rows={self.bounds}, bits={[p.bits for p in self.parts]}"


# Products with more rows than this run in int8 when ``int8_matmul`` is on (an
# encoder's frames, cross-attention over them); decoder steps keep the exact lookups.
INT8_MIN_ROWS = 64


def set_int8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Run ``model``'s compressed Linear layers' many-row products (more than
    ``INT8_MIN_ROWS`` rows) in int8: each row of the input quantized to int8 with its
    own absmax scale, the decoded weight quantized to int8 per output row, an int8
    GEMM (VNNI where the CPU has it) summing in int32. Faster on compute-bound inputs
    (a Whisper encoder's 1500 frames); it adds the error of 8-bit activations, so
    measure the quality it keeps. Returns the number of weights switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, ClusteredWeight):
            m.int8_matmul = bool(enabled)
            n += 1
    return n


def prepare_kernels(model: nn.Module) -> None:
    """Make now what a compressed model's first forward would: every weight the
    compiled kernels take in their code layout with its call arguments, and the
    positional tables that subclasses read whole (``table``). Called right after
    loading, so these long-lived tensors sit together instead of between the first
    forward's activations, where they left holes that grew a whisper-base process by
    ~50-100 MB while it transcribed. Without the compiled kernels it does nothing."""
    if not kernel_ops.available():
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ClusteredWeight) and not m.cache and m.kernel_ok():
                m._call_args()
            elif _reads_whole_table(m):
                m.weight  # noqa: B018 - keeps the table (``table``)


def clustered_parts(cw) -> list[ClusteredWeight]:
    """The ``ClusteredWeight``s a clustered weight is made of (itself, or a row
    split's parts)."""
    return list(cw.parts) if isinstance(cw, RowSplitWeight) else [cw]


_KERNEL_BUFFERS = (
    "packed",
    "codebook",
    "codebook_scale",
    "group_scale",
    "group_offset",
    "outlier_idx",
    "outlier_val",
)


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


def _kernel_path(x: torch.Tensor, cw) -> bool:
    """Whether a compressed Linear runs the compiled kernel on ``x``: inference on
    the CPU (not training, even under no_grad: a trainable codebook takes the torch
    path) and no cached dense weight (the user chose it)."""
    if x.device.type != "cpu" or cw.cache or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return cw.kernel_ok()


class _ClusteredLinearMixin(_ClusteredMixin):
    def forward(self, x):
        cw = self.clustered
        if _kernel_path(x, cw):
            return cw.linear(x, self.bias)
        return super().forward(x)


def _reads_whole_table(module) -> bool:
    """A clustered embedding whose class has its own lookup (positional tables): it
    reads the whole weight on every call."""
    return (
        isinstance(module, _ClusteredEmbeddingMixin)
        and base_class(module).forward is not nn.Embedding.forward
        and hasattr(module.clustered, "table")
    )


class _ClusteredEmbeddingMixin(_ClusteredMixin):
    @property
    def weight(self):  # noqa: D401 - property
        return self.clustered.table() if _reads_whole_table(self) else self.clustered.dense()

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
