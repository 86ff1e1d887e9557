"""``Recipe``: everything done to a model, validated, serializable, and written as a
short spec string.

A recipe is a per-tensor quantizer (typed settings, ``recipes.settings``) plus the
optional stages around it, run in this order by ``wclust.compress_``: prune ->
calibrate -> allocate bits under a budget -> cluster -> GPTQ -> distil.

Spec strings map field for field onto the recipe: the quantizer, then ``+stage``
parts, each with ``:key=value,...`` (``|`` separates list items; a stage's main
field may be given without its key)::

    kmeans:bits=4,granularity=channel
    scaled:bits=4,group_size=64,fit=lloyd
    scaled:fit=fit+exclude:none+fisher+budget:4.25
    kmeans:keep_zeros=true+prune:0.5
    scaled:bits=3+fisher:items=32+gptq+distill:epochs=8,lr=5e-5,holdout=0.2

Per-layer overrides do not fit a spec string; they live in the JSON form
(``Recipe.to_dict`` / ``Recipe.from_dict``, ``wclust compress --recipe FILE.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..config import (
    DEFAULT_EXCLUDE,
    LAYER_PRESETS,
    SUPPORTED_LAYER_TYPES,
    ClusterConfig,
    ConfigError,
)
from .settings import NF4, RTN, KMeans, Quantizer, ScaledCodebook, quantizer_dict, quantizer_from

__all__ = [
    "Budget",
    "Calibration",
    "Distill",
    "GPTQ",
    "RECIPE_VERSION",
    "Recipe",
    "describe",
    "format_spec",
    "parse_spec",
]

RECIPE_VERSION = 1


def _fields_error(stage: str, cls, values: dict, hide: tuple[str, ...] = ()) -> None:
    """Refuses ``values`` naming a field ``cls`` lacks; the message lists its fields
    except ``hide``."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{stage} has no field(s) {', '.join(map(repr, unknown))}; its fields: "
            f"{', '.join(n for n in names if n not in hide)}"
        )


@dataclass(frozen=True)
class Calibration:
    """Importance of each weight from calibration data (``wclust.stages.calibrate``).

    Args:
        kind: "fisher" (mean squared gradient of the model's loss) | "activation"
            (mean squared input per column).
        items: how many data items to calibrate on (the first ones). None: 16, or
            all of the distillation data when the recipe also distils.
    """

    kind: str = "fisher"
    items: int | None = None

    def __post_init__(self):
        if self.kind not in ("fisher", "activation"):
            raise ConfigError(f"calibration kind must be fisher or activation, got {self.kind!r}")
        if self.items is not None and (type(self.items) is not int or self.items < 1):
            raise ConfigError(f"calibration items must be a positive integer, got {self.items!r}")


@dataclass(frozen=True)
class Budget:
    """Bits per layer chosen under an average (``wclust.stages.allocate.allocate_bits``).

    Args:
        bits: average bits per weight over every parameter, everything counted.
        candidates: settings each layer may take: widths (``4``), ``(bits,
            group_size)`` pairs or ``(bits, group_size, cluster_dim)`` triples (vector
            codes of ``cluster_dim`` weights; spec ``3x64x2``); empty: (3,128) (4,128)
            (4,64) (5,64) (8,64) for the scaled quantizers, widths 2-8 otherwise.
        rows: "auto": token embeddings choose bits per row range (frequent tokens
            first: cuts at rows 4000/16000/32000); "none": one setting per layer.
    """

    bits: float
    candidates: tuple = ()
    rows: str = "auto"

    def __post_init__(self):
        if not isinstance(self.bits, (int, float)) or not 1 <= self.bits <= 32:
            raise ConfigError(f"budget bits must be a number in [1, 32], got {self.bits!r}")
        object.__setattr__(self, "bits", float(self.bits))
        cands = []
        for c in self.candidates:
            if isinstance(c, (list, tuple)) and len(c) in (2, 3):
                c = tuple(int(v) for v in c)
                if len(c) == 3 and c[2] not in (1, 2, 4, 8):
                    raise ConfigError(f"budget candidate {c!r}: cluster_dim must be 1, 2, 4 or 8")
            elif type(c) is not int:
                raise ConfigError(
                    "budget candidates are widths, (bits, group_size) pairs or (bits, "
                    f"group_size, cluster_dim) triples, got {c!r}"
                )
            cands.append(c)
        object.__setattr__(self, "candidates", tuple(cands))
        if self.rows not in ("auto", "none"):
            raise ConfigError(f"budget rows must be auto or none, got {self.rows!r}")


@dataclass(frozen=True)
class GPTQ:
    """Codes re-chosen column by column against each layer's inputs (GPTQ error
    feedback), for quantizers with one codebook per tensor and scales per group.

    Args:
        damp: added to the Hessian's diagonal, times its mean.
        exclude: module-name globs whose codes stay nearest.
        items: data items the input Hessians come from; None: the calibration items
            (or all of the distillation data when the recipe distils). Hessians need
            many more input rows than Fisher weights need items: a decoder layer's
            inputs are a few dozen tokens per clip.
        act_order: round the inputs with the largest Hessian diagonal first (GPTQ's
            ``desc_act``). On whisper-base it lowers the KL to the original at 3.25 and
            4.25 bits, most on the token table's use as output projection, whose inputs
            have a few dimensions of much larger energy.
        embed_damp: the damping of a weight that is also read as an embedding table (a
            token table tied to the output projection): GPTQ sees only its use as a
            Linear layer, while its looked-up rows carry the raw weight error, so it
            takes a larger damping. None: ``damp``. On whisper-base 0.1 gave the
            lowest KL to the original of 0.01, 0.03, 0.1, 0.3 and 1 at 3.25 bits.
        refit: rounds of re-fitting each row's scales to the layer's output error for
            the codes just chosen, each but the last followed by new codes. One round
            lowered the KL to the original at 3.25 and 4.25 bits on whisper-base; three
            raised it.
        dim: weights per code. Above 1, each scalar codebook of up to 8 // dim bits
            (256 centroids; not a token table's) is first clustered again as a vector codebook of ``dim``
            consecutive weights at the same bits, then its codes are chosen ``dim``
            columns at a time (GPTVQ; ``stages.gptq.gptvq_codes``). A budget then
            keeps room for the larger codebooks.
        refit_codebook: in each ``refit`` round, after the scales, also re-fit each
            layer's shared codebook to its output error for the codes chosen
            (``stages.gptq.refit_codebook``; GPTVQ's codebook update). Token tables
            keep theirs. On whisper-base at 3.25 bits it moved the KL to the original
            by under 1% (pairs 0.0547 -> 0.0544, scalar 0.0644 -> 0.0645): a codebook
            of 8 or 64 centroids shared by a whole matrix is already pinned down by
            its weights, so it is off by default.
    """

    damp: float = 0.01
    exclude: tuple[str, ...] = ()
    items: int | None = None
    act_order: bool = True
    embed_damp: float | None = 0.1
    refit: int = 1
    dim: int = 1
    refit_codebook: bool = False

    def __post_init__(self):
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise ConfigError(f"gptq damp must be positive, got {self.damp!r}")
        if self.items is not None and (type(self.items) is not int or self.items < 1):
            raise ConfigError(f"gptq items must be a positive integer, got {self.items!r}")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"gptq act_order is true or false, got {self.act_order!r}")
        if self.embed_damp is not None and (
            not isinstance(self.embed_damp, (int, float))
            or isinstance(self.embed_damp, bool)
            or not self.embed_damp > 0
        ):
            raise ConfigError(f"gptq embed_damp must be positive, got {self.embed_damp!r}")
        if type(self.refit) is not int or self.refit < 0:
            raise ConfigError(f"gptq refit must be an integer >= 0, got {self.refit!r}")
        if self.dim not in (1, 2, 4) or type(self.dim) is not int:
            raise ConfigError(f"gptq dim is 1, 2 or 4 weights per code, got {self.dim!r}")
        if not isinstance(self.refit_codebook, bool):
            raise ConfigError(f"gptq refit_codebook is true or false, got {self.refit_codebook!r}")
        if self.refit_codebook and not self.refit:
            raise ConfigError("gptq refit_codebook=true needs refit >= 1 (the rounds it runs in)")
        object.__setattr__(self, "exclude", _globs(self.exclude))

    def refine_kwargs(self) -> dict:
        """The keyword arguments of ``stages.gptq.gptq_refine_`` this stage sets."""
        return {
            "damp": self.damp,
            "act_order": self.act_order,
            "embed_damp": self.embed_damp,
            "refit": self.refit,
            "cluster_dim": self.dim,
            "refit_codebook": self.refit_codebook,
        }


@dataclass(frozen=True)
class Distill:
    """Codebooks and scales trained so the outputs match the original's
    (``wclust.distill_``); needs real data of the model's domain.

    Args:
        epochs: passes over the training data.
        lr: learning rate of codebooks and scales (norms and biases: lr/10).
        holdout: fraction held out; the epoch with the lowest held-out KL is kept.
        hidden: weight of matching every layer's output as well.
        speeds: also train on the clips played at these speeds (speech only).
        items: how many data items to distil on (None: all).
        reassign: if > 0, the codes move too: every this many steps each weight takes
            the centroid nearest a full-precision shadow that follows its gradient
            (straight-through; scalar codebooks). 0: codes fixed.
        reassign_lr: the shadows' learning rate.
    """

    epochs: int = 2
    lr: float = 3e-5
    holdout: float = 0.0
    hidden: float = 0.0
    speeds: tuple[float, ...] = ()
    items: int | None = None
    reassign: int = 0
    reassign_lr: float = 1e-4

    def __post_init__(self):
        if type(self.epochs) is not int or self.epochs < 1:
            raise ConfigError(f"distill epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"distill lr must be positive, got {self.lr!r}")
        if not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise ConfigError(f"distill holdout must be in [0, 1), got {self.holdout!r}")
        if not isinstance(self.hidden, (int, float)) or self.hidden < 0:
            raise ConfigError(f"distill hidden must be >= 0, got {self.hidden!r}")
        speeds = tuple(float(s) for s in self.speeds)
        if any(not 0 < s or s == 1 for s in speeds):
            raise ConfigError(f"distill speeds must be positive factors other than 1, got {speeds}")
        object.__setattr__(self, "speeds", speeds)
        if self.items is not None and (type(self.items) is not int or self.items < 1):
            raise ConfigError(f"distill items must be a positive integer, got {self.items!r}")
        if type(self.reassign) is not int or self.reassign < 0:
            raise ConfigError(
                f"distill reassign must be a non-negative integer (steps), got {self.reassign!r}"
            )
        if not isinstance(self.reassign_lr, (int, float)) or not self.reassign_lr > 0:
            raise ConfigError(f"distill reassign_lr must be positive, got {self.reassign_lr!r}")


def _globs(val) -> tuple[str, ...]:
    if isinstance(val, str):
        val = (val,)
    out = tuple(val)
    if not all(isinstance(g, str) for g in out):
        raise ConfigError(f"module-name globs must be strings, got {val!r}")
    return out


_OVERRIDE_EXTRA = ("skip", "row_split")


@dataclass(frozen=True)
class Recipe:
    """Everything done to a model: one quantizer for every selected layer, per-layer
    overrides, and the optional stages.

    Args:
        quantizer: typed settings (``KMeans``, ``ScaledCodebook``, ``NF4``, ``RTN``).
        include: module-name globs to compress (fnmatch).
        exclude: globs kept dense (default: positional tables).
        layer_types: module class names to compress.
        min_numel: weights with fewer elements stay dense.
        overrides: ``{glob: {field: value}}`` in order: fields of the quantizer
            (``{"bits": 8}``), a whole other quantizer (``{"kind": "nf4"}``),
            ``skip``, or ``row_split`` (``[{"until": row, "bits": b}, ...]``).
        prune: magnitude-prune this fraction first (needs kmeans with keep_zeros).
        calibration: importance weights, or None.
        budget: bits chosen per layer under an average, or None.
        gptq: GPTQ codes, or None.
        distill: distillation toward the original, or None.
        int8_matmul: the compressed Linear layers compute products of many rows (an
            encoder's frames) in int8 (``nn.modules.set_int8_matmul``); a runtime
            setting stored in the file. Spec stage ``int8``.
        seed: RNG seed.
    """

    quantizer: Quantizer = field(default_factory=KMeans)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    layer_types: tuple[str, ...] = SUPPORTED_LAYER_TYPES
    min_numel: int = 0
    overrides: dict = field(default_factory=dict)
    prune: float | None = None
    calibration: Calibration | None = None
    budget: Budget | None = None
    gptq: GPTQ | None = None
    distill: Distill | None = None
    int8_matmul: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("include", "exclude", "layer_types"):
            object.__setattr__(self, name, _globs(getattr(self, name)))
        if self.prune is not None:
            if not isinstance(self.prune, (int, float)) or not 0 < self.prune < 1:
                raise ConfigError(f"prune must be a fraction in (0, 1), got {self.prune!r}")
            if not (isinstance(self.quantizer, KMeans) and self.quantizer.keep_zeros):
                raise ConfigError(
                    "prune needs the kmeans quantizer with keep_zeros=true, so that the "
                    "pruned weights stay zero (e.g. kmeans:keep_zeros=true+prune:0.5)"
                )
        if self.gptq is not None and isinstance(self.quantizer, KMeans):
            raise ConfigError(
                "gptq re-chooses codes of a codebook per tensor with scales per group: use "
                "the scaled, nf4 or rtn quantizer"
            )
        self.cluster_config()  # validates selection and overrides

    @property
    def calibration_items(self) -> int:
        """Data items calibration (Fisher weights, and GPTQ Hessians without their own
        count) runs on when the recipe does not distil: its own count, else 16."""
        return (self.calibration.items if self.calibration else None) or 16

    @property
    def data_items(self) -> int | None:
        """How many data items (the first ones) the recipe reads; None: all of them
        (a distilling recipe without a count)."""
        gptq = self.gptq.items if self.gptq else None
        if self.distill is not None:
            d = self.distill.items
            return None if d is None else max(d, gptq or 0)
        n = self.calibration_items if self.calibration else 0
        if self.gptq is not None:
            n = max(n, gptq or self.calibration_items)
        return n or self.calibration_items

    # -- the per-layer form compress_ works on -------------------------------------
    def _layer_overrides(self) -> dict:
        out = {}
        base = self.quantizer
        for pat, ov in self.overrides.items():
            if not isinstance(ov, dict):
                raise ConfigError(f"override for {pat!r} must be a dict of fields, got {ov!r}")
            ov = dict(ov)
            extra = {k: ov.pop(k) for k in _OVERRIDE_EXTRA if k in ov}
            kind = ov.pop("kind", None)
            if kind is not None:
                q = quantizer_from(kind, ov)
            else:
                vals = quantizer_dict(base)
                vals.pop("kind")
                if "n_clusters" in ov:
                    vals.pop("bits", None)
                if "bits" in ov:
                    vals.pop("n_clusters", None)
                try:
                    q = quantizer_from(base.kind, {**vals, **ov})
                except ConfigError as e:
                    raise ConfigError(f"override {pat!r}: {e}") from None
            out[pat] = {**(q.layer() if (kind or ov) else {}), **extra}
        return out

    def cluster_config(self) -> ClusterConfig:
        """The :class:`ClusterConfig` the clustering stage runs (before any budget)."""
        layer = self.quantizer.layer()
        return ClusterConfig(
            **{k: v for k, v in layer.items()},
            include=self.include,
            exclude=self.exclude,
            layer_types=self.layer_types,
            min_numel=self.min_numel,
            overrides=self._layer_overrides(),
            seed=self.seed,
        )

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"version": RECIPE_VERSION, "quantizer": quantizer_dict(self.quantizer)}
        default = Recipe()
        for f in fields(self):
            if f.name == "quantizer":
                continue
            v = getattr(self, f.name)
            if v == getattr(default, f.name):
                continue
            if f.name in ("calibration", "budget", "gptq", "distill"):
                v = {k.name: _plain(getattr(v, k.name)) for k in fields(v)}
            d[f.name] = _plain(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise ConfigError(f"a recipe is a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise ConfigError(
                f"recipe version {version!r} is newer than this wclust understands "
                f"({RECIPE_VERSION}); upgrade wclust"
            )
        _fields_error("recipe", cls, d)
        q = dict(d.pop("quantizer", {"kind": "kmeans"}))
        kind = q.pop("kind", None)
        if kind is None:
            raise ConfigError('recipe quantizer needs a "kind" (kmeans, scaled, nf4, rtn)')
        kw = {"quantizer": quantizer_from(kind, q)}
        for name, stage in (
            ("calibration", Calibration),
            ("budget", Budget),
            ("gptq", GPTQ),
            ("distill", Distill),
        ):
            v = d.pop(name, None)
            if v is not None:
                if not isinstance(v, dict):
                    raise ConfigError(f"recipe {name} must be an object, got {v!r}")
                _fields_error(name, stage, v)
                kw[name] = stage(
                    **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
                )
        return cls(**kw, **d)

    @classmethod
    def from_json(cls, path: str | Path) -> Recipe:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> Recipe:
        return replace(self, **changes)

    # -- names ---------------------------------------------------------------------
    def spec(self) -> str:
        """The canonical spec string (defaults left out).

        Raises:
            ConfigError: the recipe has per-layer overrides (use the JSON form).
        """
        return format_spec(self)

    def label(self) -> str:
        """A human-readable description for tables."""
        return describe(self)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def layer_selection(preset: str) -> dict:
    """``include``/``exclude`` of a layer preset (all | attention | mlp)."""
    if preset not in LAYER_PRESETS:
        raise ConfigError(f"layer preset {preset!r} is unknown; choose {', '.join(LAYER_PRESETS)}")
    include, exclude = LAYER_PRESETS[preset]
    return {"include": include, "exclude": DEFAULT_EXCLUDE + exclude}


# -- spec strings: Spec strings <-> recipes, and the labels tables show.
#
# ``QUANTIZER[:k=v,...][+STAGE[:k=v,...]]...``; stages: ``layers:attention|mlp|all``,
# ``include:GLOB|GLOB``, ``exclude:GLOB|GLOB`` (or ``none``), ``prune:FRACTION``,
# ``fisher[:items=N]``, ``activation[:items=N]``, ``budget:BITS[,candidates=3x128|4x64,
# rows=auto|none]``, ``gptq[:damp=D,exclude=GLOB|GLOB,items=N,dim=2]``, ``distill[:epochs=E,lr=L,
# holdout=H,hidden=W,speeds=0.9|1.1,items=N,reassign=STEPS,reassign_lr=L]``, ``seed:N``. A stage's main field (the
# first listed) may be written without its key.

_STAGES = ("layers", "include", "exclude", "prune", "fisher", "activation", "budget", "gptq")
_STAGES += ("distill", "int8", "seed")


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _list(v) -> tuple:
    if v is None:
        return ()
    return tuple(_value(x) for x in str(v).split("|")) if isinstance(v, str) else (v,)


def _pairs(part: str, head: str, main: str | None) -> dict:
    out = {}
    if not part:
        return out
    for i, item in enumerate(part.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            if i == 0 and main is not None:
                key, val = main, item
            else:
                raise ConfigError(
                    f"recipe spec part {head!r}: {item!r} is not key=value (e.g. "
                    f"{head}:{main or 'bits'}=4)"
                )
        key = key.strip()
        if key in out:
            raise ConfigError(f"recipe spec part {head!r} gives {key!r} twice")
        out[key] = (
            val.strip()
            if key in ("include", "exclude", "speeds", "candidates")
            else _value(val.strip())
        )
    return out


def parse_spec(spec: str) -> Recipe:
    """The recipe a spec string describes.

    Raises:
        ConfigError: with what is wrong and how to write it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a recipe spec is a non-empty string such as kmeans:bits=4")
    parts = [p.strip() for p in spec.strip().split("+")]
    head, _, rest = parts[0].partition(":")
    q = quantizer_from(head, _pairs(rest, head, None))
    kw: dict = {"quantizer": q}
    for part in parts[1:]:
        name, _, rest = part.partition(":")
        if name not in _STAGES:
            raise ConfigError(
                f"recipe spec stage {name!r} is unknown; stages: {', '.join(_STAGES)}"
            )
        if name in kw or (name in ("fisher", "activation") and "calibration" in kw):
            raise ConfigError(f"recipe spec gives stage {name!r} twice")
        if name == "layers":
            kw.update(layer_selection(rest))
        elif name in ("include", "exclude"):
            kw[name] = () if rest in ("", "none") else tuple(rest.split("|"))
        elif name == "prune":
            kw["prune"] = _pairs(rest, name, "fraction").get("fraction")
        elif name == "seed":
            kw["seed"] = _pairs(rest, name, "seed").get("seed")
        elif name == "int8":
            if rest:
                raise ConfigError("recipe spec stage 'int8' takes no settings: write +int8")
            kw["int8"] = True
        elif name in ("fisher", "activation"):
            kw["calibration"] = _stage(
                Calibration, name, {"kind": name, **_pairs(rest, name, "items")}
            )
        elif name == "budget":
            vals = _pairs(rest, name, "bits")
            if "candidates" in vals:
                vals["candidates"] = tuple(_candidate(c) for c in vals["candidates"].split("|"))
            kw["budget"] = _stage(Budget, name, vals)
        elif name == "gptq":
            vals = _pairs(rest, name, "damp")
            if "exclude" in vals:
                vals["exclude"] = tuple(vals["exclude"].split("|"))
            kw["gptq"] = _stage(GPTQ, name, vals)
        elif name == "distill":
            vals = _pairs(rest, name, "epochs")
            if "speeds" in vals:
                vals["speeds"] = tuple(float(s) for s in vals["speeds"].split("|"))
            kw["distill"] = _stage(Distill, name, vals)
    kw["int8_matmul"] = kw.pop("int8", False)
    return Recipe(**kw)


def _candidate(text: str):
    parts = text.split("x")
    try:
        if len(parts) > 3:
            raise ValueError
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"budget candidate {text!r}: write a width (4), bits x group size (4x64) or bits "
            "x group size x cluster_dim (3x64x2: vector codes of 2 weights)"
        ) from None
    return vals[0] if len(vals) == 1 else vals


def _stage(cls, name: str, vals: dict):
    _fields_error(f"recipe spec stage {name!r}", cls, vals, hide=("kind",))
    try:
        return cls(**vals)
    except TypeError as e:
        raise ConfigError(f"recipe spec stage {name!r}: {e}") from None


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "|".join(_fmt(x) for x in v)
    return str(v)


def _kv(d: dict, main: str | None = None) -> str:
    items = []
    for k, v in d.items():
        items.append(_fmt(v) if k == main and not items else f"{k}={_fmt(v)}")
    return ",".join(items)


def _changed(obj, main: str | None = None, skip: tuple = ()) -> dict:
    """Fields of a stage that differ from its defaults (``main`` always, first)."""
    default = {f.name: f.default for f in fields(obj) if f.default is not f.default_factory}
    out = {}
    if main is not None:
        out[main] = getattr(obj, main)
    for f in fields(obj):
        if f.name in skip or f.name == main:
            continue
        v = getattr(obj, f.name)
        if f.name not in default or v != default[f.name]:
            out[f.name] = v
    return out


def format_spec(r: Recipe) -> str:
    """The canonical spec string of ``r`` (defaults left out)."""
    if r.overrides:
        raise ConfigError(
            "this recipe has per-layer overrides, which a spec string cannot hold; save it "
            "as JSON (Recipe.to_dict) and pass the file"
        )
    q = quantizer_dict(r.quantizer)
    head = q.pop("kind")
    parts = [head + (":" + _kv(q) if q else "")]
    selection = {
        name: layer_selection(name) for name in ("attention", "mlp")
    }  # the layer presets other than "all"
    sel = next(
        (n for n, s in selection.items() if (r.include, r.exclude) == (s["include"], s["exclude"])),
        None,
    )
    if sel:
        parts.append(f"layers:{sel}")
    else:
        if r.include != ("*",):
            parts.append("include:" + "|".join(r.include))
        if r.exclude != DEFAULT_EXCLUDE:
            parts.append("exclude:" + ("|".join(r.exclude) or "none"))
    if r.layer_types != Recipe().layer_types or r.min_numel:
        raise ConfigError("layer_types and min_numel cannot be written in a spec string; use JSON")
    if r.prune is not None:
        parts.append(f"prune:{_fmt(r.prune)}")
    if r.calibration is not None:
        c = _changed(r.calibration, skip=("kind",))
        parts.append(r.calibration.kind + (":" + _kv(c) if c else ""))
    if r.budget is not None:
        b = _changed(r.budget, main="bits")
        if "candidates" in b:
            b["candidates"] = tuple(
                "x".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in b["candidates"]
            )
        parts.append("budget:" + _kv(b, main="bits"))
    if r.gptq is not None:
        g = _changed(r.gptq)
        parts.append("gptq" + (":" + _kv(g) if g else ""))
    if r.distill is not None:
        d = _changed(r.distill)
        parts.append("distill" + (":" + _kv(d) if d else ""))
    if r.int8_matmul:
        parts.append("int8")
    if r.seed:
        parts.append(f"seed:{r.seed}")
    return "+".join(parts)


def describe(r: Recipe) -> str:
    """A short human description of ``r``, e.g. 'k-means 4-bit per channel (exact)'."""
    q = r.quantizer
    if isinstance(q, KMeans):
        width = f"{q.bits}-bit" if q.bits is not None else f"{q.n_clusters}-cluster"
        where = {"tensor": "per tensor", "channel": "per channel"}.get(
            q.granularity, f"per group of {q.group_size}"
        )
        text = f"k-means {width} {where} ({q.algorithm})"
        if q.codebook_dtype != "float32":
            text += f", {q.codebook_dtype} codebook"
        if q.outliers:
            text += f", {q.outliers:.1%} outliers kept"
    elif isinstance(q, ScaledCodebook):
        start = {"exact": "exact", "lloyd": "Lloyd from NF", "fit": "Lloyd, fitted scales"}[q.fit]
        text = f"k-means {q.bits}-bit codebook per tensor ({start}), scale per {q.group_size}"
    elif isinstance(q, NF4):
        text = f"NF4, absmax scale per {q.group_size}"
    elif isinstance(q, RTN):
        sym = "sym." if q.symmetric else "asym."
        text = f"int{q.bits} round-to-nearest {sym} per {q.group_size}"
    else:  # pragma: no cover - the quantizer types are closed
        text = type(q).__name__
    if r.budget is not None:
        text = text.replace(f"{getattr(q, 'bits', 4)}-bit ", "")
        text += f", bits per layer for <= {r.budget.bits:g} bits/weight"
        if r.budget.rows == "auto":
            text += " (token rows apart)"
    if r.prune is not None:
        text = f"{r.prune:.0%} magnitude pruning + {text}"
    if r.include != ("*",):
        text += f", only {'|'.join(r.include)}"
    if r.calibration is not None:
        text += f", {r.calibration.kind}-weighted"
    if r.gptq is not None:
        text += (
            ", GPTQ codes"
            if r.gptq.dim == 1
            else f", vector codebooks ({r.gptq.dim} weights per code), GPTVQ codes"
        )
    if r.distill is not None:
        text += f", distilled ({r.distill.epochs} epochs)"
    if r.int8_matmul:
        text += ", int8 products of many rows"
    return text
