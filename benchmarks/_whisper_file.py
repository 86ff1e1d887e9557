"""What the scripts that rework an existing whisper-base .wclust file share: loading
it, and saving and scoring the result on the built-in test-other clips."""

from __future__ import annotations

import json
import time


def load_student(path: str):
    """The compressed whisper-base model in ``path``."""
    import wclust
    from wclust.models import architecture_for

    return wclust.load(path, model_factory=architecture_for("whisper-base"))


_KL_BATCHES: dict[int, list] = {}


def calibration_kl(student, loaded, items: int = 48) -> float:
    """Mean per-token KL(original || ``student``) on the last ``items`` built-in
    train-clean clips, teacher-forced on the original's transcripts (``loaded``: the
    original whisper-base from ``wclust.models.load_model``).

    At 3 bits a few evaluation clips that fall into repetition loops move the WER by
    several points; this smoother figure ranks settings on calibration data alone.
    """
    import torch
    import torch.nn.functional as F

    from wclust.tasks import TaskData

    if items not in _KL_BATCHES:  # the original's transcripts, once per process
        data = TaskData.load(loaded, None)
        data.items = data.items[-items:]
        _KL_BATCHES[items] = data.batches(loaded.model)
    total = tokens = 0.0
    with torch.inference_mode():
        for batch in _KL_BATCHES[items]:
            t = F.log_softmax(loaded.model(**batch).logits.float(), -1)
            s = F.log_softmax(student(**batch).logits.float(), -1)
            total += float((t.exp() * (t - s)).sum())
            tokens += t.shape[0] * t.shape[1]
    return total / tokens


def score_test_clips(student) -> dict:
    """``{"wer": ..., "cer": ...}`` of ``student`` on the 100 built-in test-other
    clips, greedy."""
    import torch

    from wclust.models import load_processor
    from wclust.tasks import get_task

    task = get_task("asr")
    with torch.inference_mode():
        r = task.evaluate(student, load_processor("whisper-base"), task.load_data(None, None, 1))
    return r["quality"]


def save_and_score(student, out: str, t0: float, loaded=None, wer: bool = True) -> None:
    """Save ``student`` to ``out``, then print its KL to the original on calibration
    clips (when ``loaded``, the original, is given; ``calibration_kl``), its WER/CER on
    the 100 built-in test-other clips (greedy; unless not ``wer``) and the seconds since
    ``t0``."""
    import wclust

    wclust.save(student, out)
    if loaded is not None:
        print(f"KL {calibration_kl(student, loaded):.4f} on 48 train-clean clips", flush=True)
    quality = score_test_clips(student) if wer else {}
    print("RESULT", json.dumps(quality), f"total {time.time() - t0:.0f} s", flush=True)
