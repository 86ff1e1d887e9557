"""Layer-by-layer GPTQ of a compressed whisper-base file, toward the original's outputs.

GPTAQ's asymmetric target in the sequential pass it needs; the result is scored on
the built-in test-other clips.

``gptq_file.py`` re-codes every layer at once from one set of statistics. Here the
layers are re-coded in the order the model runs them. Each encoder and decoder block's
inputs are cached for every calibration clip twice: as the original model makes them
and as the compressed model, with every layer before the block already re-coded, makes
them. Inside a block the Linear layers go in groups that read the same input (q/k/v,
then out_proj, ..., fc2). The original block runs once on its cached inputs, keeping
its Linear layers' inputs ``x``; for each group, the compressed block runs as far as
the group on its own cached inputs, the statistics ``mean x~ x~^T`` and ``mean x~ x^T``
are summed (``x~``: the compressed model's layer input), and the group is re-coded toward
``cross_target`` (or, with ``--own-target``, toward its own weight on the compressed
model's inputs: plain sequential GPTQ). The token table, tied to the output
projection, is re-coded first from the original's Hessians (``--hessians``), because
its rows feed the decoder's first block.

    python benchmarks/gptq_sequential.py budget-3.25.wclust out.wclust \
        --hessians h251.safetensors --embed-damp 0.1 --refit 1
"""

from __future__ import annotations

import argparse
import time

ENCODER_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.out_proj"],
    ["fc1"],
    ["fc2"],
]
DECODER_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.out_proj"],
    ["encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"],
    ["encoder_attn.out_proj"],
    ["fc1"],
    ["fc2"],
]


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once a block's inputs are caught."""


def block_inputs(model, block, batches) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` that ``block`` is called with, one per batch (the forward
    stops there)."""
    import torch

    caught = []

    def hook(m, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise RuntimeError("the block did not run once per batch")
    return caught


def _hidden_first(args, kwargs, h):
    """The call ``(args, kwargs)`` with its hidden states replaced by ``h``."""
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def teacher_pass(block, names, calls):
    """One run of the original ``block`` on every cached call: the inputs of its Linear
    layers ``names`` (``{name: [rows x in per call]}``, one tensor shared by the layers
    that read the same input) and the block's output hidden states."""
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [
        block.get_submodule(n).register_forward_hook(
            lambda m, i, o, k=n: inputs[k].append(i[0].detach().reshape(-1, i[0].shape[-1]))
        )
        for n in names
    ]
    try:
        outs = run_block(block, calls)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outs


def run_block(block, calls):
    """The block's output hidden states for every cached call."""
    import torch

    outs = []
    with torch.no_grad():
        for args, kwargs in calls:
            out = block(*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def group_stats(s_block, names, t_inputs, s_calls):
    """``{name: (mean x~ x~^T, mean x~ x^T)}`` for the Linear layers ``names`` of one
    block: ``x`` the original block's inputs (``t_inputs``, from :func:`teacher_pass`),
    ``x~`` the compressed ``s_block``'s on its own calls. The compressed block runs only
    as far as the last of ``names``."""
    import torch

    s_mods = {n: s_block.get_submodule(n) for n in names}
    sums, hooks, pending = {}, [], set()
    clip = [0]

    def accumulate(m, inp, out, key):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        x0 = t_inputs[key][clip[0]].float()
        h, c, rows = sums.get(key, (0, 0, 0))
        sums[key] = (h + (x.T @ x).double(), c + (x.T @ x0).double(), rows + x.shape[0])
        pending.discard(key)
        if not pending:
            raise _Stop

    for n in names:
        hooks.append(s_mods[n].register_forward_hook(lambda m, i, o, k=n: accumulate(m, i, o, k)))
    try:
        with torch.no_grad():
            for i, (sa, sk) in enumerate(s_calls):
                clip[0] = i
                pending.update(names)
                try:
                    s_block(*sa, **sk)
                except _Stop:
                    pass
                if pending:
                    raise RuntimeError(f"{sorted(pending)} did not run in the block")
    finally:
        for h in hooks:
            h.remove()
    return {n: ((h / r).float(), (c / r).float()) for n, (h, c, r) in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="compressed whisper-base .wclust file")
    ap.add_argument("out", help="where the re-coded .wclust goes")
    ap.add_argument("--items", type=int, default=None, help="clips to use (default: all 251)")
    ap.add_argument(
        "--hessians",
        required=True,
        help="the original's Hessians (.safetensors, as gptq_file.py --hessians writes): "
        "the token table's, re-coded first",
    )
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--embed-damp", type=float, default=None, help="the token table's damping")
    ap.add_argument(
        "--refit", type=int, default=0, help="rounds of re-fitting scales (gptq_file.py's)"
    )
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--cross-damp",
        type=float,
        default=None,
        help="the target's pull toward the layer's own weight (default: --damp)",
    )
    ap.add_argument(
        "--own-target",
        action="store_true",
        help="each layer matches its own weight's output on the compressed model's "
        "inputs (plain sequential GPTQ), not the original's",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-wer", action="store_true", help="print the KL only")
    a = ap.parse_args()

    import torch
    from _whisper_file import load_student, save_and_score
    from safetensors.torch import load_file

    from wclust.models import load_model
    from wclust.nn.owners import weight_owners
    from wclust.recipes import GPTQ
    from wclust.stages.gptq import gptq_refine_
    from wclust.tasks import TaskData

    torch.set_num_threads(a.threads)
    t0 = time.time()
    loaded = load_model("whisper-base")
    teacher = loaded.model.eval()
    student = load_student(a.artifact).eval()
    originals = {owners[0][0]: w.detach() for w, owners in weight_owners(teacher)}
    kw = GPTQ(damp=a.damp, act_order=a.act_order, embed_damp=a.embed_damp, refit=a.refit)
    kw = kw.refine_kwargs()
    batches = TaskData.load(loaded, None, a.items).batches(teacher)
    print(f"{len(batches)} clips ({time.time() - t0:.0f} s)", flush=True)

    # the token table first: its rows are the decoder's input
    table = "model.decoder.embed_tokens"
    hessians = load_file(a.hessians)
    done = gptq_refine_(student, {table: hessians[table]}, originals, **kw)
    print(f"{table}: weight MSE {done[table][0]:.3g} -> {done[table][1]:.3g}", flush=True)

    for stack, groups in (("encoder", ENCODER_GROUPS), ("decoder", DECODER_GROUPS)):
        t_layers = teacher.get_submodule(f"model.{stack}.layers")
        s_layers = student.get_submodule(f"model.{stack}.layers")
        t_calls = block_inputs(teacher, t_layers[0], batches)
        s_calls = block_inputs(student, s_layers[0], batches)
        for i, (t_block, s_block) in enumerate(zip(t_layers, s_layers, strict=True)):
            t_inputs, t_out = teacher_pass(t_block, [n for g in groups for n in g], t_calls)
            for group in groups:
                stats = group_stats(s_block, group, t_inputs, s_calls)
                prefix = f"model.{stack}.layers.{i}."
                hs = {prefix + n: h for n, (h, _c) in stats.items()}
                cross = None if a.own_target else {prefix + n: c for n, (_h, c) in stats.items()}
                done = gptq_refine_(
                    student, hs, originals, cross=cross, cross_damp=a.cross_damp, **kw
                )
                for name, (before, after) in done.items():
                    print(f"{name}: weight MSE {before:.3g} -> {after:.3g}", flush=True)
            del t_inputs
            s_out = run_block(s_block, s_calls)
            t_calls = [_hidden_first(c[0], c[1], h) for c, h in zip(t_calls, t_out, strict=True)]
            s_calls = [_hidden_first(c[0], c[1], h) for c, h in zip(s_calls, s_out, strict=True)]
            print(f"{stack} block {i} done ({time.time() - t0:.0f} s)", flush=True)
        del t_calls, s_calls
    save_and_score(student, a.out, t0, loaded, wer=not a.no_wer)


if __name__ == "__main__":
    main()
