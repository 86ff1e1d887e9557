"""Safe reader of CTranslate2 ``model.bin`` files.

The layout (little endian), as written by ``ModelSpec._serialize`` in
``python/ctranslate2/specs/model_spec.py`` and read by ``Model::load`` in
``src/models/model.cc`` of OpenNMT/CTranslate2::

    u32 binary_version                      (1 .. 6)
    str spec_name, u32 revision             (binary_version >= 2)
    u32 num_variables
    num_variables times:
        str name
        u8  rank, u32 dims[rank]
        u8  dtype_id, u32 num_bytes         (binary_version >= 4)
        u8  item_size, u32 num_items        (binary_version < 4)
        num_bytes raw bytes
    u32 num_aliases, then (str alias, str target) pairs   (binary_version >= 3)

    str = u16 length (including a trailing NUL) + UTF-8 bytes + NUL

Every count and size is checked against the bytes left before anything is
allocated, so a truncated or hostile file raises :class:`Ct2FormatError`
instead of allocating gigabytes. Nothing is unpickled or executed.
"""

from __future__ import annotations

import io
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Ct2FormatError", "Ct2Model", "read_ct2_model", "CT2_DTYPES", "MAX_BINARY_VERSION"]

MAX_BINARY_VERSION = 6
# Order of the DataType enum (include/ctranslate2/types.h, model_spec._dtype_to_type_id).
CT2_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.float16,
    torch.bfloat16,
)
# binary_version < 4 stored an item size instead of a dtype id (Model::load).
_LEGACY_ITEM_SIZE_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}
# Smallest encodings: an empty name (u16 + NUL) + rank + dtype + u32 byte count;
# an alias is two empty names. Used to reject absurd counts up front.
_MIN_VARIABLE_BYTES = 3 + 1 + 1 + 4
_MIN_ALIAS_BYTES = 3 + 3


class Ct2FormatError(ValueError):
    """A CTranslate2 model file is malformed, truncated or unsupported."""


@dataclass
class Ct2Model:
    """Contents of a CTranslate2 ``model.bin``.

    Attributes:
        spec_name: Model specification, e.g. ``"WhisperSpec"`` (``""`` for binary version 1).
        revision: Specification revision.
        binary_version: Format version of the file.
        variables: Name -> tensor in its stored dtype; scalars are 0-d tensors.
            Aliased names map to the very same tensor object as their target.
        aliases: Alias name -> target name, as stored.
    """

    spec_name: str
    revision: int
    binary_version: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def scalar(self, name: str, default: int | float | None = None) -> int | float | None:
        """Return the Python value of a 0-d variable, or ``default`` when absent."""
        value = self.variables.get(name)
        if value is None:
            return default
        if value.ndim != 0:
            raise Ct2FormatError(f"variable {name!r} is not a scalar (shape {tuple(value.shape)})")
        return value.item()


class _ConcatReader:
    """Sequential reader over one or more files treated as one byte stream."""

    def __init__(self, paths: list[Path]):
        self._files: list[io.BufferedReader] = []
        try:
            for p in paths:
                self._files.append(open(p, "rb"))  # closed in close()
        except BaseException:
            self.close()
            raise
        self.size = sum(os.fstat(f.fileno()).st_size for f in self._files)
        self.pos = 0
        self._index = 0

    def close(self) -> None:
        for f in self._files:
            f.close()

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def readinto(self, buf: memoryview, what: str) -> None:
        """Fill ``buf`` completely or raise :class:`Ct2FormatError`."""
        n = len(buf)
        if n > self.remaining:
            raise Ct2FormatError(
                f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.remaining} left"
            )
        done = 0
        while done < n:
            if self._index >= len(self._files):
                raise Ct2FormatError(f"unexpected end of data while reading {what}")
            got = self._files[self._index].readinto(buf[done:])
            if not got:
                self._index += 1
                continue
            done += got
        self.pos += n

    def read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto(memoryview(buf), what)
        return bytes(buf)

    def unpack(self, fmt: str, what: str) -> int:
        (value,) = struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))
        return value

    def string(self, what: str) -> str:
        length = self.unpack("H", f"length of {what}")
        if length == 0:
            raise Ct2FormatError(f"{what} at offset {self.pos - 2} has length 0 (no NUL)")
        raw = self.read(length, what)
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise Ct2FormatError(f"{what} at offset {self.pos - length} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Ct2FormatError(f"{what} at offset {self.pos - length} is not UTF-8: {e}") from e


def _as_paths(paths: str | os.PathLike | list) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        out = [Path(paths)]
    else:
        out = [Path(p) for p in paths]
    if not out:
        raise ValueError("read_ct2_model: no file given")
    for p in out:
        if p.is_dir():
            raise ValueError(f"{p} is a directory; pass the model.bin file(s) inside it")
        if not p.is_file():
            raise FileNotFoundError(f"CTranslate2 model file not found: {p}")
    return out


def _read_variable(r: _ConcatReader, binary_version: int, index: int) -> tuple[str, torch.Tensor]:
    name = r.string(f"name of variable #{index}")
    rank = r.unpack("B", f"rank of {name!r}")
    shape = [r.unpack("I", f"dim {d} of {name!r}") for d in range(rank)]
    if binary_version >= 4:
        type_id = r.unpack("B", f"dtype of {name!r}")
        if type_id >= len(CT2_DTYPES):
            raise Ct2FormatError(f"variable {name!r} has unknown dtype id {type_id}")
        dtype = CT2_DTYPES[type_id]
        num_bytes = r.unpack("I", f"byte count of {name!r}")
    else:
        item_size = r.unpack("B", f"item size of {name!r}")
        if item_size not in _LEGACY_ITEM_SIZE_DTYPES:
            raise Ct2FormatError(f"variable {name!r} has unknown item size {item_size}")
        dtype = _LEGACY_ITEM_SIZE_DTYPES[item_size]
        num_bytes = r.unpack("I", f"item count of {name!r}") * item_size

    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if num_bytes != expected:
        raise Ct2FormatError(
            f"variable {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"file declares {num_bytes}"
        )
    # Checked before allocating: a huge declared size fails here, not in torch.empty.
    if num_bytes > r.remaining:
        raise Ct2FormatError(
            f"truncated file: variable {name!r} declares {num_bytes} bytes at offset "
            f"{r.pos}, only {r.remaining} left"
        )
    tensor = torch.empty(shape, dtype=dtype)
    if num_bytes:
        # (numel * itemsize,) uint8 view over the tensor's storage; bf16 has no numpy dtype.
        raw = tensor.view(-1).view(torch.uint8).numpy()
        r.readinto(memoryview(raw), f"data of {name!r}")
    return name, tensor


def read_ct2_model(paths: str | os.PathLike | list[str | os.PathLike]) -> Ct2Model:
    """Read a CTranslate2 ``model.bin`` without the ctranslate2 package.

    Args:
        paths: The ``model.bin`` file, or a list of files read as ONE byte stream in
            order (a model split into parts; no concatenated copy is needed).

    Returns:
        The parsed :class:`Ct2Model`; tensors keep their stored dtype.

    Raises:
        Ct2FormatError: The data is truncated, has impossible counts or sizes, an
            unknown dtype or version, duplicate names, dangling aliases or trailing bytes.
        FileNotFoundError: A file does not exist.
    """
    if sys.byteorder != "little":  # tensors are filled with the file's little-endian bytes
        raise NotImplementedError("read_ct2_model supports little-endian hosts only")
    r = _ConcatReader(_as_paths(paths))
    try:
        version = r.unpack("I", "binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise Ct2FormatError(
                f"unsupported CTranslate2 binary version {version} (this reader knows "
                f"1..{MAX_BINARY_VERSION}); is this a model.bin, and are its parts in order?"
            )
        spec_name, revision = "", 1
        if version >= 2:
            spec_name = r.string("spec name")
            revision = r.unpack("I", "spec revision")

        num_variables = r.unpack("I", "variable count")
        if num_variables * _MIN_VARIABLE_BYTES > r.remaining:
            raise Ct2FormatError(
                f"variable count {num_variables} cannot fit in the {r.remaining} bytes left"
            )
        variables: dict[str, torch.Tensor] = {}
        for i in range(num_variables):
            name, tensor = _read_variable(r, version, i)
            if name in variables:
                raise Ct2FormatError(f"duplicate variable name {name!r}")
            variables[name] = tensor

        aliases: dict[str, str] = {}
        if version >= 3:
            num_aliases = r.unpack("I", "alias count")
            if num_aliases * _MIN_ALIAS_BYTES > r.remaining:
                raise Ct2FormatError(
                    f"alias count {num_aliases} cannot fit in the {r.remaining} bytes left"
                )
            for i in range(num_aliases):
                alias = r.string(f"alias #{i}")
                target = r.string(f"target of alias {alias!r}")
                if alias in variables or alias in aliases:
                    raise Ct2FormatError(f"alias {alias!r} reuses an existing name")
                aliases[alias] = target
            for alias, target in aliases.items():
                if target not in variables:
                    raise Ct2FormatError(f"alias {alias!r} points to unknown variable {target!r}")
                variables[alias] = variables[target]

        if r.remaining:
            raise Ct2FormatError(f"{r.remaining} unexpected trailing bytes after offset {r.pos}")
    finally:
        r.close()
    return Ct2Model(spec_name, revision, version, variables, aliases)
