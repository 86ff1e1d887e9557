"""Re-choose the codes of an existing compressed whisper-base file by GPTQ error
feedback, with input Hessians from the built-in train-clean clips, then score it on
the built-in test-other clips.

The same steps as a ``+gptq`` recipe, split in two so that one allocation (a
``.wclust`` file) can take Hessians from more clips than its Fisher weights came from
(a recipe's ``+gptq`` uses the calibration items, 16 by default):

    python benchmarks/gptq_file.py budget-3.25.wclust out.wclust --items 251 --damp 0.01
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="compressed whisper-base .wclust file")
    ap.add_argument("out", help="where the re-coded .wclust goes")
    ap.add_argument("--items", type=int, default=None, help="clips to use (default: all 251)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument(
        "--embed-damp",
        type=float,
        default=None,
        help="the damping of a weight also read as an embedding table (the token table)",
    )
    ap.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="round inputs in order of decreasing Hessian diagonal (the recipe default)",
    )
    ap.add_argument(
        "--refit",
        type=int,
        default=0,
        help="rounds of re-fitting each row's scales to the layer's output error, "
        "each but the last followed by new codes",
    )
    ap.add_argument(
        "--hessians",
        help="a .safetensors file: the Hessians are read from it if it exists, else "
        "computed and written to it (one collection for several damping settings)",
    )
    ap.add_argument(
        "--exclude", default="", help="comma-separated layer globs to leave as they are"
    )
    ap.add_argument("--only", default="", help="comma-separated layer globs: re-code only these")
    ap.add_argument(
        "--inputs",
        help="a compressed whisper-base .wclust file whose layer inputs GPTQ sees (with "
        "the original's outputs as the target, collect_cross_hessians); 'self': the file "
        "being re-coded; default: the original's inputs and weights",
    )
    ap.add_argument(
        "--cross-cache",
        help="with --inputs: a .safetensors file the inputs' statistics are read from if "
        "it exists, else written to",
    )
    ap.add_argument(
        "--own-target",
        action="store_true",
        help="with --inputs: each layer matches its own weight's output on those inputs, "
        "not the original's on the original inputs (GPTQ's sequential form)",
    )
    ap.add_argument(
        "--cross-damp",
        type=float,
        default=None,
        help="with --inputs: the target's pull toward the layer's own weight (ridge, times "
        "the Hessian's mean diagonal; default: --damp)",
    )
    ap.add_argument(
        "--dim",
        type=int,
        default=1,
        help="weights per code: 2 turns the scalar codebooks of up to 4 bits into vector "
        "codebooks of pairs first and chooses their codes by GPTVQ (the recipe's gptq:dim)",
    )
    ap.add_argument(
        "--refit-codebook",
        action="store_true",
        help="in each --refit round, also re-fit each layer's codebook to its output "
        "error (the recipe's gptq:refit_codebook)",
    )
    ap.add_argument("--no-wer", action="store_true", help="print the KL only")
    a = ap.parse_args()

    import torch
    from _whisper_file import load_student, save_and_score
    from safetensors.torch import load_file, save_file

    from wclust.models import load_model
    from wclust.nn.owners import weight_owners
    from wclust.recipes import GPTQ
    from wclust.stages.gptq import collect_cross_hessians, collect_hessians, gptq_refine_
    from wclust.tasks import TaskData

    torch.set_num_threads(2)
    t0 = time.time()
    loaded = load_model("whisper-base")
    teacher = loaded.model
    cross = None
    if a.inputs and a.cross_cache and os.path.exists(a.cross_cache):
        stats = load_file(a.cross_cache)
        hessians = {k[2:]: v for k, v in stats.items() if k.startswith("h/")}
        cross = {k[2:]: v for k, v in stats.items() if k.startswith("c/")}
        print(f"input statistics of {len(cross)} layers read from {a.cross_cache}")
    elif a.inputs:
        inputs = load_student(a.artifact if a.inputs == "self" else a.inputs)
        batches = TaskData.load(loaded, None, a.items).batches(teacher)
        hessians, cross = collect_cross_hessians(inputs, teacher, batches)
        del inputs
        print(f"input statistics from {len(batches)} clips ({time.time() - t0:.0f} s)")
        if a.cross_cache:
            stats = {f"h/{k}": v for k, v in hessians.items()}
            save_file({**stats, **{f"c/{k}": v for k, v in cross.items()}}, a.cross_cache)
    elif a.hessians and os.path.exists(a.hessians):
        hessians = load_file(a.hessians)
        print(f"hessians of {len(hessians)} layers read from {a.hessians}")
    else:
        batches = TaskData.load(loaded, None, a.items).batches(teacher)
        with torch.no_grad():
            hessians = collect_hessians(teacher, batches)
        print(f"hessians from {len(batches)} clips ({time.time() - t0:.0f} s)")
        if a.hessians:
            save_file(hessians, a.hessians)
    skip = [g for g in a.exclude.split(",") if g]
    hessians = {n: h for n, h in hessians.items() if not any(fnmatch.fnmatch(n, g) for g in skip)}
    if a.only:
        keep = [g for g in a.only.split(",") if g]
        hessians = {n: h for n, h in hessians.items() if any(fnmatch.fnmatch(n, g) for g in keep)}
    originals = {owners[0][0]: w.detach() for w, owners in weight_owners(teacher)}
    student = load_student(a.artifact)
    # the recipe stage's options, validated as a recipe's are (these defaults differ:
    # one damping for every layer, no refit, so earlier logs' commands reproduce)
    stage = GPTQ(
        damp=a.damp,
        act_order=a.act_order,
        embed_damp=a.embed_damp,
        refit=a.refit,
        dim=a.dim,
        refit_codebook=a.refit_codebook,
    )
    cross = None if a.own_target else cross
    kw = stage.refine_kwargs()
    changed = gptq_refine_(student, hessians, originals, cross=cross, cross_damp=a.cross_damp, **kw)
    for name, (before, after) in changed.items():
        print(f"{name}: weight MSE {before:.3g} -> {after:.3g}")
    print(f"{len(changed)} layers re-coded ({time.time() - t0:.0f} s)", flush=True)
    save_and_score(student, a.out, t0, loaded, wer=not a.no_wer)


if __name__ == "__main__":
    main()
