"""``cluster_tensor``: scalar codebooks (``codebook``) or, with ``cluster_dim`` > 1,
vector codebooks (``vector``), behind one call."""

from __future__ import annotations

import torch

from .codebook import ClusteredTensor, cluster_scalar
from .vector import VectorClusteredTensor, cluster_vectors

__all__ = ["cluster_tensor"]


def cluster_tensor(
    x: torch.Tensor,
    n_clusters: int | None = None,
    *,
    cluster_dim: int = 1,
    bits: int | None = None,
    granularity: str = "tensor",
    group_size: int | None = None,
    method: str = "kmeans",
    init: str = "kmeans++",
    sample_weight: torch.Tensor | None = None,
    keep_zeros: bool = False,
    codebook_dtype: str = "float32",
    seed: int = 0,
    max_iter: int = 300,
    **vector_options,
) -> ClusteredTensor | VectorClusteredTensor:
    """Replace a tensor by codebooks of centroids plus one code per element (or per
    ``cluster_dim`` consecutive elements along the input dimension).

    Args:
        x, n_clusters, bits, granularity, group_size, method, init, sample_weight,
            keep_zeros, codebook_dtype, seed, max_iter: as
            :func:`wclust.core.codebook.cluster_scalar`.
        cluster_dim: weights per code (coremltools' name). 1: scalar codebooks.
            2, 4 or 8: vector codebooks (``core.vector.cluster_vectors``): ``bits``
            counts code bits per weight (``n_clusters = 2**(bits * d)``), ``method``
            is not used, ``init`` is "product" or "random", and ``vector_options``
            are its further arguments (e.g. ``scale_group_size``).

    Returns:
        A :class:`ClusteredTensor`, or a ``VectorClusteredTensor`` for ``cluster_dim`` > 1.
    """
    if cluster_dim != 1:
        if keep_zeros:
            raise ValueError("keep_zeros works with scalar codebooks only (cluster_dim=1)")
        return cluster_vectors(
            x,
            n_clusters,
            cluster_dim=cluster_dim,
            bits=bits,
            granularity=granularity,
            group_size=group_size,
            sample_weight=sample_weight,
            init="product" if init == "kmeans++" else init,
            codebook_dtype=codebook_dtype,
            seed=seed,
            **vector_options,
        )
    if vector_options:
        raise TypeError(
            f"unexpected argument(s) {sorted(vector_options)}: they are options of vector "
            "codebooks (cluster_dim > 1)"
        )
    return cluster_scalar(
        x,
        n_clusters,
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        method=method,
        init=init,
        sample_weight=sample_weight,
        keep_zeros=keep_zeros,
        codebook_dtype=codebook_dtype,
        seed=seed,
        max_iter=max_iter,
    )
