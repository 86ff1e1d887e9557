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


def save_and_score(student, out: str, t0: float) -> None:
    """Save ``student`` to ``out``, then print its WER/CER on the 100 built-in clips
    (greedy) and the seconds since ``t0``."""
    import torch

    import wclust
    from wclust.models import load_processor
    from wclust.tasks import get_task

    wclust.save(student, out)
    task = get_task("asr")
    with torch.inference_mode():
        r = task.evaluate(student, load_processor("whisper-base"), task.load_data(None, None, 1))
    print("RESULT", json.dumps(r["quality"]), f"total {time.time() - t0:.0f} s", flush=True)
