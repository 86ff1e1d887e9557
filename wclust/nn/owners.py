"""Which modules own which weight, and swapping a module in place: the helpers every
stage that walks a model's layers shares (no clustering or file logic here)."""

from __future__ import annotations

from torch import nn

from ..config import SUPPORTED_LAYER_TYPES
from .modules import ClusteredWeight, is_clustered

__all__ = ["clustered_weights", "layer_type", "set_module", "weight_owners"]


def layer_type(module: nn.Module) -> str | None:
    """The supported layer type name a module is (subclasses count), or None."""
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED_LAYER_TYPES and (
            cls.__module__.startswith("torch.nn") or cls.__name__ == "Conv1D"
        ):
            return cls.__name__
    return None


def weight_owners(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[str, nn.Module]]]]:
    """Every `weight` parameter of a supported layer with all modules that use it."""
    groups: dict[int, tuple[nn.Parameter, list]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get("weight") if layer_type(mod) else None
        if w is None:
            continue
        groups.setdefault(id(w), (w, []))[1].append((name, mod))
    out = []
    for w, owners in groups.values():
        seen, uniq = set(), []
        for name, mod in owners:  # a module reachable by two paths appears twice
            if (name, id(mod)) not in seen:
                seen.add((name, id(mod)))
                uniq.append((name, mod))
        out.append((w, uniq))
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def clustered_weights(
    model: nn.Module,
) -> dict[int, tuple[ClusteredWeight, list[tuple[str, nn.Module]]]]:
    """``{id(cw): (cw, [(owner name, owner module), ...])}`` for a clustered model."""
    out: dict[int, tuple[ClusteredWeight, list]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if is_clustered(mod):
            out.setdefault(id(mod.clustered), (mod.clustered, []))[1].append((name, mod))
    return out
