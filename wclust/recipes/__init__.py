"""Recipes: what is done to a model, as one validated, serializable object, run by
one pipeline (``compress_``), named by presets or written as spec strings."""

from .pipeline import compress_
from .presets import (
    BASELINES,
    DEFAULT_COMPARE,
    PRESETS,
    Method,
    get_recipe,
    resolve_method,
    split_methods,
)
from .recipe import GPTQ, Budget, Calibration, Distill, Recipe, parse_spec
from .settings import NF4, RTN, KMeans, ScaledCodebook

__all__ = [
    "BASELINES",
    "DEFAULT_COMPARE",
    "GPTQ",
    "NF4",
    "PRESETS",
    "RTN",
    "Budget",
    "Calibration",
    "Distill",
    "KMeans",
    "Method",
    "Recipe",
    "ScaledCodebook",
    "compress_",
    "get_recipe",
    "parse_spec",
    "resolve_method",
    "split_methods",
]
