"""The per-layer compression report: what was done to every weight, and the totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CompressionReport", "LayerReport"]


@dataclass
class LayerReport:
    """One weight of the model and what happened to it.

    ``name`` is the first owner module; ``shared_with`` lists other modules that
    use the same weight (tied embeddings). ``status`` is "clustered" or
    "dense"; ``reason`` says why a weight stayed dense. A weight clustered in row
    ranges (``row_split``) reports its widest ``bits`` and lists each range.
    """

    name: str
    type: str
    shape: list[int]
    status: str
    reason: str = ""
    shared_with: list[str] = field(default_factory=list)
    bits: int | None = None
    n_clusters: int | None = None
    granularity: str | None = None
    group_size: int | None = None
    method: str | None = None
    codebook_dtype: str | None = None
    n_codebooks: int | None = None
    distinct_values: int | None = None
    mse: float | None = None
    rel_error: float | None = None
    numel: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    # a row-split weight: [{"rows": [start, end], "bits": ..., "group_size": ...}, ...]
    row_split: list | None = None
    # weights per code of a vector codebook (``bits`` is then the code width)
    cluster_dim: int | None = None


@dataclass
class CompressionReport:
    """All weights of a model plus everything else it stores.

    ``other_numel`` / ``other_bytes`` count the tensors that are not layer weights
    (biases, norms, buffers, positional tables kept dense). Bits per weight is
    computed over every parameter of the model, everything counted.
    """

    layers: list[LayerReport] = field(default_factory=list)
    other_numel: int = 0
    other_bytes: int = 0
    seconds: float = 0.0
    # seconds per pipeline stage ({"calibrate": 41.2, "allocate": 60.3, ...})
    stages: dict = field(default_factory=dict)
    # the recipe that made it (Recipe.to_dict), None when only clustered by a config
    recipe: dict | None = None
    # what distillation did (items, epochs kept, KL), None without it
    distill: dict | None = None
    # the ClusterConfig the clustering stage ran (after the bit budget): not serialized
    config: object = field(default=None, repr=False, compare=False)

    @property
    def clustered(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "clustered"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers) + self.other_bytes

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers) + self.other_bytes

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers) + self.other_numel

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / max(self.numel, 1)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "other_numel": self.other_numel,
            "other_bytes": self.other_bytes,
            "seconds": self.seconds,
            "stages": dict(self.stages),
            "recipe": self.recipe,
            "distill": self.distill,
            "totals": {
                "numel": self.numel,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "bits_per_weight": self.bits_per_weight,
                "ratio": self.ratio,
                "layers_clustered": len(self.clustered),
                "layers_dense": len(self.layers) - len(self.clustered),
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> CompressionReport:
        names = set(LayerReport.__dataclass_fields__)
        layers = [LayerReport(**{k: v for k, v in r.items() if k in names}) for r in d["layers"]]
        return cls(
            layers,
            int(d["other_numel"]),
            int(d["other_bytes"]),
            float(d.get("seconds", 0)),
            dict(d.get("stages") or {}),
            d.get("recipe"),
            d.get("distill"),
        )

    def summary(self) -> str:
        return (
            f"{len(self.clustered)}/{len(self.layers)} weights clustered, "
            f"{self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB "
            f"({self.ratio:.2f}x, {self.bits_per_weight:.3f} bits/weight)"
        )
