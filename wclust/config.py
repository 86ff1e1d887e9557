"""Clustering configuration: validated when built, serializable with a version."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields, replace

from .core.codebook import CODEBOOK_DTYPES, GRANULARITIES, _resolve_k
from .core.kmeans import INITS

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_EXCLUDE",
    "LAYER_PRESETS",
    "SUPPORTED_LAYER_TYPES",
    "ClusterConfig",
    "ConfigError",
    "layer_preset",
    "row_segments",
]

CONFIG_VERSION = 1

# Module class names whose `weight` can be clustered. "Conv1D" is transformers'
# GPT-2-style linear layer (weight stored as (in, out)).
SUPPORTED_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D")

# Positional tables are excluded by default: they are few bytes and clustering
# them hurts (docs/experiments, whisper-base quality log). Visible in every report; override freely.
DEFAULT_EXCLUDE = ("*embed_positions*", "*position_embeddings*", "*.wpe")

# Per-tensor methods (implemented in api.TENSOR_METHODS): clustering, and the
# quantizers it is compared with, which share its storage.
METHODS = (
    "exact",
    "kmeans",
    "nf4",
    "rtn",
    "rtn-sym",
    "scaled-exact",
    "scaled-lloyd",
    "scaled-fit",
)
_CLUSTER_METHODS = ("exact", "kmeans")

# Fields a per-layer override may change.
_LAYER_FIELDS = (
    "bits",
    "n_clusters",
    "granularity",
    "group_size",
    "method",
    "init",
    "codebook_dtype",
    "keep_zeros",
    "outliers",
    "skip",
    "row_split",
    "cluster_dim",
)
# Fields a row range of a split layer may change (``row_split``).
_SEGMENT_FIELDS = tuple(f for f in _LAYER_FIELDS if f not in ("skip", "row_split"))


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster a model's weights.

    Args:
        bits: code width; ``n_clusters = 2**bits`` unless ``n_clusters`` is given.
        n_clusters: centroids per codebook (2..256), instead of ``bits``.
        granularity: "tensor" | "channel" | "group" (see ``cluster_tensor``).
        group_size: elements per codebook for "group".
        method: "exact" (optimal 1-D k-means) or "kmeans" (Lloyd).
        init: Lloyd init: "linear" | "density" | "random" | "kmeans++".
        codebook_dtype: "float32" | "float16" | "bfloat16" | "int8".
        keep_zeros: pruned (zero) weights stay zero.
        outliers: fraction of each weight (largest importance-weighted magnitude)
            kept exactly in a sparse side table instead of being clustered.
        include: fully qualified module-name globs to cluster (fnmatch).
        exclude: globs never to cluster (reported as excluded).
        layer_types: module class names to cluster.
        min_numel: weights with fewer elements are reported and left dense.
        overrides: ``{glob: {field: value}}`` applied in order to matching layers;
            fields: bits, n_clusters, granularity, group_size, method, init,
            codebook_dtype, keep_zeros, outliers, skip, and ``row_split``: a list
            ``[{"until": row, field: value, ...}, ...]`` clustering the rows before
            each ``until`` (of the (out, in) view; after the previous one) as their
            own tensor with those fields changed, the rows after the last ``until``
            with the layer's own settings (e.g. a token embedding's frequent rows at
            more bits: ``{"row_split": [{"until": 16000, "bits": 4}], "bits": 3}``).
        seed: RNG seed.
        cluster_dim: weights per code (coremltools' name): 1 scalar codebooks; 2, 4
            or 8 vector codebooks over that many consecutive weights of a row
            (``core.vector``), with methods exact/kmeans (codebooks laid out by
            ``granularity``) or scaled-exact/-lloyd/-fit (float16 scales per group of
            ``group_size`` weights); ``bits`` still counts code bits per weight
            (``n_clusters = 2**(bits * cluster_dim)``).
    """

    bits: int | None = 4
    n_clusters: int | None = None
    granularity: str = "channel"
    group_size: int | None = None
    method: str = "exact"
    init: str = "kmeans++"
    codebook_dtype: str = "float32"
    keep_zeros: bool = False
    outliers: float = 0.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    layer_types: tuple[str, ...] = SUPPORTED_LAYER_TYPES
    min_numel: int = 0
    overrides: dict = field(default_factory=dict)
    seed: int = 0
    cluster_dim: int = 1

    def __post_init__(self):
        for name in ("include", "exclude", "layer_types"):
            val = getattr(self, name)
            if isinstance(val, str):
                val = (val,)
            object.__setattr__(self, name, tuple(val))
        _check_layer_settings(self._layer_dict(), where="ClusterConfig")
        for t in self.layer_types:
            if t not in SUPPORTED_LAYER_TYPES:
                raise ConfigError(
                    f"layer type {t!r} is not supported; choose from {', '.join(SUPPORTED_LAYER_TYPES)}"
                )
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ConfigError(f"min_numel must be a non-negative integer, got {self.min_numel!r}")
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides must be a dict {module-name glob: {field: value}}")
        for pat, ov in self.overrides.items():
            if not isinstance(ov, dict):
                raise ConfigError(f"override for {pat!r} must be a dict of fields, got {ov!r}")
            unknown = set(ov) - set(_LAYER_FIELDS)
            if unknown:
                raise ConfigError(
                    f"override for {pat!r} has unknown field(s) {sorted(unknown)}; "
                    f"allowed: {', '.join(_LAYER_FIELDS)}"
                )
            merged = _updated(self._layer_dict(), ov)
            _check_layer_settings(merged, where=f"override {pat!r}")
            if ov.get("row_split") is not None:
                for seg in row_segments(merged, where=f"override {pat!r}"):
                    _check_layer_settings(seg, where=f"override {pat!r}, row_split")

    def _layer_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _LAYER_FIELDS if f not in ("skip", "row_split")}
        d["skip"] = False
        d["row_split"] = None
        return d

    def selects(self, name: str) -> tuple[bool, str]:
        """Whether the module ``name`` is selected, and why not if it is not."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False, "not matched by include"
        for p in self.exclude:
            if fnmatch.fnmatchcase(name, p):
                return False, f"excluded by {p!r}"
        return True, ""

    def for_layer(self, name: str) -> dict:
        """Settings for one layer after applying matching overrides in order."""
        d = self._layer_dict()
        for pat, ov in self.overrides.items():
            if pat == name or fnmatch.fnmatchcase(name, pat):
                d = _updated(d, ov)
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("include", "exclude", "layer_types"):
            d[k] = list(d[k])
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClusterConfig:
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version} is newer than this wclust understands "
                f"({CONFIG_VERSION}); upgrade wclust"
            )
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> ClusterConfig:
        return replace(self, **changes)


def _updated(d: dict, ov: dict) -> dict:
    """``d`` with the fields of ``ov``; setting bits clears n_clusters and back."""
    d = {**d, **ov}
    if "bits" in ov and "n_clusters" not in ov:
        d["n_clusters"] = None
    if "n_clusters" in ov and "bits" not in ov:
        d["bits"] = None
    return d


def row_segments(settings: dict, where: str = "row_split") -> list[dict]:
    """A split layer's settings per row range: ``[{..., "rows": (start, end)}, ...]``,
    the last range ending at None (the weight's last row); checked, with a message
    that says how to write ``row_split``."""
    split = settings.get("row_split")
    fix = 'write it as [{"until": 16000, "bits": 4}, ...] with increasing "until" rows'
    if not isinstance(split, (list, tuple)) or not split:
        raise ConfigError(f"{where}: row_split must be a non-empty list; {fix}")
    base = {k: v for k, v in settings.items() if k != "row_split"}
    out, start = [], 0
    for seg in split:
        if not isinstance(seg, dict):
            raise ConfigError(f"{where}: row_split item {seg!r} is not a dict; {fix}")
        until = seg.get("until")
        if type(until) is not int or until <= start:
            raise ConfigError(
                f"{where}: row_split 'until' must be an integer row above {start}, got "
                f"{until!r}; {fix}"
            )
        unknown = set(seg) - {"until", *_SEGMENT_FIELDS}
        if unknown:
            raise ConfigError(
                f"{where}: row_split item has unknown field(s) {sorted(unknown)}; allowed: "
                f"until, {', '.join(_SEGMENT_FIELDS)}"
            )
        ov = {k: v for k, v in seg.items() if k != "until"}
        out.append({**_updated(base, ov), "rows": (start, until)})
        start = until
    out.append({**base, "rows": (start, None)})
    return out


_VECTOR_METHODS = ("exact", "kmeans", "scaled-exact", "scaled-lloyd", "scaled-fit")


def _check_cluster_dim(d: dict, where: str) -> int:
    dim = d.get("cluster_dim", 1)
    if type(dim) is not int or dim not in (1, 2, 4, 8):
        raise ConfigError(f"{where}: cluster_dim must be 1, 2, 4 or 8, got {dim!r}")
    if dim == 1:
        return dim
    if d["method"] not in _VECTOR_METHODS:
        raise ConfigError(
            f"{where}: cluster_dim={dim} works with methods {', '.join(_VECTOR_METHODS)}, "
            f"not {d['method']!r}; use cluster_dim=1"
        )
    if d.get("keep_zeros") or d.get("outliers"):
        raise ConfigError(f"{where}: keep_zeros and outliers need cluster_dim=1")
    return dim


def _check_layer_settings(d: dict, where: str) -> None:
    dim = _check_cluster_dim(d, where)
    try:
        if dim == 1:
            _resolve_k(d.get("n_clusters"), d.get("bits"))
        else:
            from .core.vector import _resolve_vector_k

            _resolve_vector_k(d.get("n_clusters"), d.get("bits"), dim)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if d["granularity"] not in GRANULARITIES:
        raise ConfigError(
            f"{where}: granularity {d['granularity']!r} is unknown; choose {', '.join(GRANULARITIES)}"
        )
    if d["granularity"] == "group" and d["method"] in _CLUSTER_METHODS:
        gs = d.get("group_size")
        if not isinstance(gs, int) or gs < 1:
            raise ConfigError(f"{where}: granularity 'group' needs group_size, a positive integer")
    if (
        not isinstance(d.get("outliers", 0.0), (int, float))
        or not 0 <= d.get("outliers", 0.0) < 0.5
    ):
        raise ConfigError(f"{where}: outliers must be a fraction in [0, 0.5), e.g. 0.005")
    if d.get("outliers") and d["method"] not in _CLUSTER_METHODS:
        raise ConfigError(f"{where}: outliers work with methods exact and kmeans")
    if d["method"] not in METHODS:
        raise ConfigError(
            f"{where}: method {d['method']!r} is unknown; choose {', '.join(METHODS)}"
        )
    if d["method"] == "nf4" and d.get("bits") not in (None, 4):
        raise ConfigError(
            f"{where}: nf4 has a fixed 4-bit table, got bits={d['bits']}; for other widths use "
            "a learned codebook (method scaled-lloyd) or rtn"
        )
    if d["method"] in ("nf4", "rtn", "rtn-sym") and d.get("codebook_dtype", "float32") != "float32":
        raise ConfigError(
            f"{where}: method {d['method']} has a fixed table and float16 scales; "
            "codebook_dtype works with methods exact and kmeans (and vector codebooks)"
        )
    if d["init"] not in INITS:
        raise ConfigError(f"{where}: init {d['init']!r} is unknown; choose {', '.join(INITS)}")
    if d["codebook_dtype"] not in CODEBOOK_DTYPES:
        raise ConfigError(
            f"{where}: codebook_dtype {d['codebook_dtype']!r} is unknown; choose {', '.join(CODEBOOK_DTYPES)}"
        )


# Which layers of a transformer to cluster: ``{preset: (include, extra exclude)}``.
# Names follow the usual module paths: self_attn / attn / attention (Llama, Whisper,
# GPT-2, BERT: attention.self.query ... attention.output.dense) and mlp / fc1 / fc2 /
# intermediate / <layer>.output.dense (BERT's feed-forward output, which "attention"
# globs exclude). Embeddings and heads are in "all" only.
_ATTENTION = ("*attn*", "*attention*")
LAYER_PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "all": (("*",), ()),
    "attention": (_ATTENTION, ()),
    "mlp": (("*mlp*", "*.fc1", "*.fc2", "*intermediate*", "*.output.dense"), _ATTENTION),
}


def layer_preset(name: str) -> dict:
    """``include``/``exclude`` for a :data:`LAYER_PRESETS` name, to pass to ClusterConfig
    (the default exclusions stay)."""
    if name not in LAYER_PRESETS:
        raise ConfigError(f"layer preset {name!r} is unknown; choose {', '.join(LAYER_PRESETS)}")
    include, exclude = LAYER_PRESETS[name]
    return {"include": include, "exclude": DEFAULT_EXCLUDE + exclude}
