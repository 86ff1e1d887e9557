"""Mutation fuzzing of .wclust files: many damaged and hostile files, each read by
``wclust.load``, ``read_header`` and ``stored_bytes``; every outcome must be a clean
load or ``FormatError``.

Case ``i`` is made from seed ``i`` alone (rerun one with ``--start i --n 1``). Each
worker process runs under an address-space limit (``RLIMIT_AS``, ``--mem-mb`` above
what it holds at start) and a per-case alarm (``--timeout``), so a huge allocation
or a hang shows up as ``MemoryError`` / ``Timeout`` instead of taking the machine.

    python benchmarks/fuzz_files.py --n 100000 --workers 2

Prints cases run, outcomes by type, failures (with seeds) and the runtime.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import struct
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import wclust  # noqa: E402
import wclust.formats.wclust_file as wf  # noqa: E402

TB = 1 << 40
NASTY = [None, True, False, -1, 0, 9, 64, 10**12, 1 << 63, 10**400, TB, -(1 << 63),
         float("inf"), float("nan"), 0.5, "", "x", "float32", "clustered.0", [], [TB],
         [TB, TB], [-1], [1, 2, 3], ["a"], {}, {"a": 1}, [[[]]]]  # fmt: skip
ARCH = ["gpt2", "bert", "GPT2LMHeadModel", "AutoModel", "PreTrainedModel", "BertModel",
        "transformers", "torch", 3, 2, 1, 0.1]  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.int8, torch.uint8, torch.int64, torch.bool]


class Net(nn.Module):
    """Conv2d (regular, depthwise), Conv1d, Embedding, BatchNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv1d = nn.Conv1d(16, 16, 3)
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)


def mlp():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))


def make_valid(d: Path) -> dict:
    from wclust.stages.prune import prune_

    torch.manual_seed(0)
    m = Net()
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=3))
    files = {"net": (wclust.save(m, d / "net.wclust", report=rep), Net)}
    m = Net()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, granularity="group", group_size=16))
    files["net-group"] = (wclust.save(m, d / "net-group.wclust"), Net)
    e = mlp()
    prune_(e, 0.9, scope="layer")
    wclust.compress_(e, wclust.ClusterConfig(bits=4, granularity="tensor", keep_zeros=True))
    files["mlp-huffman"] = (wclust.save(e, d / "mlp-h.wclust", entropy="huffman"), mlp)
    files["mlp-ans"] = (wclust.save(e, d / "mlp-a.wclust", entropy="ans"), mlp)
    try:  # a transformers model, rebuilt from the config in its file (no factory)
        from transformers import GPT2Config, GPT2LMHeadModel

        g = GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
        )
        wclust.compress_(g, wclust.ClusterConfig(bits=4, granularity="group", group_size=16))
        files["gpt2"] = (wclust.save(g, d / "gpt2.wclust"), None)
    except ImportError:
        pass
    return files


def hostile(header: dict, tensors: dict) -> bytes:
    """File bytes with this header and tensors and a correct checksum."""
    text = json.dumps(header, sort_keys=True, default=str)
    meta = {"wclust": text, "wclust_sha256": wf._digest(text, tensors)}
    with tempfile.NamedTemporaryFile(dir=_STATE["dir"], delete=False) as f:
        name = f.name
    wf._write_safetensors(name, tensors, meta)
    blob = Path(name).read_bytes()
    os.unlink(name)
    return blob


def mutate(rng: random.Random, blob: bytes, header: dict, tensors: dict) -> tuple[str, bytes]:
    kind = rng.choice(
        ["truncate", "flip", "header-len", "random", "header-field", "tensor", "st-entry"]
        + (["arch"] * 2 if header.get("arch", {}).get("kind") == "transformers" else [])
    )
    if kind == "truncate":
        return kind, blob[: rng.randrange(len(blob))]
    if kind == "flip":
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "header-len":
        n = rng.choice([rng.randrange(1 << 64), rng.randrange(len(blob) + 64)])
        return kind, struct.pack("<Q", n) + blob[8:]
    if kind == "random":
        junk = rng.randbytes(rng.randrange(4096))
        return kind, rng.choice([junk, struct.pack("<Q", rng.randrange(4096)) + junk])
    header = json.loads(json.dumps(header))
    tensors = dict(tensors)
    if kind == "header-field":
        for _ in range(rng.randint(1, 3)):
            entries = header.get("clustered")
            if isinstance(entries, list) and entries and rng.random() < 0.8:
                e = rng.choice(entries)
                if not isinstance(e, dict):
                    continue
                if "entropy" in e and isinstance(e["entropy"], dict) and rng.random() < 0.4:
                    e = e["entropy"]
                field = rng.choice(sorted(e) + ["x"])
            else:
                e = header
                field = rng.choice(["clustered", "aliases", "version", "arch", "report"])
            if rng.random() < 0.2:
                e.pop(field, None)
            else:
                e[field] = rng.choice(NASTY)
        return kind, hostile(header, tensors)
    if kind == "arch":  # the transformers class and config the model is rebuilt from
        a = header["arch"]
        for _ in range(rng.randint(1, 3)):
            if isinstance(a.get("config"), dict) and a["config"] and rng.random() < 0.7:
                a["config"][rng.choice(sorted(a["config"]))] = rng.choice(NASTY + ARCH)
            else:
                a[rng.choice(["class", "kind", "config", "generation_config"])] = rng.choice(
                    NASTY + ARCH
                )
        return kind, hostile(header, tensors)
    if kind == "tensor":
        name = rng.choice(sorted(tensors))
        t = tensors[name]
        how = rng.choice(["dtype", "shape", "drop", "shrink", "grow", "rename"])
        if how == "dtype":
            tensors[name] = t.to(rng.choice(DTYPES))
        elif how == "shape":
            tensors[name] = t.reshape(-1, 1) if t.dim() != 2 else t.reshape(-1)
        elif how == "drop":
            del tensors[name]
        elif how == "shrink":
            tensors[name] = t.reshape(-1)[: rng.randrange(t.numel() + 1)].clone()
        elif how == "grow":
            tensors[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1].clone()])
        else:
            tensors[rng.choice(["p:x", "b:fc.y", "clustered.9.codes", "q:fc.weight"])] = t
        return kind, hostile(header, {k: v.contiguous() for k, v in tensors.items()})
    # st-entry: a safetensors header entry with a huge or inconsistent declaration
    n = struct.unpack("<Q", blob[:8])[0]
    st = json.loads(blob[8 : 8 + n])
    name = rng.choice([k for k in st if k != "__metadata__"])
    ent = st[name]
    field = rng.choice(["shape", "data_offsets", "dtype"])
    ent[field] = rng.choice(
        [[TB], [TB, TB], [0, TB], [TB, TB + 8], [-1], [1 << 63, 1 << 63], "F8_E5M2", "X", None]
    )
    head = json.dumps(st).encode()
    return kind, struct.pack("<Q", len(head)) + head + blob[8 + n :]


_STATE: dict = {}


class Timeout(BaseException):  # not an Exception: no reader may swallow it
    pass


def _alarm(*_):
    raise Timeout


def init(d: str, files: dict, mem_mb: int, timeout: float) -> None:
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    _STATE["dir"] = d
    _STATE["timeout"] = timeout
    _STATE["files"] = [
        (
            path.read_bytes(),
            json.loads(wf._read_raw_header(path)["text"]),
            load_file(str(path)),
            factory,
        )
        for path, factory in files.values()
    ]
    for path, factory in files.values():  # warm up (imports, JIT) before the limits
        wclust.load(path, factory)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
    limit = (vm << 10) + (mem_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)


def run_case(i: int) -> tuple[int, str, str]:
    rng = random.Random(i)
    blob, header, tensors, factory = rng.choice(_STATE["files"])
    path = Path(_STATE["dir"]) / f"case-{os.getpid()}.wclust"
    kind = "?"
    try:
        kind, data = mutate(rng, blob, header, tensors)
        path.write_bytes(data)
        signal.setitimer(signal.ITIMER_REAL, _STATE["timeout"])
        outcome = "ok"
        for fn in (wclust.load, wf.read_header, wf.stored_bytes):
            try:
                fn(path, factory) if fn is wclust.load else fn(path)
            except wclust.FormatError:
                outcome = "FormatError"
    except BaseException as e:  # noqa: BLE001 - anything else is a finding
        outcome = f"FAIL {type(e).__name__}: {str(e)[:160]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return i, kind, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space per worker")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        files = make_valid(Path(d))
        ctx = mp.get_context("fork")
        by_kind: dict = collections.defaultdict(collections.Counter)
        fails = []
        done = 0
        with ctx.Pool(a.workers, init, (d, files, a.mem_mb, a.timeout)) as pool:
            cases = range(a.start, a.start + a.n)
            for i, kind, outcome in pool.imap_unordered(run_case, cases, chunksize=16):
                done += 1
                by_kind[kind][outcome.split(":")[0]] += 1
                if outcome.startswith("FAIL"):
                    fails.append((i, kind, outcome))
                if a.max_seconds and time.perf_counter() - t0 > a.max_seconds:
                    pool.terminate()
                    break
    wall = time.perf_counter() - t0
    print(f"cases run: {done} (seeds from {a.start}), workers {a.workers}, {wall:.0f} s wall")
    for kind in sorted(by_kind):
        print(f"  {kind:13s} " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind[kind].items())))
    print(f"failures: {len(fails)}")
    for k, v in collections.Counter(f[2].split(":")[0] for f in fails).most_common():
        print(f"  {k}: {v}")
    for i, kind, outcome in sorted(fails)[:20]:
        print(f"  seed {i} ({kind}): {outcome}")


if __name__ == "__main__":
    main()
