"""Named recipes (presets) and the runtime baselines, and the one resolver that
turns a name, a spec string or a JSON file into something ``compress``/``compare``
can run.

Preset names say what they are: ``kmeans-<bits>b-<tensor|channel>`` (plain k-means,
what the course asks for), ``scaled-<bits>b`` (a learned codebook per tensor over
absmax-scaled groups of 64: the best clustering without calibration data),
``budget-<bits>`` (the best measured recipe for an average of that many bits per
weight, everything counted: bits and scale groups chosen per layer and per token
row range, Fisher-weighted; ``-distill`` also trains the codebooks on real data), and
the quantization baselines ``nf4``, ``int<bits>-rtn``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..registry import Registry
from .recipe import Recipe, parse_spec
from .settings import KMeans, ScaledCodebook

__all__ = [
    "BASELINES",
    "DEFAULT_COMPARE",
    "PRESETS",
    "Method",
    "get_recipe",
    "resolve_method",
    "split_methods",
]


@dataclass(frozen=True)
class Preset:
    spec: str
    help: str
    family: str = ""


PRESETS: Registry[Preset] = Registry("recipe preset")


def _preset(name: str, spec: str, help: str) -> None:
    PRESETS.register(name, help)(Preset(spec, help))


for _b in (8, 4):
    for _g in ("tensor", "channel"):
        _preset(
            f"kmeans-{_b}b-{_g}",
            f"kmeans:bits={_b},granularity={_g}",
            f"plain k-means, {_b}-bit codes, one optimal codebook per {_g}",
        )
_preset(
    "kmeans-3b-channel",
    "kmeans:bits=3",
    "plain k-means, 3-bit codes, one optimal codebook per channel",
)
_preset(
    "scaled-4b",
    "scaled:bits=4",
    "recommended without data: a learned 4-bit codebook per tensor over absmax-scaled "
    "groups of 64 (4.25 bits per clustered weight; positional tables stay fp32)",
)
_preset(
    "scaled-3b",
    "scaled:bits=3",
    "a learned 3-bit codebook per tensor over absmax-scaled groups of 64 (3.25 bits per "
    "clustered weight)",
)
_BUDGET = "scaled:fit=fit+exclude:none+fisher+budget:{b}"
for _t in ("4.25", "3.25"):
    _preset(
        f"budget-{_t}",
        _BUDGET.format(b=_t),
        f"best measured at <= {_t} bits/weight: bits and scale groups per layer (and per "
        "token-row range), fitted scales, Fisher-weighted on the calibration data",
    )
_preset(
    "budget-4.25-int8",
    _BUDGET.format(b="4.25") + "+int8",
    "budget-4.25 whose products of many rows (a Whisper encoder's frames) run as int8 "
    "GEMMs: faster on CPUs with VNNI, adds 8-bit activation error",
)
_preset(
    "budget-4.25-distill",
    _BUDGET.format(b="4.25") + "+distill",
    "budget-4.25, then codebooks and scales distilled toward the original (2 epochs) on "
    "real data of the model's domain",
)
_preset(
    "budget-4.25-gptq",
    _BUDGET.replace("fisher", "fisher:items=16").format(b="4.25") + "+gptq:items=256",
    "budget-4.25 (Fisher on the first 16 items), then GPTQ codes (inputs in order of "
    "decreasing energy) and scales re-fitted to each layer's output, from the input "
    "Hessians of up to 256 items of real data of the model's domain",
)
_preset(
    "budget-3.25-gptq",
    _BUDGET.replace("fisher", "fisher:items=16").format(b="3.25") + "+gptq:items=256",
    "budget-3.25 (Fisher on the first 16 items), then GPTQ codes and scales re-fitted to "
    "each layer's output, from the input Hessians of up to 256 items of real data of the "
    "model's domain",
)
_preset(
    "budget-3.25-distill",
    _BUDGET.replace("fisher", "fisher:items=16").format(b="3.25")
    + "+gptq:items=256+distill:epochs=3,lr=5e-05,holdout=0.2,hidden=1,items=100",
    "budget-3.25-gptq, then codebooks and scales distilled on the first 100 items (3 "
    "epochs, best of 20% held out, every layer's output matched) of real data of the "
    "model's domain",
)
_preset("nf4", "nf4", "baseline: NF4 (QLoRA's 16-value table), absmax scale per 64")
_preset("int8-rtn", "rtn:bits=8", "baseline: int8 round-to-nearest per 128")
_preset("int4-rtn", "rtn:bits=4", "baseline: int4 round-to-nearest per 128 (asymmetric)")
_preset("int3-rtn", "rtn:bits=3,group_size=64", "baseline: int3 round-to-nearest per 64")


# -- runtime baselines: transforms of the original model with no safe file format --
@dataclass(frozen=True)
class Baseline:
    label: str
    apply: object  # (model) -> model
    notes: str = ""


BASELINES: Registry[Baseline] = Registry("baseline")


def _baseline(name: str, label: str, notes: str = ""):
    def deco(fn):
        BASELINES.register(name, label)(Baseline(label, fn, notes))
        return fn

    return deco


@_baseline("fp32", "Original (fp32)")
def _fp32(model):
    return model


@_baseline(
    "int8-dynamic",
    "torch dynamic int8 (Linear only)",
    "torch.ao dynamic quantization of nn.Linear; no safe file format, size computed",
)
def _int8_dynamic(model):
    import torch

    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _torchao(config_name: str, **kw):
    def apply(model):
        import torch

        try:
            import torchao.quantization as q
        except ImportError as e:
            raise RuntimeError(
                f"torchao is not installed: pip install 'wclust[bench]' ({e})"
            ) from None
        q.quantize_(
            model,
            getattr(q, config_name)(**kw),
            filter_fn=lambda m, n: isinstance(m, torch.nn.Linear),
        )
        return model

    return apply


BASELINES.register("torchao-int8wo", "torchao int8 weight-only")(
    Baseline("torchao int8 weight-only", _torchao("Int8WeightOnlyConfig"), "torchao on nn.Linear")
)
BASELINES.register("torchao-int4wo", "torchao int4 weight-only (group 128)")(
    Baseline(
        "torchao int4 weight-only (group 128)",
        _torchao("Int4WeightOnlyConfig", group_size=128),
        "torchao on nn.Linear",
    )
)


# -- resolving what the user named --------------------------------------------------
def get_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from a Recipe, a preset name, a spec string, a JSON file path
    or a dict.

    Raises:
        ConfigError: nothing by that name, or a bad spec (the message says why).
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if not isinstance(recipe, (str, Path)):
        raise ConfigError(
            f"a recipe is a Recipe, a preset name, a spec string or a JSON file, got "
            f"{type(recipe).__name__}"
        )
    text = str(recipe).strip()
    if text in PRESETS:
        return parse_spec(PRESETS.get(text).spec)
    if text.endswith(".json"):
        if not Path(text).is_file():
            raise ConfigError(f"recipe file {text}: no such file")
        return Recipe.from_json(text)
    head = re.split(r"[:+]", text, maxsplit=1)[0]
    from .settings import QUANTIZERS

    if head not in QUANTIZERS:
        raise ConfigError(
            f"{text!r} is neither a preset ({', '.join(PRESETS.names())}) nor a spec "
            f"starting with a quantizer ({', '.join(QUANTIZERS)}), nor a .json file"
        )
    return parse_spec(text)


@dataclass(frozen=True)
class Method:
    """One row of ``wclust compare``: a recipe (file-producing) or a runtime baseline."""

    name: str
    label: str
    family: str  # original | clustering | quantization | hybrid
    recipe: Recipe | None = None
    runtime: str | None = None  # a BASELINES name applied after loading the original
    notes: str = ""

    @property
    def spec(self) -> str:
        """The recipe's spec string ("" for baselines and recipes with overrides)."""
        if self.recipe is None or self.recipe.overrides:
            return ""
        return self.recipe.spec()

    @property
    def needs_real_data(self) -> bool:
        return self.recipe is not None and self.recipe.distill is not None

    @property
    def calibrated(self) -> bool:
        r = self.recipe
        return r is not None and (r.calibration is not None or r.gptq is not None)

    @property
    def artifact_name(self) -> str:
        """A file-name-safe name: the preset name, or the spec with a short hash."""
        if self.recipe is None:
            return "fp32"
        if re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            return self.name
        digest = hashlib.sha1(json.dumps(self.recipe.to_dict(), sort_keys=True).encode())
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)[:60] + "-" + digest.hexdigest()[:8]


def _family(r: Recipe) -> str:
    q = r.quantizer
    if isinstance(q, (KMeans, ScaledCodebook)):
        hybrid = r.prune is not None or (isinstance(q, KMeans) and q.codebook_dtype != "float32")
        return "hybrid" if hybrid else "clustering"
    return "quantization"


def resolve_method(text: str) -> Method:
    """What ``compare --methods`` runs for one name: a runtime baseline, a preset, a
    spec string or a recipe JSON file.

    Raises:
        ConfigError: unknown name or bad spec.
    """
    text = text.strip()
    if text in BASELINES:
        b = BASELINES.get(text)
        if text == "fp32":
            return Method("fp32", b.label, "original")
        return Method(text, b.label, "quantization", runtime=text, notes=b.notes)
    try:
        recipe = get_recipe(text)
    except ConfigError as e:
        if text in PRESETS or ":" in text or "+" in text or text.endswith(".json"):
            raise
        raise ConfigError(f"{e}; runtime baselines: {', '.join(BASELINES.names())}") from None
    name = text if text in PRESETS else (Path(text).stem if text.endswith(".json") else text)
    notes = ""
    if recipe.calibration is not None:
        notes = f"calibrated ({recipe.calibration.kind}) on the calibration data"
    if recipe.distill is not None:
        notes += (
            "; distilled on it (real data of the model's domain, apart from the evaluation data)"
        )
    return Method(name, recipe.label(), _family(recipe), recipe=recipe, notes=notes)


def split_methods(text: str) -> list[str]:
    """``compare --methods`` text as names: comma-separated, where a part that is a
    bare ``key=value`` continues the spec before it (``kmeans:bits=4,granularity=tensor``
    is one spec); ``;`` also separates."""
    out: list[str] = []
    for chunk in text.split(";"):
        for part in chunk.split(","):
            part = part.strip()
            if not part:
                continue
            key = part.split("=", 1)[0]
            if "=" in part and out and not re.search(r"[:+]", key):
                out[-1] += "," + part
            else:
                out.append(part)
    return out


# What `wclust compare` runs with no --methods: the original, the recommended
# clustering at about 4.25 and 8 bits, plain per-channel k-means (the course's), and
# the quantization a user would pick instead at equal bits.
DEFAULT_COMPARE = (
    "fp32",
    "kmeans-8b-tensor",
    "kmeans-4b-channel",
    "budget-4.25",
    "nf4",
    "int4-rtn",
    "int8-dynamic",
)
