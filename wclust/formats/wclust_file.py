"""The .wclust file: safetensors tensors + a versioned JSON header. No pickle.

Layout: a standard safetensors file. Its string metadata holds
``wclust`` (the JSON header) and ``wclust_sha256`` (SHA-256 over the header text and
every tensor's name, dtype, shape and bytes, in name order), so a truncated or
altered file is rejected. Tensors:

- ``clustered.<i>.codes`` (uint8 packed codes), ``clustered.<i>.codebook`` (storage
  dtype), ``clustered.<i>.scale`` (int8 codebooks only): one clustered weight, used
  by the modules listed under ``owners`` in the header;
- or, in files saved with ``entropy=``, ``clustered.<i>.entropy`` (uint8) instead of
  ``codes``: the codes entropy-coded (``core.entropy``: Huffman or ANS, with their
  code tables; pruned weights as a sparse index of coded gaps); the header entry's
  ``entropy`` says how. Such files have format version 2; files without entropy
  coding are still written as version 1, so older readers keep reading them.
- a weight clustered in row ranges (``RowSplitWeight``) has ``parts`` in its header
  entry, each stored like a clustered weight under ``clustered.<i>.part<j>.*`` with
  its ``rows``; such files have format version 3.
- a weight with a vector codebook (``nn.vector.VectorWeight``, one code per
  ``cluster_dim`` weights) has ``cluster_dim`` in its entry, a 3-D codebook
  (n_codebooks, n_clusters, cluster_dim) and codes of up to 16 bits; such files
  have format version 4.
- every other parameter and buffer under its own module path; a tensor used under
  several names is stored once, the other names listed in ``aliases``.

The header also names the architecture: for transformers models the class name and
its config, rebuilt on load from an allow-list (PreTrainedModel subclasses);
other models need a ``model_factory``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..nn.modules import (
    ClusteredWeight,
    RowSplitWeight,
    base_class,
    clustered_parts,
    prepare_kernels,
    set_int8_matmul,
    swap_weight,
)
from ..nn.owners import clustered_weights, layer_type, set_module
from ..nn.vector import VectorWeight

__all__ = ["FORMAT_VERSION", "FormatError", "load", "read_header", "save", "stored_bytes"]

# 2: entropy-coded codes; 3: row-split weights; 4: vector codebooks (each file says
# the lowest version that has what it uses, so older readers keep reading the rest)
FORMAT_VERSION = 4
VECTOR_VERSION = 4
MAX_HEADER_BYTES = 64 << 20
# Largest clustered weight a header may declare (2**36 weights, 64 Gi): a bound on
# what decoding may allocate, checked before any tensor is read.
MAX_NUMEL = 1 << 36
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


class FormatError(ValueError):
    """The file is not a valid .wclust file (or not one this version can read)."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _digest_parts(header_text: str, parts) -> str:
    """The file checksum: SHA-256 over the header text, then per tensor in name order
    its name, dtype, shape and bytes. ``parts`` yields ``(name, dtype, shape, chunks)``
    in name order, ``chunks`` an iterable of byte buffers."""
    h = hashlib.sha256(header_text.encode())
    for name, dtype, shape, chunks in parts:
        h.update(f"\0{name}\0{_dtype_name(dtype)}\0{list(shape)}\0".encode())
        for chunk in chunks:
            h.update(chunk)
    return h.hexdigest()


def _digest(header_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """The checksum of tensors held in memory (what ``load`` verifies)."""
    return _digest_parts(
        header_text,
        (
            (n, tensors[n].dtype, tensors[n].shape, [_tensor_view(tensors[n].contiguous())])
            for n in sorted(tensors)
        ),
    )


def _arch(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if (
        cfg is not None
        and hasattr(cfg, "to_dict")
        and type(model).__module__.startswith("transformers")
    ):
        gen = getattr(model, "generation_config", None)
        return {
            "kind": "transformers",
            "class": type(model).__name__,
            "config": cfg.to_dict(),
            "generation_config": gen.to_dict() if gen is not None else None,
        }
    return {"kind": "torch", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    report=None,
    config=None,
    source: str | None = None,
    extra: dict | None = None,
    entropy: str | None = None,
) -> Path:
    """Write a clustered model to ``path`` atomically (temp file + rename).

    Args:
        model: a model processed by ``compress_`` (or any model: nothing clustered).
        path: destination; an existing file is replaced only once the new one is
            complete.
        report: the ``CompressionReport`` to keep in the header (for ``inspect``).
        config: the ``ClusterConfig`` used.
        source: model name or path the model came from (lets ``load`` find the
            matching processor/tokenizer).
        extra: more JSON-serializable metadata.
        entropy: None (packed fixed-width codes), "huffman" or "ans": entropy-code
            the codes, with pruned weights (``keep_zeros``) stored as a sparse
            index of coded gaps. Smaller on disk; decoded exactly on load.

    Returns:
        The path written.
    """
    from ..core.entropy import CODERS

    if entropy is not None and entropy not in CODERS:
        raise ValueError(f"entropy must be None or one of {', '.join(CODERS)}; got {entropy!r}")
    writer = FileWriter(path, spill=False)
    entries = []
    for i, (cw, owners) in enumerate(clustered_weights(model).values()):
        entries.append(add_clustered(writer, f"clustered.{i}", cw, owners, entropy))
    aliases = {}
    for stored, t, alias_of in plain_tensors(model):
        if alias_of is not None:
            aliases[stored] = alias_of
        else:
            writer.add(stored, t.detach())
    header = make_header(model, entries, aliases, config, report, source, extra, entropy)
    return writer.finish(header)


def add_clustered(writer: FileWriter, key: str, cw, owners, entropy) -> dict:
    """Add one clustered weight's tensors to ``writer``; returns its header entry.
    A row split stores each part as its own tensor entry (``<key>.part<j>``) under
    ``parts``, with its rows."""
    entry = {
        "key": key,
        "owners": [n for n, _ in owners],
        "owner_types": [base_class(m).__name__ for _, m in owners],
        "shape": list(cw.shape),
        "transpose": cw.transpose,
        "meta": cw.meta,
    }
    if any(getattr(p, "int8_matmul", False) for p in clustered_parts(cw)):
        entry["int8_matmul"] = True  # a runtime setting the loaded model keeps
    if not isinstance(cw, RowSplitWeight):
        return {**entry, **_add_tensor(writer, key, cw, entropy)}
    entry["parts"] = [
        {**_add_tensor(writer, f"{key}.part{j}", part, entropy), "rows": [start, end]}
        for j, (part, start, end) in enumerate(
            zip(cw.parts, cw.bounds[:-1], cw.bounds[1:], strict=True)
        )
    ]
    return entry


def _add_tensor(writer: FileWriter, key: str, cw: ClusteredWeight, entropy) -> dict:
    """Add one ClusteredWeight's codes, codebook and side tables; returns the header
    fields that describe them (key, shape, bits, dtype, meta, entropy)."""
    info = None
    vector = isinstance(cw, VectorWeight)
    if vector and entropy is not None:
        raise ValueError(
            f"{key}: entropy coding works with scalar codebooks; save vector codebooks "
            "(cluster_dim > 1) with entropy=None"
        )
    if entropy is None:
        writer.add(f"{key}.codes", cw.packed_rows())
    else:
        blob, info = _entropy_encode(cw, entropy)
        writer.add(f"{key}.entropy", blob)
    writer.add(f"{key}.codebook", cw.codebook.detach())  # trainable while fine-tuning
    for suffix, t in (
        ("scale", cw.codebook_scale),
        ("group_scale", cw.group_scale),
        ("group_offset", cw.group_offset),
        ("outlier_idx", cw.outlier_idx),
        ("outlier_val", cw.outlier_val),
    ):
        if t is not None:
            writer.add(f"{key}.{suffix}", t)
    return {
        "key": key,
        "shape": list(cw.shape),
        "bits": cw.bits,
        "dtype": _dtype_name(cw.dtype),
        "meta": cw.meta,
        **({"entropy": info} if info is not None else {}),
        **({"cluster_dim": cw.cluster_dim} if vector else {}),
    }


def plain_tensors(model: nn.Module, skip: set[int] = frozenset()):
    """Every parameter and buffer ``save`` stores under its own name.

    Yields ``(stored name, tensor, None)`` for the first name of each tensor
    (``p:<path>`` for parameters, ``b:<path>`` for buffers) and ``(path, None, first
    path)`` for a tensor met again under another name. ClusteredWeight internals and
    tensors whose id is in ``skip`` are left out.
    """
    first_name: dict[int, str] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (ClusteredWeight, VectorWeight)):
            continue
        for kind, store in (("p", mod._parameters), ("b", mod._buffers)):
            for attr, t in store.items():
                if t is None or id(t) in skip:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                if id(t) in first_name:
                    if first_name[id(t)] != full:
                        yield full, None, first_name[id(t)]
                    continue
                first_name[id(t)] = full
                yield f"{kind}:{full}", t, None


def make_header(model, entries, aliases, config, report, source, extra, entropy) -> dict:
    """The JSON header of a .wclust file (see the module docstring)."""
    vector = any("cluster_dim" in p for e in entries for p in [e, *e.get("parts", ())])
    version = 3 if any("parts" in e for e in entries) else 2 if entropy else 1
    return {
        "format": "wclust",
        "version": VECTOR_VERSION if vector else version,
        "arch": _arch(model),
        "clustered": entries,
        "aliases": aliases,
        "config": config.to_dict() if config is not None else None,
        # the recipe that made the file (wclust compress --recipe FILE makes it again)
        "recipe": report.recipe if report is not None else None,
        "report": report.to_dict() if report is not None else None,
        "source": source,
        "extra": extra or {},
    }


class FileWriter:
    """Writes a .wclust (safetensors) file one tensor at a time, atomically.

    With ``spill=True`` each added tensor's bytes go straight to a temporary file
    next to ``path``, so the caller needs only one tensor in memory at a time (the
    larger-than-memory path); otherwise the tensors are kept by reference.
    ``finish(header)`` writes the canonical file (tensors in name order, SHA-256 in
    the metadata) to a temporary name and renames it over ``path``; on any error,
    or ``abort()``, nothing is left behind and an existing ``path`` is untouched.
    """

    _CHUNK = 16 << 20

    def __init__(self, path: str | os.PathLike, spill: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._items: dict[str, tuple] = {}  # name -> (dtype, shape, tensor | (offset, n))
        self._spill = None
        if spill:
            self._spill = tempfile.NamedTemporaryFile(
                prefix=f".{self.path.name}.", suffix=".spill", dir=self.path.parent
            )
        self._offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._items:
            raise ValueError(f"tensor {name!r} added twice")
        t = t.detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        if self._spill is None:
            self._items[name] = (t.dtype, list(t.shape), t)
            return
        n = t.numel() * t.element_size()
        self._spill.write(_tensor_view(t))
        self._items[name] = (t.dtype, list(t.shape), (self._offset, n))
        self._offset += n

    def _chunks(self, name: str):
        _, _, src = self._items[name]
        if isinstance(src, torch.Tensor):
            yield _tensor_view(src)
            return
        offset, n = src
        self._spill.flush()
        with open(self._spill.name, "rb") as f:
            f.seek(offset)
            while n > 0:
                buf = f.read(min(n, self._CHUNK))
                if not buf:
                    raise OSError(f"spill file ended early while writing {name}")
                n -= len(buf)
                yield buf

    def digest(self, header_text: str) -> str:
        """The checksum of what was added (see ``_digest_parts``)."""
        return _digest_parts(
            header_text,
            ((n, *self._items[n][:2], self._chunks(n)) for n in sorted(self._items)),
        )

    def finish(self, header: dict) -> Path:
        """Write the file (checksummed header, then every tensor) and rename it into place."""
        text = json.dumps(header, sort_keys=True, default=str)
        meta = {"wclust": text, "wclust_sha256": self.digest(text)}
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(fd)
        try:
            self._write_file(tmp, meta)
            # mkstemp creates 0600; give the file the mode any new file would get.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self.abort()
        return self.path

    def _write_file(self, target: str, meta: dict[str, str]) -> None:
        """A standard safetensors file with a canonical header (sorted keys, tensors in
        name order), so equal inputs give byte-identical files; fsynced."""
        entries: dict = {"__metadata__": meta}
        offset = 0
        for name in sorted(self._items):
            dtype, shape, src = self._items[name]
            n = src[1] if isinstance(src, tuple) else src.numel() * src.element_size()
            entries[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": shape,
                "data_offsets": [offset, offset + n],
            }
            offset += n
        head = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(target, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for name in sorted(self._items):
                for chunk in self._chunks(name):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Drop what was added (and the spill file)."""
        if self._spill is not None:
            self._spill.close()  # a NamedTemporaryFile deletes itself
            self._spill = None
        self._items.clear()


def _entropy_encode(cw: ClusteredWeight, coder: str) -> tuple[torch.Tensor, dict]:
    from ..core.entropy import encode_codes

    codes = cw.codes().reshape(-1).numpy()
    sparse = bool(cw.meta.get("keep_zeros")) and float((codes == 0).mean()) > 0.5
    blob, info = encode_codes(codes, coder, sparse)
    info["coder"] = coder
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), info


def _entropy_decode(key: str, e: dict, tensors: dict) -> torch.Tensor:
    from ..core.entropy import EntropyError, decode_codes
    from ..core.packing import pack_codes

    numel = math.prod(int(s) for s in e["shape"])
    try:
        codes = decode_codes(tensors[f"{key}.entropy"].numpy().tobytes(), e["entropy"], numel)
    except EntropyError as err:
        raise FormatError(f"{key}: entropy-coded codes: {err}") from None
    if numel and int(codes.max()) >= 1 << int(e["bits"]):
        raise FormatError(f"{key}: decoded code out of range for {e['bits']} bits")
    return pack_codes(torch.from_numpy(codes), int(e["bits"]))


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``tensors`` with this exact metadata to ``path`` (not atomic; for tools
    and tests that craft files)."""
    w = FileWriter(path)
    for name, t in tensors.items():
        w.add(name, t)
    w._write_file(str(path), meta)


def _tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _read_raw_header(path: Path) -> dict:
    from .checkpoint import read_header_bytes

    try:
        raw = read_header_bytes(path, MAX_HEADER_BYTES, FormatError, "a .wclust file")
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        st = json.loads(raw)
        meta = st.get("__metadata__") or {}
        text = meta["wclust"]
        header = json.loads(text)
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError):
        raise FormatError(
            f"{path}: not a .wclust file (no wclust header); was it written by wclust.save?"
        ) from None
    if not isinstance(header, dict) or header.get("format") != "wclust":
        raise FormatError(f"{path}: not a .wclust file")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {version!r} is newer than this wclust reads "
            f"({FORMAT_VERSION}); upgrade wclust"
        )
    _check_header(path, header)
    return {"header": header, "text": text, "sha256": meta.get("wclust_sha256"), "st": st}


def _strs(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_header(path, header: dict) -> None:
    """The header's structure, checked before any tensor is read or allocated."""

    def bad(msg: str):
        raise FormatError(f"{path}: malformed header: {msg}")

    if not isinstance(header.get("arch", {}), dict | None):
        bad("'arch' is not an object")
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict) or not _strs(list(aliases) + list(aliases.values())):
        bad("'aliases' is not an object of names")
    entries = header.get("clustered", [])
    if not isinstance(entries, list):
        bad("'clustered' is not a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            bad(f"clustered[{i}] is not an object")
        if not isinstance(e.get("key"), str) or not e["key"].startswith("clustered."):
            bad(f"clustered[{i}]: bad key {e.get('key')!r}")
        owners, types = e.get("owners"), e.get("owner_types")
        if not (_strs(owners) and _strs(types) and owners and len(owners) == len(types)):
            bad(f"{e['key']}: 'owners'/'owner_types' are not equal, non-empty lists of names")
        if not isinstance(e.get("transpose"), bool):
            bad(f"{e['key']}: transpose {e.get('transpose')!r} is not true or false")
        if not isinstance(e.get("int8_matmul", False), bool):
            bad(f"{e['key']}: int8_matmul {e.get('int8_matmul')!r} is not true or false")
        if "parts" not in e:
            _check_tensor_entry(e, bad)
            continue
        shape, parts = e.get("shape"), e["parts"]
        if not (
            isinstance(parts, list) and len(parts) >= 2 and all(isinstance(p, dict) for p in parts)
        ):
            bad(f"{e['key']}: 'parts' is not a list of at least two objects")
        if not (
            isinstance(shape, list) and shape and all(type(s) is int and s >= 0 for s in shape)
        ):
            bad(f"{e['key']}: shape {shape!r} is not a list of non-negative integers")
        start = 0
        for j, p in enumerate(parts):
            if p.get("key") != f"{e['key']}.part{j}":
                bad(f"{e['key']}: part {j} has key {p.get('key')!r}")
            _check_tensor_entry(p, bad)
            rows = p.get("rows")
            if (
                not p["shape"]
                or rows != [start, start + p["shape"][0]]
                or p["shape"][1:] != shape[1:]
            ):
                bad(f"{p['key']}: rows {rows!r} and shape {p['shape']} do not continue the split")
            start = rows[1]
        if start != shape[0]:
            bad(f"{e['key']}: parts cover {start} rows of {shape[0]}")


def _check_tensor_entry(e: dict, bad) -> None:
    """Shape, bits, dtype, meta of one stored clustered tensor (a weight or a part)."""
    shape, bits = e.get("shape"), e.get("bits")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        bad(f"{e['key']}: shape {shape!r} is not a list of non-negative integers")
    if math.prod(shape) > MAX_NUMEL:
        bad(f"{e['key']}: shape {shape} declares more than {MAX_NUMEL} weights")
    max_bits = 8
    if "cluster_dim" in e:
        dim = e["cluster_dim"]
        if type(dim) is not int or dim not in (2, 4, 8):
            bad(f"{e['key']}: cluster_dim {dim!r} is not 2, 4 or 8")
        if not shape or (math.prod(shape) // max(shape[0], 1)) % dim:
            bad(f"{e['key']}: cluster_dim {dim} does not divide the rows of shape {shape}")
        if "entropy" in e:
            bad(f"{e['key']}: vector codebooks are not entropy-coded")
        max_bits = 16
    if type(bits) is not int or not 1 <= bits <= max_bits:
        bad(f"{e['key']}: bits {bits!r} is not an integer from 1 to {max_bits}")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in _DTYPES:
        bad(f"{e['key']}: unknown dtype {e.get('dtype')!r}")
    if not isinstance(e.get("meta"), dict | None) or not isinstance(e.get("entropy", {}), dict):
        bad(f"{e['key']}: 'meta'/'entropy' are not objects")


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .wclust file (cheap: no tensor is read)."""
    return _read_raw_header(Path(path))["header"]


def stored_bytes(path: str | os.PathLike) -> dict:
    """What each clustered weight really occupies in the file (no tensor is read).

    Returns:
        ``{"clustered": {owner name: bytes}, "tensors": bytes}``: per clustered
        weight (named by its first owner) the bytes of all its stored tensors (packed
        or entropy-coded codes, codebook, scales, ...); ``tensors`` is the payload of
        every tensor in the file (the JSON header excluded).
    """
    raw = _read_raw_header(Path(path))
    sizes = {}
    for name, e in raw["st"].items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        try:
            lo, hi = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: bad safetensors entry for {name!r}") from None
        sizes[name] = hi - lo
    per = {}
    for e in raw["header"].get("clustered", []):
        prefix = f"{e['key']}."
        per[e["owners"][0]] = sum(n for k, n in sizes.items() if k.startswith(prefix))
    return {"clustered": per, "tensors": sum(sizes.values())}


def load(
    path: str | os.PathLike,
    model_factory=None,
    *,
    cache: bool = False,
) -> nn.Module:
    """Rebuild a clustered model from a .wclust file.

    Args:
        path: file written by :func:`save`.
        model_factory: callable returning the (uncompressed) architecture, or an
            ``nn.Module`` instance to fill in. Not needed for transformers models,
            which are rebuilt from the config in the file.
        cache: keep each rebuilt dense weight after its first use (faster, uses the
            memory back).

    Returns:
        The model in eval mode, weights compressed in memory.

    Raises:
        FormatError: the file is corrupt, altered, from a newer version, or does not
            match the architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    raw = _read_raw_header(path)
    header = raw["header"]
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt data
        raise FormatError(f"{path}: corrupt tensor data: {e}") from None
    if raw["sha256"] != _digest(raw["text"], tensors):
        raise FormatError(f"{path}: checksum mismatch: the file is truncated or was altered")
    try:
        model = _build(header, model_factory, len(tensors))
        _fill(model, header, tensors, cache)
    except FormatError:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        RuntimeError,
        ArithmeticError,
    ) as e:
        raise FormatError(f"{path}: does not match the model architecture: {e}") from None
    prepare_kernels(model)
    _release_unused_pages(model, tensors)
    del tensors
    return model.eval()


def _release_unused_pages(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give back the resident pages of the file's tensors the loaded model no longer
    reads. safetensors maps the file and hands out views of it; codes converted to the
    kernels' layout, float copies of scales and the like leave their stored originals
    unreferenced, yet the checksum has read every page and the mapping stays while any
    view (4-bit codes are used in place) lives, so those pages kept counting in the
    process's resident memory (12 of the 37 MB a whisper-base budget-4.25 file
    held). Pages that hold only unreferenced tensors are dropped with
    ``madvise(MADV_DONTNEED)``; nothing reads them again. Linux only; elsewhere, or if the call fails, nothing changes."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    spans = {}
    for t in tensors.values():
        st = t.untyped_storage()
        if st.nbytes():
            spans[st.data_ptr()] = st.nbytes()
    used = set()
    for t in _reachable_tensors(model):
        ptr = t.untyped_storage().data_ptr()
        if ptr in spans:
            used.add(ptr)
    # the file's tensors never share bytes, so whole pages inside merged spans of
    # unreferenced ones hold nothing the model reads
    free = sorted((p, p + n) for p, n in spans.items() if p not in used)
    if not free:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return
    page, dontneed = os.sysconf("SC_PAGE_SIZE"), 4  # MADV_DONTNEED
    for lo, hi in _merge_spans(free):
        lo, hi = -(-lo // page) * page, hi // page * page  # whole pages inside the span
        if hi > lo:
            madvise(lo, hi - lo, dontneed)


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (lo, hi) byte spans merged where they touch or overlap."""
    out: list[list[int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _reachable_tensors(model: nn.Module):
    """Every tensor the model holds: parameters, buffers and the tensors its modules
    keep in their ``__dict__`` (cached kernel arguments, kept tables), nested in
    tuples."""
    stack: list = []
    for m in model.modules():
        stack.extend(m._parameters.values())
        stack.extend(m._buffers.values())
        stack.extend(v for k, v in vars(m).items() if k not in ("_parameters", "_buffers"))
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            stack.extend(v)


def _build(header: dict, model_factory, n_tensors: int = 0) -> nn.Module:
    if model_factory is not None:
        return model_factory if isinstance(model_factory, nn.Module) else model_factory()
    arch = header.get("arch") or {}
    if arch.get("kind") != "transformers":
        raise FormatError(
            f"this file holds a plain PyTorch model ({arch.get('class')}); pass "
            "model_factory=<callable returning the uncompressed architecture> to load it"
        )
    try:
        import transformers
    except ImportError:
        raise FormatError("loading a transformers model needs: pip install 'wclust[hf]'") from None
    cls = getattr(transformers, str(arch.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"unknown transformers model class {arch.get('class')!r}")
    try:
        cfg = dict(arch["config"])
        # Every layer has at least one tensor in the file: a config declaring more
        # layers than that would only spend time and memory building empty modules.
        for k, v in cfg.items():
            if "layer" in k and type(v) is int and v > n_tensors:
                raise FormatError(f"config {k}={v} declares more layers than the file holds")
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = cls(config)
        if arch.get("generation_config") and hasattr(model, "generation_config"):
            model.generation_config = transformers.GenerationConfig.from_dict(
                arch["generation_config"]
            )
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers validates configs with many types
        raise FormatError(
            f"the file's {arch.get('class')} config is invalid: {type(e).__name__}: {e}"
        ) from None
    return model


_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What each stored part of a clustered weight may be: (dtypes, dims).
_PARTS = {
    "codes": ((torch.uint8,), 1),
    "entropy": ((torch.uint8,), 1),
    "codebook": ((*_FLOAT, torch.int8), 2),
    "scale": (_FLOAT, 1),
    "group_scale": (_FLOAT, None),
    "group_offset": (_FLOAT, None),
    "outlier_idx": ((torch.int32, torch.int64), 1),
    "outlier_val": (_FLOAT, 1),
}


def _check_parts(key: str, e: dict, tensors: dict) -> None:
    for part in ("entropy" if "entropy" in e else "codes", "codebook"):
        if f"{key}.{part}" not in tensors:
            raise FormatError(f"{key}: the file lacks its {part} tensor")
    for part, (dtypes, dims) in _PARTS.items():
        t = tensors.get(f"{key}.{part}")
        if t is None:
            continue
        if part == "codebook" and "cluster_dim" in e:
            dims = 3  # (n_codebooks, n_clusters, cluster_dim)
        if t.dtype not in dtypes or (dims is not None and t.dim() != dims):
            raise FormatError(
                f"{key}.{part}: dtype {_dtype_name(t.dtype)} with {t.dim()} dims is not a "
                f"valid {part} tensor"
            )
    if (tensors[f"{key}.codebook"].dtype == torch.int8) != (f"{key}.scale" in tensors):
        raise FormatError(f"{key}: an int8 codebook needs its scale, and only it has one")


def _fill(model: nn.Module, header: dict, tensors: dict, cache: bool) -> None:
    for e in header["clustered"]:
        key = e["key"]
        shape = tuple(e["shape"])
        # The model's shapes first: nothing is decoded for a weight it does not have.
        owners = []
        for owner, otype in zip(e["owners"], e["owner_types"], strict=True):
            mod = model.get_submodule(owner)
            if layer_type(mod) is None or type(mod).__name__ != otype:
                raise FormatError(f"{owner}: file has a {otype}, model has {type(mod).__name__}")
            want = shape[::-1] if e["transpose"] else shape
            if tuple(mod._parameters["weight"].shape) != want:
                raise FormatError(f"{owner}: weight shape {want} does not match the model")
            owners.append((owner, mod))
        if "parts" in e:
            parts = [_clustered_tensor(p, tensors, False) for p in e["parts"]]
            try:
                cw = RowSplitWeight(parts, bool(e["transpose"]), e.get("meta"))
            except ValueError as err:
                raise FormatError(f"{key}: {err}") from None
        else:
            cw = _clustered_tensor(e, tensors, bool(e["transpose"]))
        cw.set_cache(cache)
        if e.get("int8_matmul"):
            set_int8_matmul(cw)  # the weight, or every part of a row split
        for owner, mod in owners:
            set_module(model, owner, swap_weight(mod, cw))
    keys = {e["key"] for e in header["clustered"]}
    keys |= {p["key"] for e in header["clustered"] for p in e.get("parts", ())}
    placed: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("clustered."):
            if name.rpartition(".")[0] not in keys:
                raise FormatError(f"{name}: no clustered weight in the header uses it")
            continue
        kind, _, full = name.partition(":")
        if kind not in ("p", "b"):
            raise FormatError(f"{name}: not a parameter (p:) or buffer (b:) name")
        placed[full] = _place(model, kind, full, t)
    for alias, target in header.get("aliases", {}).items():
        _place(
            model, "p" if isinstance(placed[target], nn.Parameter) else "b", alias, placed[target]
        )
    # Every tensor save() would store must come from the file: a factory's random
    # init must not survive silently.
    left = [
        full
        for mod_name, mod in model.named_modules(remove_duplicate=False)
        if not isinstance(mod, (ClusteredWeight, VectorWeight))
        for store in (mod._parameters, mod._buffers)
        for attr, t in store.items()
        if t is not None
        and (full := f"{mod_name}.{attr}" if mod_name else attr) not in placed
        and full not in header.get("aliases", {})
    ]
    left += [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
    ]
    if left:
        raise FormatError(f"file lacks tensors for {left[:5]}{' ...' if len(left) > 5 else ''}")


def _clustered_tensor(e: dict, tensors: dict, transpose: bool) -> ClusteredWeight:
    """One stored clustered tensor (a weight, or a part of a row split)."""
    key = e["key"]
    _check_parts(key, e, tensors)
    packed = _entropy_decode(key, e, tensors) if "entropy" in e else tensors[f"{key}.codes"]
    if "cluster_dim" in e:
        extra = {"group_offset", "outlier_idx", "outlier_val"} & {
            n.rpartition(".")[2] for n in tensors if n.rpartition(".")[0] == key
        }
        if extra:
            raise FormatError(f"{key}: a vector codebook has no {sorted(extra)} tensors")
        try:
            return VectorWeight(
                packed,
                tensors[f"{key}.codebook"],
                tensors.get(f"{key}.scale"),
                tuple(e["shape"]),
                int(e["bits"]),
                int(e["cluster_dim"]),
                _DTYPES[e["dtype"]],
                transpose,
                e.get("meta"),
                tensors.get(f"{key}.group_scale"),
            )
        except ValueError as err:
            raise FormatError(f"{key}: {err}") from None
    cw = ClusteredWeight(
        packed,
        tensors[f"{key}.codebook"],
        tensors.get(f"{key}.scale"),
        tuple(e["shape"]),
        int(e["bits"]),
        _DTYPES[e["dtype"]],
        transpose,
        e.get("meta"),
        tensors.get(f"{key}.group_scale"),
        tensors.get(f"{key}.group_offset"),
        tensors.get(f"{key}.outlier_idx"),
        tensors.get(f"{key}.outlier_val"),
    )
    if cw.codebook.shape[1] > (1 << cw.bits):
        raise FormatError(f"{key}: more centroids than {cw.bits}-bit codes can address")
    return cw


def _place(model: nn.Module, kind: str, full: str, t: torch.Tensor):
    mod_name, _, attr = full.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    store = mod._parameters if kind == "p" else mod._buffers
    if attr not in store:
        raise FormatError(
            f"{full}: the model has no such {'parameter' if kind == 'p' else 'buffer'}"
        )
    old = store[attr]
    if old is not None and tuple(old.shape) != tuple(t.shape):
        raise FormatError(f"{full}: shape {tuple(t.shape)} in file, {tuple(old.shape)} in model")
    if old is not None and (
        old.dtype != t.dtype if not old.dtype.is_floating_point else not t.dtype.is_floating_point
    ):
        raise FormatError(f"{full}: dtype {_dtype_name(t.dtype)} in file, {old.dtype} in model")
    if kind == "p" and not isinstance(t, nn.Parameter):
        t = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else True)
    store[attr] = t
    return t
