"""Typed settings of the per-tensor methods: one class per method family.

Each class lists exactly the fields its method uses and refuses any other, with a
message naming where that field belongs. ``layer()`` turns a settings object into
the per-layer dict that :class:`wclust.ClusterConfig` and ``compress_`` work on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..config import ConfigError
from ..core.codebook import CODEBOOK_DTYPES, GRANULARITIES
from ..core.kmeans import INITS

__all__ = ["KMeans", "NF4", "QUANTIZERS", "RTN", "Quantizer", "ScaledCodebook", "quantizer_from"]


def _check_bits(cls: str, bits, lo: int = 1, hi: int = 8) -> None:
    if type(bits) is not int or not lo <= bits <= hi:
        raise ConfigError(f"{cls}: bits must be an integer in [{lo}, {hi}], got {bits!r}")


def _check_group(cls: str, group_size) -> None:
    if type(group_size) is not int or group_size < 1:
        raise ConfigError(f"{cls}: group_size must be a positive integer, got {group_size!r}")


@dataclass(frozen=True)
class KMeans:
    """Plain k-means codebooks (Deep Compression): one per tensor, output channel or
    group of consecutive weights.

    Args:
        bits: code width; ``2**bits`` centroids per codebook (default 4).
        n_clusters: centroids per codebook instead of ``bits`` (2..256).
        granularity: "tensor" | "channel" | "group".
        group_size: weights per codebook for "group".
        algorithm: "exact" (globally optimal 1-D k-means) | "lloyd".
        init: Lloyd's start: "linear" | "density" | "random" | "kmeans++".
        codebook_dtype: "float32" | "float16" | "bfloat16" | "int8".
        keep_zeros: pruned (zero) weights stay exactly zero.
        outliers: fraction of weights kept exactly in a sparse side table.
        cluster_dim: weights per code: 1 (scalar), or 2, 4, 8 consecutive weights of
            a row clustered as one vector (``2**(bits * cluster_dim)`` centroids).
    """

    bits: int | None = None
    n_clusters: int | None = None
    granularity: str = "channel"
    group_size: int | None = None
    algorithm: str = "exact"
    init: str = "kmeans++"
    codebook_dtype: str = "float32"
    keep_zeros: bool = False
    outliers: float = 0.0
    cluster_dim: int = 1

    kind = "kmeans"

    def __post_init__(self):
        if self.n_clusters is not None:
            if self.bits is not None:
                raise ConfigError("kmeans: give bits or n_clusters, not both")
            if type(self.n_clusters) is not int or not 2 <= self.n_clusters <= 256:
                raise ConfigError(f"kmeans: n_clusters must be in [2, 256], got {self.n_clusters}")
        else:
            if self.bits is None:
                object.__setattr__(self, "bits", 4)
            _check_bits("kmeans", self.bits)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"kmeans: granularity {self.granularity!r} is unknown; choose "
                f"{', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group" and self.group_size is None:
            raise ConfigError("kmeans: granularity 'group' needs group_size, a positive integer")
        if self.granularity == "group":
            _check_group("kmeans", self.group_size)
        elif self.group_size is not None:
            raise ConfigError(
                f"kmeans: group_size is used only with granularity 'group' (got granularity "
                f"{self.granularity!r}); for a codebook per tensor with a scale per group use "
                "the 'scaled' quantizer"
            )
        if self.algorithm not in ("exact", "lloyd"):
            raise ConfigError(f"kmeans: algorithm must be exact or lloyd, got {self.algorithm!r}")
        if self.init not in INITS:
            raise ConfigError(f"kmeans: init {self.init!r} is unknown; choose {', '.join(INITS)}")
        if self.init != "kmeans++" and self.algorithm == "exact":
            raise ConfigError("kmeans: init is used only by algorithm 'lloyd' (exact needs none)")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ConfigError(
                f"kmeans: codebook_dtype {self.codebook_dtype!r} is unknown; choose "
                f"{', '.join(CODEBOOK_DTYPES)}"
            )
        if not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 0.5:
            raise ConfigError("kmeans: outliers must be a fraction in [0, 0.5), e.g. 0.005")

    def layer(self) -> dict:
        return {
            "bits": self.bits,
            "n_clusters": self.n_clusters,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "method": "exact" if self.algorithm == "exact" else "kmeans",
            "init": self.init,
            "codebook_dtype": self.codebook_dtype,
            "keep_zeros": self.keep_zeros,
            "outliers": float(self.outliers),
            "cluster_dim": self.cluster_dim,
        }


_FITS = {"exact": "scaled-exact", "lloyd": "scaled-lloyd", "fit": "scaled-fit"}


@dataclass(frozen=True)
class ScaledCodebook:
    """One learned codebook per tensor over absmax-normalized groups (the clustering
    that beats NF4 at equal size).

    Args:
        bits: code width (2**bits shared centroids).
        group_size: consecutive weights of a row sharing one fp16 scale.
        fit: "exact" (optimal 1-D k-means of the normalized weights) | "lloyd"
            (Lloyd from the NormalFloat table, -1/0/+1 kept: never worse than NF4's
            weighted error) | "fit" (lloyd, then each group's scale fitted to its
            weighted error and the codebook learned again).
        cluster_dim: weights per code: 1 (scalar), or 2, 4, 8 consecutive weights
            clustered as one vector over the scaled groups.
        codebook_dtype: of a vector codebook (cluster_dim > 1); a scalar one stays
            float32.
    """

    bits: int = 4
    group_size: int = 64
    fit: str = "lloyd"
    cluster_dim: int = 1
    codebook_dtype: str = "float32"

    kind = "scaled"

    def __post_init__(self):
        _check_bits("scaled", self.bits)
        _check_group("scaled", self.group_size)
        if self.fit not in _FITS:
            raise ConfigError(f"scaled: fit must be one of {', '.join(_FITS)}, got {self.fit!r}")
        if self.codebook_dtype != "float32" and self.cluster_dim == 1:
            raise ConfigError(
                "scaled: a scalar codebook (cluster_dim=1) stays float32 (the scales are "
                "float16); codebook_dtype belongs to 'kmeans' or to vector codebooks"
            )

    def layer(self) -> dict:
        return {
            "bits": self.bits,
            "n_clusters": None,
            "granularity": "channel",
            "group_size": self.group_size,
            "method": _FITS[self.fit],
            "cluster_dim": self.cluster_dim,
            "codebook_dtype": self.codebook_dtype,
        }


@dataclass(frozen=True)
class NF4:
    """NF4 (QLoRA): the fixed 16-value NormalFloat table, absmax scale per group."""

    group_size: int = 64

    kind = "nf4"

    def __post_init__(self):
        _check_group("nf4", self.group_size)

    def layer(self) -> dict:
        return {
            "bits": 4,
            "n_clusters": None,
            "granularity": "channel",
            "group_size": self.group_size,
            "method": "nf4",
        }


@dataclass(frozen=True)
class RTN:
    """Integer round-to-nearest per group (asymmetric, or symmetric)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    kind = "rtn"

    def __post_init__(self):
        _check_bits("rtn", self.bits, 2, 8)
        _check_group("rtn", self.group_size)

    def layer(self) -> dict:
        return {
            "bits": self.bits,
            "n_clusters": None,
            "granularity": "channel",
            "group_size": self.group_size,
            "method": "rtn-sym" if self.symmetric else "rtn",
        }


Quantizer = KMeans | ScaledCodebook | NF4 | RTN
QUANTIZERS: dict[str, type] = {c.kind: c for c in (KMeans, ScaledCodebook, NF4, RTN)}

# Where a field that one quantizer does not take belongs instead.
_HINTS = {
    "bits": "nf4 is always 4-bit: for other widths use 'scaled' (a learned codebook) or 'rtn'",
    "codebook_dtype": "the scaled codebooks keep a float32 codebook and fp16 scales; "
    "codebook_dtype belongs to 'kmeans'",
    "granularity": "the scaled quantizers have one codebook per tensor and a scale per "
    "group_size weights; granularity belongs to 'kmeans'",
    "outliers": "outliers work with 'kmeans' only",
    "keep_zeros": "keep_zeros works with 'kmeans' only",
    "n_clusters": "n_clusters belongs to 'kmeans'",
    "algorithm": "algorithm belongs to 'kmeans'; the scaled quantizer's is 'fit'",
    "fit": "fit belongs to 'scaled'",
    "symmetric": "symmetric belongs to 'rtn'",
    "cluster_dim": "vector codebooks (cluster_dim) belong to 'kmeans' and 'scaled'",
    "init": "init belongs to 'kmeans' with algorithm 'lloyd'",
    "group_size": "group_size of 'kmeans' needs granularity 'group'",
}


def quantizer_from(kind: str, values: dict) -> Quantizer:
    """Build the settings class ``kind`` from ``values``, refusing fields it ignores.

    Raises:
        ConfigError: unknown kind, or a field the kind does not use (the message says
            where it belongs), or a bad value.
    """
    cls = QUANTIZERS.get(kind)
    if cls is None:
        raise ConfigError(f"quantizer {kind!r} is unknown; choose {', '.join(QUANTIZERS)}")
    names = {f.name for f in fields(cls)}
    for k in values:
        if k not in names:
            hint = _HINTS.get(k, "")
            raise ConfigError(
                f"{kind} has no field {k!r} (its fields: {', '.join(sorted(names))})"
                + (f"; {hint}" if hint else "")
            )
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{kind}: {e}") from None


def quantizer_dict(q: Quantizer) -> dict:
    """``{"kind": ..., field: value}`` for the fields that differ from the defaults."""
    default = type(q)()
    d = asdict(q)
    return {"kind": q.kind, **{k: v for k, v in d.items() if v != getattr(default, k)}}
