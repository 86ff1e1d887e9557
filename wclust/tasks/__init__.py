"""Tasks: ``load_data(path) -> data`` and ``evaluate(model, processor, data) -> metrics``.

Each task is registered by name in ``wclust.registry.TASKS``; ``compare`` looks the
task of a model up there. Heavy imports happen inside the functions.

Registered: ``asr`` (WER/CER), ``lm`` (perplexity), ``embed`` (sentence-embedding
agreement with the original) and ``vision`` (top-1 agreement and KL with the original,
accuracy on labelled folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import TASKS

__all__ = ["Task", "TaskData", "calibration_data", "get_task"]


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
    # (model, processor, data) -> {name: tensor}: outputs of the original model that
    # ``evaluate(..., reference=...)`` scores against; None for tasks with ground truth.
    reference: Any = None
    # (path, limit) -> data to calibrate or distil on (may lack labels); None: load_data
    load_calibration: Any = None
    # (data, speeds) -> more items made from ``data`` (e.g. speed-perturbed clips) to
    # distil on; None: the task cannot augment its data
    augment: Any = None


def _asr_load(path: str | None, limit: int | None = None, every: int = 1):
    from .asr import builtin_eval_dir, load_audio_dir

    return load_audio_dir(path or builtin_eval_dir(), limit=limit, every=every)


def _asr_load_calibration(path: str | None, limit: int | None = None, model: str | None = None):
    from .asr import builtin_calibration_dir, load_audio_dir

    return load_audio_dir(
        path or builtin_calibration_dir(), limit=limit, transcripts=False, machine=model
    )


def _asr_augment(data, speeds):
    from .asr import speed_perturb

    return speed_perturb(data, speeds)


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
            "item_errors": r["item_errors"],
        },
    }


def _asr_default():
    from .asr import builtin_eval_dir

    return str(builtin_eval_dir())


def _asr_calib(model, processor, data):
    from .asr import calibration_batches

    return calibration_batches(model, processor, data)


TASKS.register("asr", "speech recognition: WER/CER of greedy Whisper transcripts")(
    Task(
        "asr",
        _asr_load,
        _asr_eval,
        _asr_default,
        _asr_calib,
        load_calibration=_asr_load_calibration,
        augment=_asr_augment,
    )
)


def _lm_load(path: str | None, limit: int | None = None, every: int = 1):
    from .lm import load_text

    return load_text(path, limit, every)


def _lm_eval(model, processor, data) -> dict:
    from .lm import evaluate

    r = evaluate(model, processor, data)
    return {
        "quality": {"ppl": r["ppl"]},
        "latency_s": r["latency_s"],
        "details": {
            "nll": r["nll"],
            "n_tokens": r["n_tokens"],
            "n_windows": r["n_windows"],
            "item_errors": r["item_errors"],
        },
    }


def _lm_calib(model, processor, data):
    from .lm import calibration_batches

    return calibration_batches(model, processor, data)


TASKS.register("lm", "language modelling: perplexity, sliding window over a fixed token budget")(
    Task("lm", _lm_load, _lm_eval, lambda: None, _lm_calib)
)


def _embed_load(path: str | None, limit: int | None = None, every: int = 1):
    from .embed import load_sentences

    return load_sentences(path, limit, every)


def _embed_eval(model, processor, data, reference=None) -> dict:
    from .embed import evaluate

    r = evaluate(model, processor, data, reference)
    return {"quality": r["quality"], "latency_s": r["latency_s"], "details": {}}


def _embed_ref(model, processor, data):
    from .embed import reference

    return reference(model, processor, data)


TASKS.register(
    "embed", "sentence embeddings: cosine similarity and neighbour agreement with the original"
)(Task("embed", _embed_load, _embed_eval, lambda: None, None, False, _embed_ref))


def _vision_load(path: str | None, limit: int | None = None, every: int = 1):
    from .vision import load_images

    return load_images(path, limit, every)


def _vision_eval(model, processor, data, reference=None) -> dict:
    from .vision import evaluate

    r = evaluate(model, processor, data, reference)
    return {
        "quality": r["quality"],
        "latency_s": r["latency_s"],
        "details": {"predictions": r["predictions"], "item_errors": r["item_errors"]},
    }


def _vision_ref(model, processor, data):
    from .vision import reference

    return reference(model, processor, data)


TASKS.register(
    "vision", "image classification: top-1 agreement and KL with the original; accuracy if labelled"
)(Task("vision", _vision_load, _vision_eval, lambda: None, None, False, _vision_ref))


def get_task(name: str) -> Task:
    return TASKS.get(name)


def calibration_data(
    task: Task, path: str | None, limit: int | None = None, model: str | None = None
):
    """The data ``task`` calibrates or distils on: ``path`` (None: its built-in data),
    read by ``task.load_calibration`` where the task allows unlabelled data (speech
    without transcripts: ``model``'s own stored transcripts stand in where there are
    some), else by ``task.load_data``."""
    if task.load_calibration is not None:
        return task.load_calibration(path, limit, model)
    return task.load_data(path, limit)


class TaskData:
    """A task's calibration/distillation items as ``wclust.compress_``'s ``data``:
    model inputs made when the pipeline asks (labels for unlabelled speech come from
    the original model, before anything is compressed).

    Args:
        loaded: a ``wclust.models.LoadedModel`` (its processor and task).
        items: the task's data items (as ``calibration_data`` returns them).
    """

    def __init__(self, loaded, items):
        if loaded.task is None:
            raise ValueError(f"no task is known for {loaded.name}, so it has no data to use")
        self.task = get_task(loaded.task)
        if self.task.calibration_batches is None:
            raise ValueError(
                f"task {loaded.task!r} has no loss to calibrate or distil with; use a recipe "
                "without calibration or distillation"
            )
        self.processor = loaded.processor
        self.name = loaded.name
        self.items = items

    @classmethod
    def load(cls, loaded, path: str | None, limit: int | None = None) -> TaskData:
        """The items of ``path`` (None: the task's built-in calibration data)."""
        task = get_task(loaded.task) if loaded.task else None
        if task is None:
            raise ValueError(f"no task is known for {loaded.name}, so it has no data to use")
        return cls(loaded, calibration_data(task, path, limit, loaded.name))

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, model) -> list:
        try:
            return list(self.task.calibration_batches(model, self.processor, self.items))
        except (AttributeError, TypeError) as e:
            raise ValueError(
                f"{self.name} cannot be calibrated or distilled: its processor does not fit "
                f"task {self.task.name!r} ({e}); use a recipe without calibration or distillation"
            ) from None

    def augment(self, positions: list[int], speeds, teacher) -> list:
        """Model inputs of more items made from those at ``positions`` (speech: played
        at ``speeds``); labels, where missing, from ``teacher``."""
        if self.task.augment is None:
            raise ValueError(
                f"task {self.task.name!r} has no data augmentation; drop the speeds (they are "
                "for speech recognition)"
            )
        more = self.task.augment([self.items[i] for i in positions], tuple(speeds))
        return list(self.task.calibration_batches(teacher, self.processor, more))
