"""The command line's quantizer and stage options as a :class:`Recipe`.

``wclust compress`` maps its options onto a recipe field for field, so the same
options and the same recipe from Python give the same file. Options left out keep
the quantizer's own defaults; an option the chosen quantizer does not use is
refused (e.g. ``--method nf4 --bits 3``).
"""

from __future__ import annotations

from ..config import ConfigError
from .recipe import GPTQ, Budget, Calibration, Distill, Recipe, layer_selection
from .settings import quantizer_from

__all__ = ["QUANTIZER_FLAGS", "STAGE_FLAGS", "recipe_from_flags"]

# --method values: (quantizer kind, fixed fields)
_METHODS = {
    "exact": ("kmeans", {}),
    "kmeans": ("kmeans", {"algorithm": "lloyd"}),
    "scaled-exact": ("scaled", {"fit": "exact"}),
    "scaled-lloyd": ("scaled", {"fit": "lloyd"}),
    "scaled-fit": ("scaled", {"fit": "fit"}),
    "nf4": ("nf4", {}),
    "rtn": ("rtn", {}),
    "rtn-sym": ("rtn", {"symmetric": True}),
}
QUANTIZER_FLAGS = (
    "bits",
    "n_clusters",
    "granularity",
    "group_size",
    "method",
    "init",
    "codebook_dtype",
    "keep_zeros",
    "outliers",
)
STAGE_FLAGS = (
    "target_bits",
    "calibrate",
    "calib_items",
    "gptq_items",
    "distill_epochs",
    "distill_lr",
    "distill_holdout",
    "distill_hidden",
    "distill_speeds",
    "distill_items",
    "row_split",
    "layers",
    "include",
    "exclude",
    "seed",
)


def recipe_from_flags(flags: dict, distill: bool = False) -> Recipe:
    """A recipe from ``wclust compress`` options (``None``: not given).

    Args:
        flags: option name (``QUANTIZER_FLAGS``, ``STAGE_FLAGS``) -> value or None.
            ``row_split``: ``{glob: [row, ...]}`` or ``"none"``.
        distill: whether distillation data was given.

    Raises:
        ConfigError: options that do not fit together, with how to fix them.
    """
    f = {k: v for k, v in flags.items() if v is not None}
    budget = f.get("target_bits")
    method = f.pop("method", None)
    if method is None:
        # with a budget: the best measured recipe (per-tensor codebooks, fitted scales)
        method = "scaled-fit" if budget is not None else "exact"
    if method not in _METHODS:
        raise ConfigError(f"--method {method!r} is unknown; choose {', '.join(_METHODS)}")
    kind, fixed = _METHODS[method]
    q = dict(fixed)
    for k in QUANTIZER_FLAGS:
        if k in f and k != "method":
            q[k] = f[k]
    if kind == "kmeans" and "n_clusters" in q:
        q.pop("bits", None) if q.get("bits") is None else None
    cands = ()
    if budget is not None and kind == "scaled" and "group_size" in q:
        from ..stages.allocate import WIDTHS

        cands = WIDTHS  # the group size is the user's: choose widths only
    try:
        quantizer = quantizer_from(kind, q)
    except ConfigError as e:
        raise ConfigError(f"--method {method}: {e}") from None
    kw: dict = {"quantizer": quantizer}
    if "layers" in f:
        if "include" in f or "exclude" in f:
            raise ConfigError(
                "--layers sets the include/exclude globs; give either --layers or --include/--exclude"
            )
        kw.update(layer_selection(f["layers"]))
    if f.get("include"):
        kw["include"] = tuple(f["include"])
    if "exclude" in f:
        kw["exclude"] = tuple(f["exclude"])
    elif budget is not None and "layers" not in f:
        kw["exclude"] = ()  # positional tables count in the budget too
    if "seed" in f:
        kw["seed"] = f["seed"]
    rows = f.get("row_split")
    if isinstance(rows, dict) and rows:
        kw["overrides"] = {
            g: {"row_split": [{"until": r} for r in ends]} for g, ends in rows.items()
        }
    if budget is not None:
        kw["budget"] = _as_options(
            Budget,
            {"bits": budget, "candidates": cands, "rows": "auto" if rows is None else "none"},
            "budget bits",
            "--target-bits",
        )
    elif rows is not None and rows != "none" and not isinstance(rows, dict):
        raise ConfigError("--row-split takes GLOB=ROW,ROW,... or none")
    kind_cal = f.get("calibrate") or ("fisher" if budget is not None else "none")
    if kind_cal not in ("fisher", "activation", "none"):
        raise ConfigError(f"--calibrate must be fisher, activation or none, got {kind_cal!r}")
    if kind_cal != "none":
        kw["calibration"] = _as_options(
            Calibration,
            {"kind": kind_cal, **_only(f, calib_items="items")},
            "calibration items",
            "--calib-items",
        )
    elif "calib_items" in f:
        raise ConfigError("--calib-items needs calibration (--calibrate fisher|activation)")
    if "gptq_items" in f:
        kw["gptq"] = _as_options(GPTQ, {"items": f["gptq_items"]}, "gptq items", "--gptq-items")
    given = _only(
        f,
        distill_epochs="epochs",
        distill_lr="lr",
        distill_holdout="holdout",
        distill_hidden="hidden",
        distill_speeds="speeds",
        distill_items="items",
    )
    if distill:
        kw["distill"] = _as_options(Distill, given, "distill ", "--distill-")
    elif given:
        flag = "--" + next(k for k in f if k.startswith("distill_")).replace("_", "-")
        raise ConfigError(f"{flag} needs --distill-data")
    return Recipe(**kw)


def _as_options(cls, values: dict, field: str, option: str):
    """``cls(**values)``, its errors naming the command-line option, not the field."""
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(str(e).replace(field, option)) from None


def _only(f: dict, **names) -> dict:
    return {new: f[old] for old, new in names.items() if old in f}
