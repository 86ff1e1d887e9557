"""Read a safetensors checkpoint one tensor at a time (single file or sharded folder).

Used by the larger-than-memory path (``wclust.stream``): nothing here loads a whole
model, and nothing is unpickled (``pytorch_model.bin`` checkpoints are refused).
"""

from __future__ import annotations

import json
import os
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


class SafetensorsCheckpoint:
    """Tensor names, dtypes and shapes of a checkpoint, and each tensor on demand.

    Args:
        path: a ``.safetensors`` file or a folder holding ``model.safetensors`` or a
            sharded ``model.safetensors.index.json`` with its shards.

    Raises:
        CheckpointError: no safetensors weights there, a shard is missing or corrupt,
            or two shards hold the same name.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

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
        self.shard_of: dict[str, Path] = {}
        self.nbytes = 0
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
            self.nbytes += f.stat().st_size
            try:
                with safe_open(str(f), framework="pt") as h:
                    names = list(h.keys())
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            for n in names:
                if n in self.shard_of:
                    raise CheckpointError(f"{n!r} is in both {self.shard_of[n]} and {f}")
                self.shard_of[n] = f
        self._open: tuple[Path, object] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor), cast to ``dtype`` if given."""
        from safetensors import safe_open

        f = self.shard_of[name]
        if self._open is None or self._open[0] != f:
            self.close()  # one shard mapped at a time
            self._open = (f, safe_open(str(f), framework="pt"))
        try:
            t = self._open[1].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read {name!r} ({e})") from None
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def close(self) -> None:
        if self._open is not None:
            h = self._open[1]
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
            self._open = None
