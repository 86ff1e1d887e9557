"""transformers integration: ``from_pretrained(..., quantization_config=WclustConfig())``
clusters on load, ``save_pretrained`` writes a standard Hugging Face folder, and a
plain ``from_pretrained(folder)`` reloads it compressed.

The folder holds:

- ``config.json`` with ``quantization_config``: ``quant_method: "wclust"``, the
  ``recipe`` as given (so it can be traced and repeated), and ``layers``: one entry per
  clustered weight, as in a .wclust header (``owners``: the modules using it, the
  first storing it; ``shape``, ``bits``, ``dtype``, ``transpose``, ``meta``, ``parts``
  for a row split);
- ``model.safetensors``: every tensor of the model under its module path; a clustered
  weight is stored under its first owner as ``<owner>.clustered.packed`` (the packed
  codes of a .wclust ``codes``), ``.codebook``, ``.codebook_scale`` (.wclust ``scale``),
  ``.group_scale``, ``.group_offset``, ``.outlier_idx``, ``.outlier_val`` (a row
  split: ``<owner>.clustered.parts.<j>.*``). Tied modules (GPT-2's ``lm_head`` and
  ``wte``; Whisper's ``proj_out`` and token embedding) store the weight once and share
  it again on load. The safetensors metadata holds the compression report
  (``wclust_report``) for ``wclust inspect``.

Importing this module imports transformers and registers the config and quantizer
(``import wclust`` arranges that without importing transformers itself).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import transformers as _transformers

if int(_transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        "wclust's transformers integration needs transformers 5 or newer (found "
        f"{_transformers.__version__}): pip install -U 'transformers>=5'"
    )

from transformers.quantizers.auto import (  # noqa: E402 - after the version check
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import ClusterConfig, ConfigError
from ..formats.checkpoint import _DTYPES as _ST_DTYPES
from ..formats.wclust_file import FormatError, _clustered_tensor, _dtype_name
from ..nn.modules import (
    ClusteredWeight,
    RowSplitWeight,
    base_class,
    clustered_parts,
    prepare_kernels,
    set_int8_matmul,
    swap_weight,
)
from ..nn.owners import clustered_weights, layer_type
from ..nn.owners import set_module as _set_module
from ..recipes import KMeans, Recipe, compress_, get_recipe

__all__ = ["QUANT_METHOD", "WclustConfig", "WclustHfQuantizer", "from_hf", "save_hf", "to_hf"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "wclust"
# Version of the ``layers`` layout in quantization_config.
HF_LAYOUT_VERSION = 1
REPORT_KEY = "wclust_report"

# ClusteredWeight buffer -> the .wclust name of the same tensor (``formats.wclust_file``).
_FILE_NAMES = {
    "packed": "codes",
    "codebook": "codebook",
    "codebook_scale": "scale",
    "group_scale": "group_scale",
    "group_offset": "group_offset",
    "outlier_idx": "outlier_idx",
    "outlier_val": "outlier_val",
}
_FIELDS = ("recipe", "bits", "modules_to_not_convert", "layers", "version", "cluster_config")


class WclustConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` clusters a model (``quantization_config=``).

    Args:
        recipe: a preset name (``wclust recipes``), a spec string or a
            ``Recipe.to_dict()``; None: ``scaled-4b``, the recommended ~4-bit recipe
            that needs no calibration data. Compress on load runs recipes without
            data; calibrated ones go through ``wclust.compress_(model, recipe, data)``
            and ``save_pretrained``.
        bits: instead of a recipe: optimal 1-D k-means of this width per output
            channel (``kmeans:bits=B``).
        modules_to_not_convert: module names (or globs) to keep dense, on top of the
            recipe's exclusions. transformers' own default list (``lm_head``, tied
            embeddings) is not applied: those are often the largest tensors.
        layers: filled in when the model is clustered (one entry per clustered
            weight); do not pass it.

    Raises:
        ConfigError: an unknown field, a bad recipe, or both ``recipe`` and ``bits``.
    """

    def __init__(
        self,
        recipe: str | dict | None = None,
        bits: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        layers: list | None = None,
        version: int = HF_LAYOUT_VERSION,
        cluster_config: dict | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ConfigError(
                f"WclustConfig: unknown field(s) {sorted(kwargs)}; allowed: "
                f"{', '.join(_FIELDS[:3])}"
            )
        self.quant_method = QUANT_METHOD
        self.recipe = copy.deepcopy(recipe)
        self.bits = bits
        self.modules_to_not_convert = (
            list(modules_to_not_convert)
            if isinstance(modules_to_not_convert, tuple)
            else modules_to_not_convert
        )
        self.layers = layers
        self.version = version
        # the per-layer ClusterConfig the clustering ran (a .wclust header's "config"),
        # kept so a folder converts back to the same file; written by wclust
        self.cluster_config = cluster_config
        self.post_init()

    def post_init(self) -> None:
        """Check every field now (a bad config fails before any weight is read)."""
        if type(self.version) is not int or self.version > HF_LAYOUT_VERSION:
            raise ConfigError(
                f"WclustConfig version {self.version!r} is newer than this wclust reads "
                f"({HF_LAYOUT_VERSION}); upgrade wclust"
            )
        mods = self.modules_to_not_convert
        if mods is not None and not (
            isinstance(mods, list) and all(isinstance(m, str) for m in mods)
        ):
            raise ConfigError(
                "WclustConfig: modules_to_not_convert must be a list of module names or "
                f"globs, e.g. ['lm_head'], got {mods!r}"
            )
        if self.layers is not None and not (
            isinstance(self.layers, list) and all(isinstance(e, dict) for e in self.layers)
        ):
            raise ConfigError("WclustConfig: layers must be a list of objects (written by wclust)")
        _recipe(self)

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "recipe": copy.deepcopy(self.recipe),
            "bits": self.bits,
            "modules_to_not_convert": copy.copy(self.modules_to_not_convert),
            "layers": self.layers,  # shared: see __deepcopy__
            "version": self.version,
            "cluster_config": self.cluster_config,
        }

    def __deepcopy__(self, memo):
        # ``layers`` (one entry per clustered weight) is replaced, never changed in
        # place, so copies share it: transformers deep-copies the model config (this
        # included) on every forward of some models (``get_text_config``).
        new = copy.copy(self)
        new.recipe = copy.deepcopy(self.recipe, memo)
        new.modules_to_not_convert = copy.copy(self.modules_to_not_convert)
        return new


# compress on load runs without data: the recommended recipe that needs none
DEFAULT_RECIPE = "scaled-4b"


def _recipe(cfg: WclustConfig) -> Recipe:
    """The Recipe a WclustConfig stands for: the one place a recipe is resolved.

    Returns:
        ``recipe`` (a preset name, spec string or ``Recipe.to_dict()``), exact
        per-channel k-means of ``bits``, or the recommended ``scaled-4b``; with
        ``modules_to_not_convert`` excluded.

    Raises:
        ConfigError: what is wrong and how to write it instead.
    """
    recipe, bits = cfg.recipe, cfg.bits
    if recipe is not None and bits is not None:
        raise ConfigError("WclustConfig: give recipe= or bits=, not both")
    if bits is not None:
        if type(bits) is not int or not 1 <= bits <= 8:
            raise ConfigError(f"WclustConfig: bits must be an integer from 1 to 8, got {bits!r}")
        out = Recipe(quantizer=KMeans(bits=bits))
    elif isinstance(recipe, (str, dict)) or recipe is None:
        try:
            out = get_recipe(DEFAULT_RECIPE if recipe is None else recipe)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"WclustConfig recipe: {e}") from None
    else:
        raise ConfigError(
            "WclustConfig: recipe must be a preset name (wclust recipes), a spec string or "
            f"a Recipe.to_dict(), got {type(recipe).__name__}"
        )
    if out.calibration is not None or out.gptq is not None or out.distill is not None:
        raise ConfigError(
            "WclustConfig: compress on load runs recipes that need no data; this one "
            "calibrates or distils: run wclust.compress_(model, recipe, data) and then "
            "model.save_pretrained(dir), or `wclust compress MODEL --recipe R --format hf`"
        )
    if cfg.modules_to_not_convert:
        out = out.replace(exclude=(*out.exclude, *cfg.modules_to_not_convert))
    return out


class WclustHfQuantizer(HfQuantizer):
    """Clusters a model after its weights are loaded, or rebuilds the clustered modules
    of a folder written by ``save_pretrained`` before its tensors are read."""

    requires_calibration = False

    def __init__(self, quantization_config: WclustConfig, **kwargs):
        # a copy: the layers of this model are written into it
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.report: dict | None = None
        self._checkpoint: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "wclust models cannot be offloaded to disk; load without a disk device_map"
            )

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype  # the dtype from_pretrained loads in (not passed further down)
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        layers = self.quantization_config.layers
        if not layers:
            raise FormatError(
                "config.json's quantization_config (wclust) has no 'layers': the folder was "
                "not written by save_pretrained of a wclust model"
            )
        files = [f for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        if not files:
            raise FormatError("a wclust model folder needs its weights as .safetensors files")
        self._checkpoint, self.report = _read_checkpoint_headers(files)
        _build_skeleton(model, layers, self._checkpoint)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            dtype = getattr(self, "_dtype", None)
            _rebuild_loaded(
                model,
                self.quantization_config.layers,
                self._checkpoint,
                dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None,
            )
        else:
            report = compress_(model, _recipe(self.quantization_config))
            _warn_dense(report)
            self.report = report.to_dict()
        prepare_kernels(model)
        _attach(model, self)
        return model

    def _dequantize(self, model, dtype=None):
        """Dense weights again (``model.dequantize()``): each one the decoded
        clustered weight, tied modules sharing one parameter."""
        from ..api import strip

        strip(model, inplace=True)
        if dtype is not None:
            model.to(dtype)
        return model

    def get_state_dict_and_metadata(self, model):
        return hf_state_dict(model), (
            {REPORT_KEY: json.dumps(self.report)} if self.report is not None else {}
        )

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not WclustConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded module
        register_quantization_config(QUANT_METHOD)(WclustConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not WclustHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(WclustHfQuantizer)


_register()


# --- the model's side: entries, skeleton, rebuild, state dict ---------------------------


def _tensor_entry(cw: ClusteredWeight) -> dict:
    return {
        "shape": list(cw.shape),
        "bits": cw.bits,
        "dtype": _dtype_name(cw.dtype),
        "meta": cw.meta,
    }


def layer_entries(model) -> list[dict]:
    """One entry per clustered weight of ``model`` (see the module docstring)."""
    out = []
    for cw, owners in clustered_weights(model).values():
        e = {
            "owners": [n for n, _ in owners],
            "owner_types": [base_class(m).__name__ for _, m in owners],
            "transpose": cw.transpose,
            **_tensor_entry(cw),
        }
        if any(getattr(p, "int8_matmul", False) for p in clustered_parts(cw)):
            e["int8_matmul"] = True  # a runtime setting the loaded model keeps
        if isinstance(cw, RowSplitWeight):
            e["parts"] = [
                {**_tensor_entry(p), "rows": [a, b]}
                for p, a, b in zip(cw.parts, cw.bounds[:-1], cw.bounds[1:], strict=True)
            ]
        out.append(json.loads(json.dumps(e, default=str)))  # JSON-safe meta
    return out


def _parts(cw) -> list[tuple[str, ClusteredWeight]]:
    """``(buffer prefix under the owner, ClusteredWeight)`` for each stored tensor."""
    if isinstance(cw, RowSplitWeight):
        return [(f"clustered.parts.{j}.", p) for j, p in enumerate(cw.parts)]
    return [("clustered.", cw)]


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict as the folder stores it: each clustered weight once,
    under its first owner, its codes in the canonical packing (not a kernel layout)."""
    sd = model.state_dict()
    seen: set[int] = set()
    for cw, owners in clustered_weights(model).values():
        for name, _ in owners:
            for k in [k for k in sd if k.startswith(f"{name}.clustered.")]:
                del sd[k]
        first = owners[0][0]
        for prefix, part in _parts(cw):
            for buf in _FILE_NAMES:
                t = part.packed_rows() if buf == "packed" else getattr(part, buf)
                if t is not None:
                    t = t.detach()
                    if t.numel() and t.data_ptr() in seen:
                        # one table shared by many weights (NF4's 16 values):
                        # safetensors refuses tensors that share memory
                        t = t.clone()
                    seen.add(t.data_ptr())
                    sd[f"{first}.{prefix}{buf}"] = t
    return sd


def _read_checkpoint_headers(files) -> tuple[dict, dict | None]:
    """``{name: (shape, dtype)}`` of every tensor in the safetensors files (no tensor
    is read), and the compression report kept in their metadata."""
    from safetensors import safe_open

    out, report = {}, None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            if report is None and REPORT_KEY in meta:
                try:
                    report = json.loads(meta[REPORT_KEY])
                except ValueError:
                    report = None
            for k in st.keys():
                sl = st.get_slice(k)
                dt = _ST_DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise FormatError(f"{f}: tensor {k} has unsupported dtype {sl.get_dtype()}")
                out[k] = (tuple(sl.get_shape()), dt)
    return out, report


def _check_entry(e: dict, i: int) -> None:
    def bad(msg):
        raise FormatError(f"quantization_config layers[{i}]: {msg}")

    owners, types = e.get("owners"), e.get("owner_types")
    if not (
        isinstance(owners, list)
        and owners
        and all(isinstance(o, str) for o in owners)
        and isinstance(types, list)
        and len(types) == len(owners)
    ):
        bad("'owners'/'owner_types' are not equal, non-empty lists of module names")
    if not isinstance(e.get("transpose"), bool):
        bad("'transpose' is not true or false")
    if not isinstance(e.get("int8_matmul", False), bool):
        bad("'int8_matmul' is not true or false")
    for t in [e, *(e.get("parts") or [])]:
        shape = t.get("shape")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            bad(f"shape {shape!r} is not a list of non-negative integers")
        if type(t.get("bits")) is not int or not 1 <= t["bits"] <= 8:
            bad(f"bits {t.get('bits')!r} is not an integer from 1 to 8")
        if t.get("dtype") not in ("float32", "float16", "bfloat16", "float64"):
            bad(f"dtype {t.get('dtype')!r} is not a float dtype")


def _build_skeleton(model, layers: list[dict], ckpt: dict) -> None:
    """Swap every clustered module of ``layers`` in (on the meta device), with buffers
    of the shapes and dtypes the checkpoint holds, so transformers loads them by name.
    Tied owners share one ClusteredWeight, stored under the first."""
    for i, e in enumerate(layers):
        _check_entry(e, i)
        first = e["owners"][0]
        shape = tuple(e["shape"])
        mods = []  # the model's modules first: nothing is built for a weight it lacks
        for owner, otype in zip(e["owners"], e["owner_types"], strict=True):
            try:
                mod = model.get_submodule(owner)
            except AttributeError:
                raise FormatError(
                    f"the model has no module {owner} (quantization_config)"
                ) from None
            if layer_type(mod) is None or type(mod).__name__ != otype:
                raise FormatError(
                    f"{owner}: the folder has a {otype}, the model a {type(mod).__name__}"
                )
            want = shape[::-1] if e["transpose"] else shape
            if tuple(mod._parameters["weight"].shape) != want:
                raise FormatError(f"{owner}: weight shape {want} does not match the model")
            mods.append((owner, mod))
        parts = []
        specs = (
            [(f"clustered.parts.{j}.", p) for j, p in enumerate(e["parts"])]
            if e.get("parts")
            else [("clustered.", e)]
        )
        with torch.device("meta"):
            for prefix, spec in specs:
                bufs = {}
                for buf in _FILE_NAMES:
                    key = f"{first}.{prefix}{buf}"
                    if key in ckpt:
                        bufs[buf] = torch.empty(ckpt[key][0], dtype=ckpt[key][1])
                for need in ("packed", "codebook"):
                    if need not in bufs:
                        raise FormatError(f"the checkpoint lacks {first}.{prefix}{need}")
                try:
                    cw = ClusteredWeight(
                        bufs["packed"].reshape(-1),
                        bufs["codebook"],
                        None,
                        tuple(spec["shape"]),
                        spec["bits"],
                        getattr(torch, spec["dtype"]),
                        False,
                        spec.get("meta"),
                    )
                except ValueError as err:
                    raise FormatError(f"{first}.{prefix}: {err}") from None
                for buf, t in bufs.items():
                    if buf not in ("packed", "codebook"):
                        setattr(cw, buf, t)  # checked once loaded (_rebuild_loaded)
                parts.append(cw)
        if e.get("parts"):
            try:
                cw = RowSplitWeight(parts, e["transpose"], e.get("meta"))
            except ValueError as err:
                raise FormatError(f"{first}: {err}") from None
        else:
            cw = parts[0]
            cw.transpose = e["transpose"]
        cw._is_hf_initialized = True
        for owner, mod in mods:
            new = swap_weight(mod, cw)
            # its other tensors (bias) are checked against the checkpoint once loaded;
            # transformers must not initialise it (that would decode the weight)
            new._is_hf_initialized = True
            _set_module(model, owner, new)
            if owner != first:
                new._register_state_dict_hook(_drop_alias_keys)
    _untie(model, {f"{o}.weight" for e in layers for o in e["owners"]})
    _mark_loaded_ancestors(model, [o for e in layers for o in e["owners"]], ckpt)


def _mark_loaded_ancestors(model, owners: list[str], ckpt: dict) -> None:
    """Flag as initialised the modules above clustered owners whose every tensor is in
    the checkpoint: their ``_init_weights`` (GPT-2 re-initialises ``c_proj.weight``
    from the block) would decode clustered weights only to discard the result. A
    module with non-persistent buffers (computed at init, never stored) keeps its init."""
    names = set()
    for o in owners:
        parts = o.split(".")
        names |= {".".join(parts[:i]) for i in range(1, len(parts))}
    for name in names:
        mod = model.get_submodule(name)
        if any(m._non_persistent_buffers_set for m in mod.modules()):
            continue
        if all(f"{name}.{k}" in ckpt for k in mod.state_dict()):
            mod._is_hf_initialized = True


def _rebuild_loaded(model, layers: list[dict], ckpt: dict, dtype=None) -> None:
    """Replace each skeleton ClusteredWeight by one built (and checked, as
    ``wclust.load`` checks a file) from the loaded buffers; share it among its owners.
    ``dtype``: the dtype the model was loaded in (``from_pretrained(dtype=)``), which
    the rebuilt weights then take too (the stored codebooks keep theirs)."""
    for e in layers:
        first = e["owners"][0]
        mod = model.get_submodule(first)
        missing = [
            f"{first}.{k}"
            for k in mod.state_dict()
            if not k.startswith("clustered.") and f"{first}.{k}" not in ckpt
        ]
        if missing:
            raise FormatError(f"the checkpoint lacks {missing[:5]}")
        skel = mod.clustered

        def rebuild(spec, part, key, transpose):
            tensors = {}
            for buf, fname in _FILE_NAMES.items():
                t = getattr(part, buf)
                if t is None:
                    continue
                if buf == "packed" and not t.is_meta:
                    t = part.packed_rows()  # a kernel may have changed its layout already
                if t.is_meta:
                    raise FormatError(f"the checkpoint lacks {key}.{buf}")
                tensors[f"{key}.{fname}"] = t
            return _clustered_tensor({**spec, "key": key}, tensors, transpose)

        if isinstance(skel, RowSplitWeight):
            parts = [
                rebuild(spec, p, f"{first}.clustered.parts.{j}", False)
                for j, (spec, p) in enumerate(zip(e["parts"], skel.parts, strict=True))
            ]
            cw = RowSplitWeight(parts, e["transpose"], e.get("meta"))
        else:
            cw = rebuild(e, skel, f"{first}.clustered", e["transpose"])
        if dtype is not None:
            for part in [cw, *getattr(cw, "parts", ())]:
                part.dtype = dtype
        if e.get("int8_matmul"):
            set_int8_matmul(cw)  # the weight, or every part of a row split
        for owner in e["owners"]:
            model.get_submodule(owner)._modules["clustered"] = cw


def _untie(model, weights: set[str]) -> None:
    """Drop the tied-weight entries (``all_tied_weights_keys``) naming one of
    ``weights`` (``<owner>.weight``): tied clustered owners share one ClusteredWeight
    instead, and transformers' tying would look for a ``weight`` parameter."""
    for name, sub in model.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        pre = f"{name}." if name else ""
        for k, v in list(tied.items()):
            if f"{pre}{k}" in weights or f"{pre}{v}" in weights:
                tied.pop(k)


def _drop_alias_keys(module, state_dict, prefix, local_metadata):
    """State-dict hook of a tied owner that does not store the shared weight."""
    for k in [k for k in state_dict if k.startswith(f"{prefix}clustered.")]:
        del state_dict[k]


def _attach(model, quantizer: WclustHfQuantizer) -> None:
    """Make a clustered model save and reload as a wclust folder: the layers in its
    quantization_config, tied owners after the first leave the shared weight out of
    the state dict, and transformers' weight tying skips clustered modules (their
    ``weight`` is no parameter)."""
    cfg = quantizer.quantization_config
    cfg.layers = layer_entries(model)
    owners = set()
    for _cw, own in clustered_weights(model).values():
        owners |= {f"{name}.weight" for name, _ in own}
        for _name, mod in own[1:]:
            if _drop_alias_keys not in [h for h in mod._state_dict_hooks.values()]:
                mod._register_state_dict_hook(_drop_alias_keys)
    _untie(model, owners)
    model.hf_quantizer = quantizer
    model.config.quantization_config = cfg
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_is_quantized"):
            sub.config._is_quantized = True


def _warn_dense(report) -> None:
    """Say loudly when the largest layer weight stays dense."""
    layers = [r for r in report.layers if r.numel]
    if not layers:
        return
    largest = max(layers, key=lambda r: r.numel)
    if largest.status != "clustered":
        warnings.warn(
            f"wclust: the largest weight, {largest.name} ({largest.numel} weights, "
            f"{largest.bytes_before / 1e6:.1f} MB), stays dense: {largest.reason}",
            stacklevel=3,
        )
    dense = [r for r in layers if r.status != "clustered"]
    if dense:
        logger.info(
            "wclust: %d layer weights stay dense: %s",
            len(dense),
            ", ".join(f"{r.name} ({r.reason})" for r in dense[:10]),
        )


# --- folders and files ------------------------------------------------------------------


def save_hf(
    model,
    directory: str | os.PathLike,
    *,
    report=None,
    processor=None,
    recipe: str | dict | None = None,
    config=None,
) -> Path:
    """Write a model clustered by ``wclust.compress_`` (or loaded from a .wclust file)
    as a Hugging Face folder that ``from_pretrained`` reloads compressed.

    Args:
        model: a transformers ``PreTrainedModel`` whose weights are clustered.
        directory: the folder; written next to it first and moved into place once
            complete (an existing folder is replaced only then).
        report: the ``CompressionReport`` (or its dict) kept for ``wclust inspect``.
        processor: also saved into the folder (tokenizer / feature extractor), so
            ``pipeline(model=directory)`` finds it.
        recipe: the recipe to store (default: the report's).
        config: the ``ClusterConfig`` (or its dict) the clustering ran, kept for
            converting back to a .wclust file.

    Returns:
        The folder written.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"a Hugging Face folder needs a transformers model, got {type(model).__name__}; "
            "save other models with wclust.save"
        )
    if not clustered_weights(model):
        raise ValueError("the model has no clustered weight; run wclust.compress_ first")
    if recipe is None and report is not None:
        recipe = report.get("recipe") if isinstance(report, dict) else report.recipe
    cc = config.to_dict() if hasattr(config, "to_dict") else config
    q = WclustHfQuantizer(WclustConfig(recipe=recipe, cluster_config=cc), pre_quantized=True)
    if report is not None:
        q.report = report if isinstance(report, dict) else report.to_dict()
    _attach(model, q)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the mode any new folder gets
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a wclust model saved with save_pretrained."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_hf(directory: str | os.PathLike, **kwargs):
    """``from_pretrained`` of a wclust folder with the class its config names."""
    import transformers

    d = Path(directory)
    if not is_hf_folder(d):
        raise FormatError(f"{d}: not a wclust Hugging Face folder (no wclust quantization_config)")
    arch = (json.loads((d / "config.json").read_text()).get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"{d}: unknown model class {arch!r} in config.json")
    return cls.from_pretrained(str(d), **kwargs).eval()


def to_hf(file: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Convert a .wclust file (of a transformers model) to a Hugging Face folder with
    the same tensors (codes, codebooks, scales, every other tensor).

    Returns:
        The folder written.
    """
    from ..formats import load, read_header
    from ..models import load_processor

    header = read_header(file)
    if (header.get("arch") or {}).get("kind") != "transformers":
        raise FormatError(f"{file}: holds no transformers model; only those have a HF folder")
    model = load(file)
    processor = None
    try:
        processor = load_processor(header.get("source"), model)
    except Exception:  # noqa: BLE001 - the processor is optional here
        processor = None
    return save_hf(
        model,
        directory,
        report=header.get("report"),
        recipe=header.get("recipe"),
        config=header.get("config"),
        processor=processor,
    )


def from_hf(directory: str | os.PathLike, file: str | os.PathLike) -> Path:
    """Convert a wclust Hugging Face folder to a .wclust file with the same tensors.

    Returns:
        The file written.
    """
    from ..formats import save

    model = load_hf(directory, dtype="auto")
    q = model.hf_quantizer
    stored = q.quantization_config.cluster_config
    config = (
        ClusterConfig.from_dict(stored)
        if stored
        else _recipe(q.quantization_config).cluster_config()
    )
    report = None
    if q.report is not None:
        from ..report.layers import CompressionReport

        report = CompressionReport.from_dict(q.report)
    qc = model.config.quantization_config
    del model.config.quantization_config  # the file's own header says how it was made
    try:
        return save(model, file, report=report, config=config, source=str(directory))
    finally:
        model.config.quantization_config = qc


def inspect_hf(directory: str | os.PathLike) -> dict:
    """What ``wclust inspect`` shows of a wclust folder: its recipe, report and sizes.

    Returns:
        ``{"folder", "recipe", "report" (or None), "tensor_bytes", "file_bytes"}``.
    """
    d = Path(directory)
    if not is_hf_folder(d):
        raise FormatError(f"{d}: not a wclust Hugging Face folder (no wclust quantization_config)")
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    files = sorted(d.glob("*.safetensors"))
    shapes, report = _read_checkpoint_headers(files)
    tensor_bytes = sum(
        torch.empty((), dtype=dt).element_size() * int(torch.Size(s).numel())
        for s, dt in shapes.values()
    )
    recipe = q.get("recipe")
    if q.get("bits") is not None:
        summary = f"recipe kmeans:bits={q['bits']}"
    elif recipe is None:
        summary = f"recipe {DEFAULT_RECIPE}"
    else:
        try:
            r = get_recipe(recipe)
            summary = "recipe " + (r.spec() if not r.overrides else json.dumps(r.to_dict()))
        except ConfigError:
            summary = f"recipe {recipe!r}"
    return {
        "folder": str(d),
        "recipe_summary": summary,
        "recipe": recipe,
        "bits": q.get("bits"),
        "clustered_weights": len(q.get("layers") or []),
        "report": report,
        "tensor_bytes": tensor_bytes,
        "file_bytes": sum(f.stat().st_size for f in files),
    }
