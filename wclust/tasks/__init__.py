"""Tasks: ``load_data(path) -> data`` and ``evaluate(model, processor, data) -> metrics``.

Each task is registered by name in ``wclust.registry.TASKS``; ``compare`` looks the
task of a model up there. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import TASKS

__all__ = ["Task", "get_task"]


@dataclass(frozen=True)
class Task:
    """A task: how to load its data and how to score a model on it.

    ``evaluate`` returns ``{"quality": {metric: value}, "latency_s": [per item],
    "details": {...}}``; ``lower_is_better`` says how to read the first metric.
    """

    name: str
    load_data: Any
    evaluate: Any
    default_data: Any
    calibration_batches: Any = None  # (model, processor, data) -> model(**batch) inputs
    lower_is_better: bool = True


def _asr_load(path: str | None, limit: int | None = None, every: int = 1):
    from .asr import builtin_clips_dir, load_audio_dir

    return load_audio_dir(path or builtin_clips_dir(), limit=limit, every=every)


def _asr_eval(model, processor, data) -> dict:
    from .asr import evaluate

    r = evaluate(model, processor, data)
    return {
        "quality": {"wer": r["wer"], "cer": r["cer"]},
        "latency_s": r["latency_s"],
        "details": {
            "n_clips": r["n_clips"],
            "audio_seconds": r["audio_seconds"],
            "names": r["names"],
            "hypotheses": r["hypotheses"],
        },
    }


def _asr_default():
    from .asr import builtin_clips_dir

    return str(builtin_clips_dir())


def _asr_calib(model, processor, data):
    from .asr import calibration_batches

    return calibration_batches(model, processor, data)


TASKS.register("asr", "speech recognition: WER/CER of greedy Whisper transcripts")(
    Task("asr", _asr_load, _asr_eval, _asr_default, _asr_calib)
)


def get_task(name: str) -> Task:
    return TASKS.get(name)
