"""Compress a checkpoint larger than memory: one tensor at a time, straight to the file.

``compress_checkpoint`` never builds the model with its weights. It builds the
architecture on the meta device (parameters without storage; buffers real), then for
each layer weight reads that one tensor from the safetensors checkpoint, clusters it
exactly as ``compress_`` would, appends the result to a spill file and lets it go.
Peak memory is set by the largest tensor (times the clustering method's working
factor, see docs/experiments), not by the model. The file it writes equals what
``compress_`` + ``save`` write for the same model and config (tested).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .api import _compress_weight, _count_other
from .config import ClusterConfig
from .formats.checkpoint import CheckpointError, SafetensorsCheckpoint
from .formats.wclust_file import FileWriter, add_clustered, make_header, plain_tensors
from .nn.owners import weight_owners
from .report.layers import CompressionReport

__all__ = ["compress_checkpoint", "skeleton"]


def skeleton(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers model of a local checkpoint folder, parameters on the meta
    device and buffers real (computed by the model's own constructor).

    The class is chosen as ``wclust.models.load_model`` chooses it, and parameters
    get ``dtype`` (float32, like ``load_model``).
    """
    from .models import _require_transformers, _rule_for

    transformers = _require_transformers(str(path))
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise CheckpointError(
            "compressing a checkpoint tensor by tensor needs accelerate: pip install 'wclust[hf]'"
        ) from None
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json next to the weights, so the architecture is unknown; "
            "streaming needs a Hugging Face model folder"
        )
    config = transformers.AutoConfig.from_pretrained(str(folder))
    rule = _rule_for(config)
    cls = getattr(transformers, rule.auto_class if rule else "AutoModel")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    model.tie_weights()  # not done on meta parameters by the constructor
    return model.eval()


def _names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter/persistent buffer is reachable under."""
    names: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, t in mod._buffers.items():
            if t is not None and attr not in mod._non_persistent_buffers_set:
                names.setdefault(id(t), []).append(f"{mod_name}.{attr}" if mod_name else attr)
    return names


def _check_names(ckpt: SafetensorsCheckpoint, names: dict[int, list[str]]) -> None:
    known = {n for ns in names.values() for n in ns}
    missing = [ns[0] for ns in names.values() if not any(n in ckpt for n in ns)]
    unexpected = [n for n in ckpt.names if n not in known]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} tensors of the model (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"has {len(unexpected)} the model does not (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{ckpt.path}: the checkpoint's tensor names do not match the model built from "
            f"its config.json: it {' and '.join(parts)}. Compress it in memory instead "
            "(wclust compress --no-stream), which applies transformers' own key mapping"
        )


def compress_checkpoint(
    path: str | os.PathLike,
    output: str | os.PathLike,
    config: ClusterConfig | None = None,
    *,
    source: str | None = None,
    entropy: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CompressionReport:
    """Compress a safetensors checkpoint into a .wclust file, one tensor at a time.

    Args:
        path: a Hugging Face model folder (config.json plus ``model.safetensors`` or
            a sharded ``model.safetensors.index.json``).
        output: the .wclust file to write (atomically; an existing file is replaced
            only when the new one is complete).
        config: as for ``compress_`` (default: 4 bits, per channel, exact).
            Importance weights are not available here (they need the whole model).
        source: recorded in the file (default: the resolved ``path``).
        entropy: None, "huffman" or "ans", as for ``save``.
        progress: optional callback ``(layer name, index, total)``.

    Returns:
        The :class:`CompressionReport`, as ``compress_`` returns it.

    Raises:
        CheckpointError: no safetensors weights, missing shards, or tensor names that
            do not match the architecture in config.json.
        ValueError: a selected weight is not finite.
    """
    from .core.entropy import CODERS

    if entropy is not None and entropy not in CODERS:
        raise ValueError(f"entropy must be None or one of {', '.join(CODERS)}; got {entropy!r}")
    cfg = config or ClusterConfig()
    t_start = time.perf_counter()
    ckpt = SafetensorsCheckpoint(path)
    model = skeleton(path)
    names = _names_by_tensor(model)
    _check_names(ckpt, names)

    def read(t: torch.Tensor) -> torch.Tensor:
        name = next(n for n in names[id(t)] if n in ckpt)
        return ckpt.get(name, t.dtype if t.is_floating_point() else None)

    report = CompressionReport()
    writer = FileWriter(output, spill=True)
    try:
        groups = weight_owners(model)
        entries, clustered = [], set()
        for i, (w, owners) in enumerate(groups):
            if progress:
                progress(owners[0][0], i, len(groups))
            entry, cw = _compress_weight(w, owners, cfg, None, materialize=lambda w=w: read(w))
            report.layers.append(entry)
            if cw is not None:
                key = f"clustered.{len(entries)}"
                entries.append(add_clustered(writer, key, cw, owners, entropy))
                clustered.add(id(w))
            del cw
        aliases = {}
        for stored, t, alias_of in plain_tensors(model, skip=clustered):
            if alias_of is not None:
                aliases[stored] = alias_of
            elif t.is_meta or any(n in ckpt for n in names.get(id(t), ())):
                writer.add(stored, read(t))
            else:
                writer.add(stored, t)  # a buffer the constructor computed
        _count_other(model, report, {id(w) for w, _ in groups})
        report.seconds = time.perf_counter() - t_start
        src = source or str(Path(path).resolve())
        header = make_header(model, entries, aliases, cfg, report, src, None, entropy)
        writer.finish(header)
    except BaseException:
        writer.abort()
        raise
    return report
