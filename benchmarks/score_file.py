"""Score existing whisper-base .wclust files: KL to the original on the last 48
built-in train-clean clips (calibration data: it ranks settings without touching the
evaluation clips), then WER/CER on the 100 built-in test-other clips.

    python benchmarks/score_file.py a.wclust b.wclust [--no-wer]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="compressed whisper-base .wclust files")
    ap.add_argument("--no-wer", action="store_true", help="the KL only (about 1 min a file)")
    a = ap.parse_args()

    import torch
    from _whisper_file import calibration_kl, load_student, score_test_clips

    from wclust.models import load_model

    torch.set_num_threads(2)
    loaded = load_model("whisper-base")
    for path in a.files:
        t0 = time.time()
        student = load_student(path)
        row = {"file": path, "kl": round(calibration_kl(student, loaded), 5)}
        if not a.no_wer:
            row.update(score_test_clips(student))
        print("RESULT", json.dumps(row), f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
