"""A process killed (SIGKILL) while saving over an existing .wclust file leaves that
file intact: save writes ``.<name>.<random>.tmp`` in the same folder, fsyncs it, and
renames it over the final name only once complete."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import wclust

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time, torch
from torch import nn
import wclust.formats.wclust_file as wf
torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[2]))
m = nn.ParameterList([nn.Parameter(torch.randn(1 << 16)) for _ in range(200)])  # 52 MB
real_chunks, real_write = wf.FileWriter._chunks, wf.FileWriter._write_file
def slow_chunks(self, name):  # ~1 s of writing: room to be killed in the middle
    time.sleep(0.005)
    yield from real_chunks(self, name)
def write(self, *a, **k):
    wf.FileWriter._chunks = slow_chunks
    print("W", flush=True)
    return real_write(self, *a, **k)
wf.FileWriter._write_file = write
print("R", flush=True)
wf.save(m, sys.argv[1])
print("D", flush=True)
"""


def net(seed: int) -> nn.ParameterList:
    torch.manual_seed(seed)
    return nn.ParameterList([nn.Parameter(torch.randn(1 << 16)) for _ in range(200)])


def test_sigkill_during_save_keeps_the_existing_file(tmp_path):
    p = tmp_path / "m.wclust"
    wclust.save(net(0), p)
    before = p.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    killed_mid_write = 0
    # One kill before writing starts, then kills at random points of the write.
    for marker, delay in [("R", 0.0)] + [("W", rng.uniform(0.05, 0.7)) for _ in range(3)]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(p), "1"], stdout=subprocess.PIPE, env=env
        )
        try:
            while (line := proc.stdout.readline().decode().strip()) != marker:
                assert line, f"child ended before {marker!r}"
            time.sleep(delay)
            assert proc.poll() is None, "the child finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        assert p.read_bytes() == before, f"killed at {marker}+{delay:.2f}s: file changed"
        strays = [x for x in tmp_path.iterdir() if x != p]
        # Leftovers are only the hidden temp file, next to the target.
        assert all(re.fullmatch(r"\.m\.wclust\.\w+\.tmp", x.name) for x in strays), strays
        killed_mid_write += bool(strays) and any(x.stat().st_size > 0 for x in strays)
        for x in strays:
            x.unlink()
    assert killed_mid_write >= 2  # the kills really hit a partly written file
    m = wclust.load(p, net(5))
    ref = net(0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters(), strict=True))
