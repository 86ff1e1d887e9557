"""Pure tensor code: clustering, codebooks, packing. No nn.Module, no model knowledge."""

from .cluster import cluster_tensor
from .codebook import ClusteredTensor, codebook_layout
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "ClusteredTensor",
    "cluster_tensor",
    "codebook_layout",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
]
