"""Read a safetensors checkpoint one tensor at a time (single file or sharded folder).

Used by the larger-than-memory path (``wclust.stream``): nothing here loads a whole
model, and nothing is unpickled (``pytorch_model.bin`` checkpoints are refused).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

__all__ = ["CheckpointError", "SafetensorsCheckpoint", "find_safetensors"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint cannot be read tensor by tensor (missing, broken or not safetensors)."""


def find_safetensors(path: str | os.PathLike) -> list[Path] | None:
    """The safetensors files of a checkpoint path, or None if it has none.

    ``path`` is a ``.safetensors`` file, or a folder with ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``.
    """
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix == ".safetensors" else None
    if (p / INDEX).is_file():
        try:
            weight_map = json.loads((p / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{p / INDEX}: not a valid safetensors index ({e})") from None
        if not all(isinstance(f, str) for f in files):
            raise CheckpointError(f"{p / INDEX}: weight_map values must be file names")
        return [p / f for f in files]
    if (p / SINGLE).is_file():
        return [p / SINGLE]
    return None


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # safetensors' own limit


def read_header_bytes(path: Path, max_bytes: int, error: type[Exception], what: str) -> bytes:
    """The JSON header bytes of a safetensors-layout file (8-byte little-endian length,
    then the header), its length checked against the file size and ``max_bytes``.

    Raises:
        error: the file is too short or declares an impossible header length.
        OSError: the file cannot be read.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise error(f"{path}: too short to be {what} ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, max_bytes):
            raise error(f"{path}: header length {n} is impossible for a {size}-byte file")
        return fh.read(n)


def _read_index(f: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """``{name: (dtype, shape, start, end)}`` of one safetensors file, offsets absolute
    in the file, every entry checked against the file's size."""
    size = f.stat().st_size
    raw = read_header_bytes(f, MAX_HEADER, CheckpointError, "a safetensors file")
    n = len(raw)
    try:
        entries = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{f}: the safetensors header is not JSON") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{f}: the safetensors header is not an object")
    out = {}
    for name, e in entries.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[e["dtype"]]
            shape = [int(v) for v in e["shape"]]
            lo, hi = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{f}: bad or unsupported entry for {name!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or hi - lo != nbytes or lo < 0 or 8 + n + hi > size:
            raise CheckpointError(f"{f}: entry {name!r} does not fit the file")
        out[name] = (dtype, shape, 8 + n + lo, 8 + n + hi)
    return out


class SafetensorsCheckpoint:
    """Tensor names, dtypes and shapes of a checkpoint, and each tensor on demand.

    Tensors are read with plain file reads, not memory maps: a 5 GB shard costs no
    address space, so a process under a memory (or address-space) limit smaller than
    a shard can still read it.

    Args:
        path: a ``.safetensors`` file or a folder holding ``model.safetensors`` or a
            sharded ``model.safetensors.index.json`` with its shards.

    Raises:
        CheckpointError: no safetensors weights there, a shard is missing or corrupt,
            or two shards hold the same name.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files = find_safetensors(self.path)
        if files is None:
            pickled = self.path.is_dir() and any(self.path.glob("*.bin"))
            raise CheckpointError(
                f"{self.path}: no safetensors weights (model.safetensors or "
                f"{INDEX})"
                + (
                    "; only .bin (pickle) files, which wclust does not read: convert "
                    "them to safetensors first"
                    if pickled
                    else ""
                )
            )
        self.files = files
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        self.nbytes = 0
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
            self.nbytes += f.stat().st_size
            for name, e in _read_index(f).items():
                if name in self.entries:
                    raise CheckpointError(f"{name!r} is in both {self.entries[name][0]} and {f}")
                self.entries[name] = (f, *e)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor), cast to ``dtype`` if given."""
        f, st_dtype, shape, lo, hi = self.entries[name]
        if sys.byteorder != "little" and st_dtype.itemsize > 1:
            raise CheckpointError("reading safetensors needs a little-endian machine")
        t = torch.empty(shape, dtype=st_dtype)
        if hi > lo:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            with open(f, "rb") as fh:
                fh.seek(lo)
                if fh.readinto(buf) != hi - lo:
                    raise CheckpointError(f"{f}: ended while reading {name!r}")
        return t if dtype is None or t.dtype == dtype else t.to(dtype)
