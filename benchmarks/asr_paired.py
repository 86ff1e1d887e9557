"""Score compressed whisper-base files on the 100 built-in test-other clips and say how
sure their WER differences are: each file against fp32 and against the first file,
with 95% intervals of a paired bootstrap over the clips.

    python benchmarks/asr_paired.py a.wclust b.wclust --save clips.json

A difference whose interval includes 0 could come from which clips are in the set.
``--load`` re-reads the per-clip errors of an earlier ``--save`` instead of decoding.
"""

from __future__ import annotations

import argparse
import functools
import json
import os


@functools.cache
def _clips():
    """The ASR task, whisper-base's processor and the 100 test clips, loaded once."""
    from wclust.models import load_processor
    from wclust.tasks import get_task

    task = get_task("asr")
    return task, load_processor("whisper-base"), task.load_data(None, None, 1)


def _score(path: str) -> dict:
    import torch
    from _whisper_file import load_student

    from wclust.models import load_model

    task, processor, data = _clips()
    model = load_model("whisper-base").model if path == "fp32" else load_student(path)
    with torch.inference_mode():
        r = task.evaluate(model, processor, data)
    return {**r["quality"], "item_errors": r["details"]["item_errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="compressed whisper-base .wclust files")
    ap.add_argument("--save", help="write every file's per-clip errors to this JSON file")
    ap.add_argument("--load", help="a JSON file of an earlier --save to read instead")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    from wclust.report.stats import paired_bootstrap

    torch.set_num_threads(a.threads)
    scores: dict[str, dict] = {}
    if a.load:
        with open(a.load) as f:
            scores = json.load(f)
    for path in ["fp32", *a.files]:
        if path not in scores:
            scores[path] = _score(path)
            print(f"{path}: {scores[path]['wer']:.2f}% WER", flush=True)
    if a.save:
        tmp = a.save + ".tmp"
        with open(tmp, "w") as f:
            json.dump(scores, f)
        os.replace(tmp, a.save)
    names = list(scores) if a.load and not a.files else ["fp32", *a.files]
    first = next((n for n in names if n != "fp32"), None)
    print("| file | WER | CER | minus fp32 (95% interval) | minus the first file (95% interval) |")
    print("|---|---:|---:|---|---|")
    for n in names:
        s = scores[n]
        cells = []
        for base in ("fp32", first):
            if base is None or base == n:
                cells.append("")
                continue
            b = scores[base]["item_errors"]
            d, lo, hi = paired_bootstrap(s["item_errors"]["edits"], b["edits"], b["words"])
            cells.append(f"{d:+.2f} ({lo:+.2f} to {hi:+.2f})")
        print(f"| {n} | {s['wer']:.2f}% | {s['cer']:.2f}% | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
