"""Compressed modules and the module swap."""

from .modules import ClusteredWeight, is_clustered, swap_weight, unswap_weight

__all__ = ["ClusteredWeight", "is_clustered", "swap_weight", "unswap_weight"]
