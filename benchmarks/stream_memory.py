"""Compress a synthetic sharded checkpoint larger than the memory it is allowed.

Writes a random-init Llama-shaped checkpoint (float32, safetensors shards of about
1 GB, config.json, model.safetensors.index.json) of about ``--gb`` GB, then runs
``wclust compress DIR -o OUT --stream`` in a child process whose memory is limited,
and reports the child's peak resident set, wall time and the output's size.

The limit (``--limit-gb``) is applied both ways this machine allows without systemd:
``prlimit --as`` (address space: every mapping counts, so a memory-mapped shard would
fail at once) and, when the cgroup-v1 memory controller is writable (root), a cgroup
with ``memory.limit_in_bytes`` (resident memory plus page cache charged to the child).

    python benchmarks/stream_memory.py --dir /tmp/wclust-8gb --gb 8 --limit-gb 2

The checkpoint is generated, never committed; ``--keep`` keeps it for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_checkpoint(
    folder: Path, gb: float, shard_gb: float = 1.0, seed: int = 0, hidden: int = 4096
) -> int:
    """A Llama model ``hidden`` wide (default 4096 and an MLP of 11008: Llama-7B's
    widths; the MLP keeps that ratio) with as many layers as fit ``gb``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    mlp = hidden * 11008 // 4096
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    vocab = 8192
    layers = max(1, round((gb * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, size, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            n_shard += 1
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        nbytes = t.numel() * 4
        if size + nbytes > shard_gb * 1e9:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    # Rename to the usual "-of-" names and write the index.
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    renamed = {}
    for i in range(1, n_shard + 1):
        old = f"model-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{n_shard:05d}.safetensors"
        (folder / old).rename(folder / new)
        renamed[old] = new
    index["weight_map"] = {k: renamed[v] for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def _cgroup(limit: int) -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists():
        return None
    cg = root / f"wclust-bench-{os.getpid()}"
    try:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if (cg / "memory.memsw.limit_in_bytes").exists():  # no swap either
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return cg


def run_limited(cmd: list[str], limit: int) -> dict:
    """Run ``cmd`` under both limits; returns rc, seconds, peak RSS, cgroup peak."""
    cg = _cgroup(limit)
    full = ["prlimit", f"--as={limit}", "--", *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}

    def enter():
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.run(full, env=env, preexec_fn=enter, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out = {
        "rc": proc.returncode,
        "seconds": secs,
        "peak_rss_bytes": peak_rss,
        "stderr_tail": proc.stderr[-1500:],
        "cgroup": str(cg) if cg else None,
    }
    if cg is not None:
        out["cgroup_peak_bytes"] = int((cg / "memory.max_usage_in_bytes").read_text())
        out["cgroup_failcnt"] = int((cg / "memory.failcnt").read_text())
        try:
            cg.rmdir()
        except OSError:
            pass
    return out


LAYER_METHODS = {
    "exact, per channel (default)": dict(bits=4, granularity="channel", method="exact"),
    "exact, groups of 128": dict(bits=4, granularity="group", group_size=128, method="exact"),
    "NF4, groups of 64": dict(bits=4, granularity="group", group_size=64, method="nf4"),
    "scaled-lloyd, groups of 64": dict(
        bits=4, granularity="group", group_size=64, method="scaled-lloyd"
    ),
    "exact, one codebook per tensor": dict(bits=4, granularity="tensor", method="exact"),
}
_LAYER_CHILD = """
import json, resource, sys, time, torch
from wclust.api import TENSOR_METHODS
from wclust.config import ClusterConfig
x = torch.randn(4096, 11008) * 0.02
s = ClusterConfig(**json.loads(sys.argv[1])).for_layer("x")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
TENSOR_METHODS.get(s["method"])(x, s, None, 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": (peak - base) / (x.numel() * 4), "seconds": time.perf_counter() - t}))
"""


def layer_memory() -> None:
    """Extra peak RSS of clustering one 4096x11008 float32 tensor, per method, each in
    a fresh process (in units of the tensor's 180 MB)."""
    print("| method | extra peak / tensor size | time (s) |\n|---|---:|---:|")
    for label, cfg in LAYER_METHODS.items():
        out = subprocess.run(
            [sys.executable, "-c", _LAYER_CHILD, json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
        r = json.loads(out)
        print(f"| {label} | {r['extra']:.1f}x | {r['seconds']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wclust-synthetic-ckpt"))
    ap.add_argument("--gb", type=float, default=8.0, help="checkpoint size (float32)")
    ap.add_argument("--limit-gb", type=float, default=2.0)
    ap.add_argument(
        "--hidden", type=int, default=4096, help="model width (4096: Llama-7B's layers)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--out", type=Path, default=None, help="output .wclust (default: DIR.wclust)")
    ap.add_argument("args", nargs="*", help="extra arguments for wclust compress")
    ap.add_argument(
        "--layer-memory",
        action="store_true",
        help="only measure each method's working memory on one 4096x11008 tensor",
    )
    a = ap.parse_args()
    if a.layer_memory:
        layer_memory()
        return
    ckpt = a.dir
    if not (ckpt / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        total = make_checkpoint(ckpt, a.gb, hidden=a.hidden)
        print(
            f"wrote {total / 1e9:.2f} GB checkpoint to {ckpt} in {time.perf_counter() - t0:.0f} s"
        )
    on_disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    shards = len(list(ckpt.glob("*.safetensors")))
    from wclust.formats.checkpoint import SafetensorsCheckpoint

    biggest = max(
        (hi - lo for _f, _dt, _shape, lo, hi in SafetensorsCheckpoint(ckpt).entries.values()),
        default=0,
    )
    out = a.out or ckpt.with_suffix(".wclust")
    cmd = [
        sys.executable,
        "-m",
        "wclust.cli",
        "compress",
        str(ckpt),
        "-o",
        str(out),
        "--stream",
        *a.args,
    ]
    limit = int(a.limit_gb * (1 << 30))
    r = run_limited(cmd, limit)
    result = {
        "checkpoint_bytes": on_disk,
        "shards": shards,
        "largest_tensor_bytes": biggest,
        "limit_bytes": limit,
        "command": " ".join(cmd),
        **r,
        "output_bytes": out.stat().st_size if out.exists() and r["rc"] == 0 else None,
    }
    print(json.dumps(result, indent=1))
    if not a.keep:
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
