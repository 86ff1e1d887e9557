"""File sizes: bytes on disk and gzip-compressed bytes (the seed table's column)."""

from __future__ import annotations

import os
import zlib

__all__ = ["file_sizes", "gzip_size"]


def gzip_size(path: str | os.PathLike, level: int = 6, chunk: int = 1 << 22) -> int:
    """Bytes of ``gzip -<level>`` output for a file, streamed (constant memory)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            total += len(comp.compress(block))
    return total + len(comp.flush())


def file_sizes(path: str | os.PathLike, gzip: bool = True) -> dict:
    """``{"file_bytes": ..., "gzip_bytes": ...}`` (gzip_bytes None when not asked)."""
    return {
        "file_bytes": os.path.getsize(path),
        "gzip_bytes": gzip_size(path) if gzip else None,
    }
