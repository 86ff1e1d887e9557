"""Every script in benchmarks/ runs as a user runs it: from inside benchmarks/, with
``--help``, and the ones with a cheap smallest setting really run it.

The scripts are found by glob, so a new script is covered without editing this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _env() -> dict:
    # wclust as if installed (pip install -e .), and no network
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


# Runs every script's ``--help`` in one process (torch imported once, not once per
# script), each as ``python SCRIPT --help`` would: run as __main__ with its folder first
# on sys.path. Prints {script: [exit code, output]} as JSON.
_HELP_DRIVER = """
import contextlib, io, json, runpy, sys
res = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    res[script] = [code, buf.getvalue()]
sys.__stdout__.write(json.dumps(res))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, *SCRIPTS],
        cwd=BENCH,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_scripts_are_found():
    assert len(SCRIPTS) >= 5 and "fuzz_files.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(helps, script):
    code, text = helps[script]
    assert code == 0, text[-3000:]
    assert "usage:" in text and script in text, text[-3000:]


# Why a script gets no real run here (documentation; --help still runs for every one).
HELP_ONLY = {
    "asr_latency.py": "needs a .wclust file of a Whisper model",
    "cluster_speed.py": "its smallest setting (--quick --only synthetic) takes ~1 min",
    "crossfit_whisper.py": "needs whisper-base and real speech with transcripts",
    "deep_compression.py": "needs the Fashion-MNIST files and minutes of training",
    "distill_whisper.py": "needs whisper-base, speech and espeak",
    "distill_file.py": "needs a .wclust file of whisper-base and trains for hours",
    "embedding_rows.py": "needs whisper-base and decodes speech",
    "gptq_file.py": "needs a .wclust file of whisper-base and decodes speech",
    "hf_wer.py": "needs whisper-base and decodes speech through two paths",
    "kernels.py": "compiles the numba kernels: ~1 min even at one small shape",
    "layer_sensitivity.py": "needs a pretrained model and its task's data",
    "proxy_loss.py": "needs whisper-base and real speech with transcripts",
    "score_file.py": "needs a .wclust file of whisper-base and decodes speech",
}

# benchmarks/kernels.py has the name of the `kernels` package that transformers imports:
# run from inside benchmarks/, the script is found first and every import of
# transformers fails. Renaming the script removes the clash.
_SHADOWED = (BENCH / "kernels.py").exists()


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from inside benchmarks/, which must succeed."""
    r = subprocess.run(
        [sys.executable, script, *args],
        cwd=BENCH,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.mark.parametrize(
    "script,args,expect",
    [
        ("fuzz_files.py", ["--n", "16", "--workers", "1"], "failures: 0"),
        pytest.param(
            "stream_memory.py",
            ["--gb", "0.01", "--hidden", "256", "--limit-gb", "2", "--dir", "{tmp}/ckpt"]
            + ["--", "--bits", "2"],
            '"rc": 0',
            marks=[
                pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit"),
                pytest.mark.xfail(
                    _SHADOWED,
                    reason="benchmarks/kernels.py shadows the `kernels` package of transformers",
                    strict=True,
                ),
            ],
        ),
    ],
)
def test_smallest_setting_runs(script, args, expect, tmp_path):
    assert script in SCRIPTS
    r = _run(script, [a.format(tmp=tmp_path) for a in args])
    assert expect in r.stdout, (r.stdout + r.stderr)[-3000:]
    if script == "stream_memory.py":
        assert json.loads(r.stdout[r.stdout.index("{") :])["output_bytes"] > 0


def test_asr_paired_reads_saved_clip_errors(tmp_path):
    """``asr_paired.py --load``: the table from saved per-clip errors, no decoding; a
    file with more errors on every clip gets an interval above 0 against fp32."""
    words = [10, 12, 8, 20, 15, 9, 11, 14]
    base = [1, 2, 0, 3, 1, 1, 2, 1]
    saved = {
        "fp32": {"wer": 100 * 11 / 99, "cer": 4.0, "item_errors": {"edits": base, "words": words}},
        "x.wclust": {
            "wer": 100 * 27 / 99,
            "cer": 9.0,
            "item_errors": {"edits": [e + 2 for e in base], "words": words},
        },
    }
    path = tmp_path / "clips.json"
    path.write_text(json.dumps(saved))
    r = _run("asr_paired.py", ["--load", str(path)])
    row = next(x for x in r.stdout.splitlines() if x.startswith("| x.wclust"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == "27.27%" and cells[4].startswith("+16.16 (+")
