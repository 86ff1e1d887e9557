"""Distil an existing compressed whisper-base file, then score it on the built-in
test-other clips.

The same steps as a ``+distill`` recipe, split in two so that one allocation (a
``.wclust`` file) can be distilled with other settings without compressing again:
the fp32 model is the teacher, the items are the built-in train-clean clips (labels
are the fp32 model's transcripts), ``--holdout`` of them held out for early stopping.

    python benchmarks/distill_file.py budget-3.25.wclust out.wclust --epochs 3 --hidden 1
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="compressed whisper-base .wclust file")
    ap.add_argument("out", help="where the distilled .wclust goes")
    ap.add_argument("--items", type=int, default=None, help="clips to use (default: all 251)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--hidden", type=float, default=1.0)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--reassign-every", type=int, default=0)
    ap.add_argument("--reassign-lr", type=float, default=1e-4)
    a = ap.parse_args()

    import torch
    from _whisper_file import load_student, save_and_score

    from wclust.models import load_model
    from wclust.stages.train import distill_, split_holdout
    from wclust.tasks import TaskData

    torch.set_num_threads(2)
    t0 = time.time()
    loaded = load_model("whisper-base")
    teacher = loaded.model
    batches = TaskData.load(loaded, None, a.items).batches(teacher)
    student = load_student(a.artifact)
    keep, held = split_holdout(list(range(len(batches))), a.holdout)
    res = distill_(
        student,
        teacher,
        [batches[i] for i in keep],
        val_batches=[batches[i] for i in held],
        epochs=a.epochs,
        lr=a.lr,
        hidden=a.hidden,
        reassign_every=a.reassign_every,
        reassign_lr=a.reassign_lr,
        log=lambda e, kl, v, s: print(f"epoch {e + 1}: KL {kl:.4f}, held-out {v} ({s:.0f} s)"),
    )
    print(json.dumps(res), flush=True)
    save_and_score(student, a.out, t0, loaded)


if __name__ == "__main__":
    main()
