"""Named compression methods for ``wclust compare``: clustering settings, hybrids,
and the quantization a user would pick instead. Each is one registry entry.

A method either produces a .wclust file (clustering and the quantizers that share
its storage: NF4, integer round-to-nearest, k-means over normalized groups), or is a
runtime transform applied after loading the original (torch dynamic int8,
torchao), which has no safe file format.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from .allocate import EMBED_ROWS, GROUP_CANDIDATES
from .config import ClusterConfig
from .registry import METHODS

__all__ = ["CompareMethod", "DEFAULT_METHODS", "apply_method", "get_method"]


@dataclass(frozen=True)
class CompareMethod:
    name: str
    label: str
    family: str  # original | clustering | quantization | hybrid
    config: ClusterConfig | None = None
    prune: float | None = None  # magnitude-prune this fraction first (keep_zeros)
    runtime: str | None = None  # transform applied after loading the original
    calibrate: str | None = None  # "fisher" | "activation": importance-weighted clustering
    calib_items: int = 16  # calibration items, from the task's built-in data
    target_bits: float | None = None  # per-layer bits chosen under this average
    gptq: bool = False  # re-choose codes with GPTQ error feedback (input Hessians)
    # distil the compressed model toward the original on the calibration data
    # (train.distill_ options, e.g. {"epochs": 2, "lr": 3e-5}, "holdout": the
    # fraction held out for early stopping, "speeds": also train on the training
    # clips at these speeds, "hidden": weight of matching every layer's output);
    # needs the user's real data
    distill: dict | None = None
    # extra["gptq"]: options for gptq_refine_ ({"damp": float, "exclude": [globs]});
    # extra["candidates"]: allocate_bits candidates ((bits, group_size) pairs)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _add(m: CompareMethod) -> None:
    METHODS.register(m.name, m.label)(m)


_C = ClusterConfig
_add(CompareMethod("fp32", "Original (fp32)", "original"))
for b in (8, 6, 4, 3):
    _add(
        CompareMethod(
            f"cluster-{b}b-channel",
            f"k-means {b}-bit per channel (exact)",
            "clustering",
            _C(bits=b, granularity="channel", method="exact"),
        )
    )
for b in (8, 4):
    _add(
        CompareMethod(
            f"cluster-{b}b-tensor",
            f"k-means {b}-bit per tensor (exact)",
            "clustering",
            _C(bits=b, granularity="tensor", method="exact"),
        )
    )
_add(
    CompareMethod(
        "cluster-4b-channel-lloyd",
        "k-means 4-bit per channel (Lloyd, k-means++)",
        "clustering",
        _C(bits=4, granularity="channel", method="kmeans"),
    )
)
_add(
    CompareMethod(
        "cluster-4b-g128",
        "k-means 4-bit per group of 128 (exact)",
        "clustering",
        _C(bits=4, granularity="group", group_size=128, method="exact"),
    )
)
for b, g in ((4, 64), (3, 64)):
    _add(
        CompareMethod(
            f"scaled-{b}b-g{g}",
            f"k-means {b}-bit codebook per tensor, absmax scale per {g}",
            "clustering",
            _C(bits=b, group_size=g, method="scaled-exact"),
        )
    )
_add(
    CompareMethod(
        "cluster-4b-channel-fp16cb",
        "k-means 4-bit per channel + fp16 codebook",
        "hybrid",
        _C(bits=4, granularity="channel", codebook_dtype="float16"),
    )
)
_add(
    CompareMethod(
        "cluster-4b-channel-int8cb",
        "k-means 4-bit per channel + int8 codebook",
        "hybrid",
        _C(bits=4, granularity="channel", codebook_dtype="int8"),
    )
)
_add(
    CompareMethod(
        "prune50-cluster-4b",
        "50% magnitude pruning + k-means 4-bit per channel",
        "hybrid",
        _C(bits=4, granularity="channel", keep_zeros=True),
        prune=0.5,
    )
)
_add(
    CompareMethod(
        "nf4-g64",
        "NF4, absmax scale per 64 (fixed 16-value codebook)",
        "quantization",
        _C(bits=4, group_size=64, method="nf4"),
    )
)
_add(
    CompareMethod(
        "int8-rtn-g128",
        "int8 round-to-nearest per 128",
        "quantization",
        _C(bits=8, group_size=128, method="rtn"),
    )
)
_add(
    CompareMethod(
        "int4-rtn-g128",
        "int4 round-to-nearest asym. per 128",
        "quantization",
        _C(bits=4, group_size=128, method="rtn"),
    )
)
_add(
    CompareMethod(
        "int3-rtn-g64",
        "int3 round-to-nearest asym. per 64",
        "quantization",
        _C(bits=3, group_size=64, method="rtn"),
    )
)
_add(
    CompareMethod(
        "int8-dynamic",
        "torch dynamic int8 (Linear only)",
        "quantization",
        runtime="torch-dynamic-int8",
        notes="torch.ao dynamic quantization of nn.Linear; no safe file format, size computed",
    )
)
_add(
    CompareMethod(
        "torchao-int8wo",
        "torchao int8 weight-only",
        "quantization",
        runtime="torchao-int8wo",
        notes="torchao Int8WeightOnlyConfig on nn.Linear",
    )
)
_add(
    CompareMethod(
        "torchao-int4wo",
        "torchao int4 weight-only (group 128)",
        "quantization",
        runtime="torchao-int4wo",
        notes="torchao Int4WeightOnlyConfig on nn.Linear",
    )
)

_CAL = (
    "calibrated on the task's built-in data (ASR: the synthetic clips; LM: the Book of Ruth), "
    "not the evaluation set unless --data is omitted"
)


def _add_g64_fisher(name: str, label: str, bits: int, method: str) -> None:
    """A Fisher-weighted codebook per tensor with scales per group of 64."""
    _add(
        CompareMethod(
            name,
            label,
            "clustering",
            _C(bits=bits, group_size=64, method=method),
            calibrate="fisher",
            notes=_CAL,
        )
    )


for b in (4, 3):
    _add(
        CompareMethod(
            f"cluster-{b}b-channel-fisher",
            f"k-means {b}-bit per channel, Fisher-weighted",
            "clustering",
            _C(bits=b, granularity="channel"),
            calibrate="fisher",
            notes=_CAL,
        )
    )
    _add(
        CompareMethod(
            f"cluster-{b}b-channel-fisher-o05",
            f"k-means {b}-bit per channel, Fisher-weighted, 0.5% outliers kept",
            "clustering",
            _C(bits=b, granularity="channel", outliers=0.005),
            calibrate="fisher",
            notes=_CAL,
        )
    )
    _add_g64_fisher(
        f"scaled-{b}b-g64-fisher",
        f"k-means {b}-bit codebook per tensor, scale per 64, Fisher-weighted",
        b,
        "scaled-exact",
    )
_add(
    CompareMethod(
        "cluster-4b-channel-act",
        "k-means 4-bit per channel, activation-weighted",
        "clustering",
        _C(bits=4, granularity="channel"),
        calibrate="activation",
        notes=_CAL,
    )
)

for t in (4.25, 3.25):
    _add(
        CompareMethod(
            f"mixed-{t}b-fisher",
            f"k-means per channel, fp16 codebooks, 0.5% outliers, bits per layer for <= {t} "
            "bits/weight, Fisher",
            "clustering",
            _C(granularity="channel", codebook_dtype="float16", outliers=0.005),
            calibrate="fisher",
            target_bits=t,
            notes=_CAL,
        )
    )
    _add(
        CompareMethod(
            f"mixed-scaled-{t}b-fisher",
            f"k-means codebook per tensor, scale per 64, bits per layer for <= {t} "
            "bits/weight, Fisher",
            "clustering",
            _C(group_size=64, method="scaled-exact"),
            calibrate="fisher",
            target_bits=t,
            notes=_CAL,
        )
    )
    _add(
        CompareMethod(
            f"mixed-lloyd-{t}b-fisher",
            f"k-means codebook per tensor (NormalFloat start), scale per 64, bits per layer "
            f"for <= {t} bits/weight, positional tables included, Fisher",
            "clustering",
            _C(group_size=64, method="scaled-lloyd", exclude=()),
            calibrate="fisher",
            target_bits=t,
            notes=_CAL,
        )
    )
    # fitted scales (method scaled-fit, below), bits and scale-group size chosen per layer
    _add(
        CompareMethod(
            f"mixed-fit-{t}b-fisher",
            f"k-means codebook per tensor, fitted scales, bits and group size (64/128) per "
            f"layer for <= {t} bits/weight, positional tables included, Fisher",
            "clustering",
            _C(group_size=64, method="scaled-fit", exclude=()),
            calibrate="fisher",
            target_bits=t,
            notes=_CAL,
            extra={"candidates": GROUP_CANDIDATES},
        )
    )

# The same at 3.25 bits, the token embedding (Whisper's is 37% of the weights, tied to
# the output projection) split into row ranges that choose their bits apart: token
# ids follow BPE merge order, so low ids are the frequent tokens, which need 4 bits
# where the rare rows take 3 (BENCHMARKS.md 1f screen). Cross-fitted (1g, session 10):
# 44.36% WER instead of 87.80% on the hard block before distillation; after it, 17.35%
# against 17.66% for the unsplit "-distill-hidden" (within noise).
EMBED_ROW_SPLIT = {"*embed_tokens": {"row_split": [{"until": r} for r in EMBED_ROWS]}}
for t in (4.25, 3.25):
    _add(
        replace(
            METHODS.get(f"mixed-fit-{t}b-fisher"),
            name=f"mixed-fit-{t}b-rows-fisher",
            label="k-means codebook per tensor, fitted scales, bits and group size (64/128) "
            f"per layer and per token-embedding row range (4k/16k/32k) for <= {t} "
            "bits/weight, positional tables included, Fisher",
            config=_C(group_size=64, method="scaled-fit", exclude=(), overrides=EMBED_ROW_SPLIT),
        )
    )

# Learned codebook per tensor over absmax-normalized groups of 64, started from the
# NormalFloat table with -1/0/+1 kept (so it can only improve on NF4's weighted
# error), weighted by Fisher: beats NF4 at equal size where plain k-means loses.
_LLOYD = "k-means {b}-bit codebook per tensor (NormalFloat start, -1/0/+1 kept), scale per 64"
for b in (4, 3):
    _add(
        CompareMethod(
            f"lloyd-{b}b-g64",
            _LLOYD.format(b=b),
            "clustering",
            _C(bits=b, group_size=64, method="scaled-lloyd"),
        )
    )
    _add_g64_fisher(
        f"lloyd-{b}b-g64-fisher", _LLOYD.format(b=b) + ", Fisher-weighted", b, "scaled-lloyd"
    )
# The same codebooks with each group's scale fitted to its importance-weighted error
# instead of the absmax (searched over 0.70-1.10 x absmax, then a least-squares
# step), and the codebook learned again on the new normalization (method scaled-fit).
_FIT = "k-means {b}-bit codebook per tensor, scale per 64 fitted to the weighted error"
for b in (4, 3):
    _add_g64_fisher(f"fit-{b}b-g64-fisher", _FIT.format(b=b) + ", Fisher-weighted", b, "scaled-fit")
# Under 4.25 bits/weight everything counted: finer scale groups (64) where Whisper's
# word errors come from (the encoder: section 1e of BENCHMARKS.md), groups of 128
# elsewhere, positional tables at 6 bits instead of fp32 (Whisper naming; on other
# models the encoder globs match nothing and every layer gets groups of 128).
_add(
    CompareMethod(
        "fit-4b-enc64-g128-fisher",
        "k-means 4-bit codebook per tensor, fitted scales per 64 in the encoder and per 128 "
        "elsewhere, positional tables 6-bit, Fisher-weighted",
        "clustering",
        _C(
            bits=4,
            group_size=128,
            method="scaled-fit",
            exclude=(),
            overrides={
                "model.encoder.layers.*": {"group_size": 64},
                "model.encoder.conv*": {"group_size": 64},
                "*embed_positions*": {"bits": 6, "group_size": 64},
            },
        ),
        calibrate="fisher",
        notes=_CAL,
    )
)
# Bits moved by the layer screen (BENCHMARKS.md 1e/1f): one more bit for the encoder,
# one less for the decoder's self-attention and MLP (3-bit alone there costs ~0.2 WER
# points each on whisper-base); the cross-attention and the tied embedding/output
# projection stay 4-bit. Two ways to spend the scale groups, both <= 4.25 bits/weight.
for enc_g, dec_g in ((64, 128), (128, 64)):
    _add(
        CompareMethod(
            f"fit-enc5g{enc_g}-dec3g{dec_g}-fisher",
            f"k-means codebook per tensor, fitted scales: encoder 5-bit per {enc_g}, decoder "
            f"self-attention and MLP 3-bit per {dec_g}, the rest 4-bit per 128, positional "
            "tables 6-bit, Fisher-weighted",
            "clustering",
            _C(
                bits=4,
                group_size=128,
                method="scaled-fit",
                exclude=(),
                overrides={
                    "model.encoder.layers.*": {"bits": 5, "group_size": enc_g},
                    "model.encoder.conv*": {"bits": 5, "group_size": enc_g},
                    "model.decoder.layers.*.self_attn.*": {"bits": 3, "group_size": dec_g},
                    "model.decoder.layers.*.fc*": {"bits": 3, "group_size": dec_g},
                    "*embed_positions*": {"bits": 6, "group_size": 64},
                },
            ),
            calibrate="fisher",
            notes=_CAL,
        )
    )
# GPTQ error feedback on the learned per-tensor codebooks: the codebook and scales as
# clustering chose them, codes re-chosen column by column against the layer's inputs.
for b in (4, 3):
    _add(
        CompareMethod(
            f"lloyd-{b}b-g64-fisher-gptq",
            _LLOYD.format(b=b) + ", Fisher-weighted, codes by GPTQ",
            "clustering",
            _C(bits=b, group_size=64, method="scaled-lloyd"),
            calibrate="fisher",
            gptq=True,
            notes=_CAL + "; GPTQ Hessians from the same data",
        )
    )
_add(
    CompareMethod(
        "nf4-g64-gptq-enc",
        "NF4, absmax scale per 64, codes by GPTQ in the encoder only",
        "quantization",
        _C(bits=4, group_size=64, method="nf4"),
        gptq=True,
        notes=_CAL + "; decoder layers (model.decoder.*, Whisper naming) keep nearest codes",
        extra={"gptq": {"exclude": ["model.decoder.*"]}},
    )
)
_add(
    CompareMethod(
        "nf4-g64-gptq",
        "NF4, absmax scale per 64, codes by GPTQ",
        "quantization",
        _C(bits=4, group_size=64, method="nf4"),
        gptq=True,
        notes=_CAL,
    )
)
# Issue 7: outliers without calibration (tasks with no loss: embed, vision), and
# clustering restricted to attention or MLP layers (config.LAYER_PRESETS).
from .config import layer_preset as _preset  # noqa: E402

for b in (4, 3):
    _add(
        CompareMethod(
            f"cluster-{b}b-channel-o05",
            f"k-means {b}-bit per channel, 0.5% outliers kept",
            "clustering",
            _C(bits=b, granularity="channel", outliers=0.005),
        )
    )
    for part, short, what in (
        ("attention", "attn", "attention layers only"),
        ("mlp", "mlp", "MLP layers only"),
    ):
        _add(
            CompareMethod(
                f"cluster-{b}b-channel-{short}",
                f"k-means {b}-bit per channel, {what}",
                "clustering",
                _C(bits=b, granularity="channel", **_preset(part)),
                notes=f"layer preset {part!r}: other layers stay fp32",
            )
        )

# int4 RTN with groups that divide hidden sizes like 576 (SmolLM2), where groups of
# 128 would span rows of the embedding table.
_add(
    CompareMethod(
        "int4-rtn-g64",
        "int4 round-to-nearest asym. per 64",
        "quantization",
        _C(bits=4, group_size=64, method="rtn"),
    )
)

# The same recipes, then distilled toward the fp32 model on the calibration data
# (codebooks and scales at lr 3e-5, norms/biases at lr/10, 2 epochs: BENCHMARKS.md 1g).
# They need real data of the user's domain (`--calib-data`): on the built-in
# synthetic clips distillation made whisper-base worse (1e), so they refuse to run
# without it.
# At 3.25 bits the model starts much further away (training KL still falling fast
# after 2 epochs at 3e-5), so it trains longer, keeping the epoch with the lowest KL
# on a fifth of the data held out; "-hidden" also matches every layer's output
# (17.66% WER against 18.40% cross-fitted; BENCHMARKS.md 1g, session 9).
for _base, _opts in (
    ("fit-4b-enc64-g128-fisher", {"epochs": 2, "lr": 3e-5}),
    ("mixed-fit-4.25b-fisher", {"epochs": 2, "lr": 3e-5}),
    ("mixed-fit-3.25b-fisher", {"epochs": 8, "lr": 5e-5, "holdout": 0.2}),
    ("mixed-fit-3.25b-fisher", {"epochs": 8, "lr": 5e-5, "holdout": 0.2, "hidden": 1.0}),
    ("mixed-fit-3.25b-rows-fisher", {"epochs": 8, "lr": 5e-5, "holdout": 0.2, "hidden": 1.0}),
):
    _m = METHODS.get(_base)
    _held = f", best of {_opts['holdout']:.0%} held out" if "holdout" in _opts else ""
    _suffix = ""
    if "hidden" in _opts:
        _suffix = "-hidden"
        _held += f", every layer's output matched too (weight {_opts['hidden']:g})"
    _add(
        replace(
            _m,
            name=_base.removesuffix("-fisher") + "-distill" + _suffix,
            label=_m.label + ", then distilled toward the original on the calibration data",
            distill=_opts,
            notes="calibrated and distilled (KL to the original, "
            f"{_opts['epochs']} epochs at lr {_opts['lr']:g}{_held}) on --calib-data, which "
            "it requires (real data of the model's domain, apart from the evaluation set)",
        )
    )


def needs_real_data(method: CompareMethod) -> bool:
    """Whether ``method`` must be given the user's own calibration data."""
    return method.distill is not None


# What `wclust compare` runs when no --methods are given: a few minutes on 2 cores.
DEFAULT_METHODS = (
    "fp32",
    "cluster-8b-tensor",
    "cluster-4b-channel",
    "scaled-4b-g64",
    "nf4-g64",
    "int8-dynamic",
)


def get_method(name: str) -> CompareMethod:
    return METHODS.get(name)


def apply_method(method: CompareMethod, loaded, sample_weights=None, calib_samples=None):
    """Apply a file-producing method to ``loaded.model`` in place (prune, calibrate,
    allocate bits, cluster).

    Args:
        method: the method.
        loaded: a :class:`wclust.models.LoadedModel` (model, processor, task).
        sample_weights: importance per weight to reuse instead of calibrating again
            (must come from the same ``method.calibrate`` kind).
        calib_samples: the task's data items to calibrate on (as ``task.load_data``
            returns them); default: ``method.calib_items`` of the task's built-in data.
            Methods that distil (``method.distill``) train on them too and refuse to
            run without them.

    Returns:
        (the config used, the :class:`CompressionReport`).
    """
    from . import api

    teacher = None
    if method.distill is not None:
        if calib_samples is None:
            raise ValueError(
                f"method {method.name} distils on the calibration data, which must be real "
                "data of the model's domain (distilling on the built-in synthetic clips made "
                "Whisper worse): give it, e.g. wclust compare --calib-data DIR"
            )
        import copy

        teacher = copy.deepcopy(loaded.model)  # before pruning and clustering
    if method.prune:
        from .prune import prune_

        prune_(loaded.model, method.prune)
    batches = None
    if (method.calibrate and sample_weights is None) or method.gptq or teacher is not None:
        from .tasks import get_task

        task = get_task(loaded.task)
        if task.calibration_batches is None:
            raise ValueError(
                f"method {method.name} needs calibration, and task {task.name!r} has no loss "
                "to calibrate with; pick an uncalibrated method"
            )
        calib = calib_samples
        if calib is None:
            calib = task.load_data(None, method.calib_items)  # the task's built-in data
        batches = list(task.calibration_batches(loaded.model, loaded.processor, calib))
    if method.calibrate and sample_weights is None:
        from .calibrate import calibrate

        sample_weights = calibrate(loaded.model, batches, kind=method.calibrate)
    if not method.calibrate:
        sample_weights = None
    hessians = originals = None
    if method.gptq:
        from .api import _weight_owners
        from .gptq import collect_hessians

        hessians = collect_hessians(loaded.model, batches)
        originals = {owners[0][0]: w.detach() for w, owners in _weight_owners(loaded.model)}
    cfg = method.config or ClusterConfig(include=())
    if method.target_bits:
        from .allocate import allocate_bits

        cfg, _ = allocate_bits(
            loaded.model,
            method.target_bits,
            cfg,
            sample_weights=sample_weights,
            candidates=method.extra.get("candidates"),
        )
    report = api.compress_(loaded.model, cfg, sample_weights=sample_weights)
    if method.gptq:
        from .gptq import gptq_refine_

        opts = dict(method.extra.get("gptq", {}))
        skip = opts.pop("exclude", ())
        hessians = {
            n: h for n, h in hessians.items() if not any(fnmatch.fnmatch(n, g) for g in skip)
        }
        changed = gptq_refine_(loaded.model, hessians, originals, **opts)
        for entry in report.layers:  # the report shows the weight error of the new codes
            if entry.name in changed:
                ms = api._mean_square(originals[entry.name])
                entry.mse = changed[entry.name][1]  # unweighted, like rel_error below
                entry.rel_error = entry.mse / ms if ms else 0.0
                entry.method = f"{entry.method}+gptq"
    if teacher is not None:
        opts = dict(method.distill)
        speeds = opts.pop("speeds", None)
        if speeds:
            opts["augment"] = augmented_batches(task, teacher, loaded.processor, calib, speeds)
        distill_reported_(loaded.model, teacher, batches, report, **opts)
        del teacher
    return cfg, report


def distill_reported_(
    model, teacher, batches, report, *, holdout: float = 0.0, augment=None, **opts
) -> dict:
    """Distil ``model`` toward ``teacher`` (``train.distill_`` with ``opts``), holding
    out the fraction ``holdout`` of ``batches`` for early stopping, and mark the
    clustered layers of ``report`` as distilled (their weight errors are from before).

    Args:
        augment: optional ``positions -> batches``: more training batches made from
            the items at these positions of ``batches`` (the training ones; held-out
            items are never augmented), e.g. :func:`augmented_batches`.

    Returns:
        ``distill_``'s result, plus ``"items"`` and ``"held_out"`` (batch counts;
        ``"items"`` includes the augmented ones).
    """
    from .train import distill_, split_holdout

    keep, held = split_holdout(list(range(len(batches))), holdout)
    train, val = [batches[i] for i in keep], [batches[i] for i in held]
    if augment is not None:
        train += list(augment(keep))
    done = distill_(model, teacher, train, val_batches=val, **opts)
    for entry in report.clustered:
        entry.method = f"{entry.method}+distill"
    return {**done, "items": len(train), "held_out": len(val)}


def augmented_batches(task, teacher, processor, items: list, speeds):
    """The ``augment`` of :func:`distill_reported_` for ``items`` (the data the batches
    were made from, in the same order): ``task.augment`` copies of the chosen items
    (ASR: played at ``speeds``), as batches (pseudo-labels, if any, from ``teacher``).

    Raises:
        ValueError: the task cannot augment its data.
    """
    if task.augment is None:
        raise ValueError(
            f"task {task.name!r} has no data augmentation; drop the speeds (they are for "
            "speech recognition)"
        )
    speeds = tuple(speeds)

    def augment(positions: list[int]) -> list:
        more = task.augment([items[i] for i in positions], speeds)
        return list(task.calibration_batches(teacher, processor, more))

    return augment
