"""Compressed modules and the module swap."""

from .modules import (
    ClusteredWeight,
    RowSplitWeight,
    clustered_parts,
    is_clustered,
    swap_weight,
    unswap_weight,
)

__all__ = [
    "ClusteredWeight",
    "RowSplitWeight",
    "clustered_parts",
    "is_clustered",
    "swap_weight",
    "unswap_weight",
]
