import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import tiny_whisper

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def wclust(*args, timeout=300, process=False):
    """Runs the CLI: in this process (the command functions, as ``wclust`` runs them,
    without paying the imports again each time), or with ``process=True`` as its own
    ``python -m wclust.cli`` process, the real entry point.

    Returns:
        An object with ``returncode``, ``stdout`` and ``stderr``.
    """
    if process:
        return subprocess.run(
            [sys.executable, "-m", "wclust.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ENV,
        )
    from typer.testing import CliRunner

    from wclust.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # what the process would print: the traceback, on stderr
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        return SimpleNamespace(returncode=1, stdout=r.stdout, stderr=r.stderr + tb)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinywhisper")
    tiny_whisper().save_pretrained(d)
    return d


def test_compress_then_inspect_json(model_dir, tmp_path):
    out = tmp_path / "m.wclust"
    # as its own process: the installed entry point, end to end
    r = wclust(
        "compress", model_dir, "-o", out, "--bits", "3", "--exclude", "*conv1*", process=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file()
    r = wclust("inspect", out, "--json", "--gzip", process=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert 3 < d["bits_per_weight"] < 32
    assert d["gzip_bytes"] < d["file_bytes"]
    by = {x["name"]: x for x in d["layers"]}
    assert by["model.encoder.conv1"]["status"] == "dense"
    assert (
        by["model.encoder.embed_positions"]["status"] == "clustered"
    )  # --exclude replaced defaults
    assert by["model.decoder.layers.0.fc1"]["bits"] == 3
    r = wclust("inspect", out)
    assert r.returncode == 0 and "bits per weight" in r.stdout


def test_compress_with_entropy_coding_loads_back(model_dir, tmp_path):
    out = tmp_path / "e.wclust"
    r = wclust("compress", model_dir, "-o", out, "--bits", "3", "--entropy", "ans")
    assert r.returncode == 0, r.stderr[-2000:]
    import wclust as wc

    hdr = wc.read_header(out)
    assert hdr["version"] == 2 and all(e["entropy"]["coder"] == "ans" for e in hdr["clustered"])
    m = wc.load(out)
    assert m.model.decoder.layers[0].fc1.clustered.bits == 3


def test_inspect_reports_stored_bits_of_entropy_coded_files(model_dir, tmp_path):
    import wclust as wc

    plain, coded = tmp_path / "p.wclust", tmp_path / "h.wclust"
    for out, extra in ((plain, []), (coded, ["--entropy", "huffman"])):
        r = wclust("compress", model_dir, "-o", out, "--bits", "2", "--calibrate", "none", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(wclust("inspect", plain, "--json").stdout)
    h = json.loads(wclust("inspect", coded, "--json").stdout)
    # A plain file stores its codes at fixed width: both figures agree.
    assert p["entropy_coders"] == []
    assert p["bits_per_weight"] == p["stored_bits_per_weight"] == p["fixed_width_bits_per_weight"]
    # The entropy-coded file: same fixed-width figure, and the stored one is what its
    # tensors really occupy (the report's other tensors plus the real layer bytes).
    assert h["entropy_coders"] == ["huffman"]
    assert h["fixed_width_bits_per_weight"] == p["fixed_width_bits_per_weight"]
    # (random tiny weights: coded codes plus their tables need not be smaller)
    assert h["bits_per_weight"] == h["stored_bits_per_weight"] != h["fixed_width_bits_per_weight"]
    real = wc.formats.stored_bytes(coded)
    hdr = wc.read_header(coded)
    other = sum(x["stored_bytes"] for x in h["layers"] if x["name"] not in real["clustered"]) + int(
        hdr["report"]["other_bytes"]
    )
    assert h["stored_bytes"] == sum(real["clustered"].values()) + other
    assert h["stored_bits_per_weight"] == 8 * h["stored_bytes"] / h["totals"]["numel"]
    fc1 = next(x for x in h["layers"] if x["name"] == "model.decoder.layers.0.fc1")
    assert fc1["stored_bytes"] == real["clustered"]["model.decoder.layers.0.fc1"]
    r = wclust("inspect", coded)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "codes at fixed width" in text
    assert f"{h['stored_bits_per_weight']:.3f} bits per weight" in text and "huffman" in text


@pytest.mark.parametrize(
    "args,match",
    [
        (["compress", "/no/such/model", "-o", "x.wclust"], "cannot load model"),
        (["compress", "{tmp}", "-o", "x.wclust"], "config.json"),
        (["compress", "{model}", "-o", "x.wclust", "--bits", "12"], "bits"),
        (["compress", "{model}", "-o", "x.wclust", "--granularity", "group"], "group_size"),
        (["compress", "{model}", "-o", "x.wclust", "--entropy", "zip"], "--entropy"),
        (["compress", "{tmp}", "-o", "x.wclust", "--stream"], "local safetensors checkpoint"),
        (
            ["compress", "{model}", "-o", "x.wclust", "--stream", "--target-bits", "4"],
            "whole model in memory",
        ),
        (["inspect", "/no/such/file.wclust"], "no such file"),
        (["inspect", "{junk}"], "header length"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, match, model_dir, tmp_path):
    junk = tmp_path / "junk.wclust"
    junk.write_bytes(b"not a model at all" * 10)
    args = [a.format(tmp=tmp_path, model=model_dir, junk=junk) for a in args]
    r = wclust(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert match in r.stderr.replace("\n", " ")


def test_compress_with_target_bits_meets_the_budget(model_dir, tmp_path):
    out = tmp_path / "mixed.wclust"
    r = wclust(
        "compress",
        model_dir,
        "-o",
        out,
        "--target-bits",
        "10",
        "--calibrate",
        "none",
        "--method",
        "exact",
        "--codebook-dtype",
        "float16",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)
    assert d["bits_per_weight"] <= 10
    assert len({x["bits"] for x in d["layers"] if x["bits"]}) >= 1
    r = wclust("compress", model_dir, "-o", out, "--target-bits", "6", "--calibrate", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)
    assert d["bits_per_weight"] <= 6  # the default recipe with a budget: scaled-fit
    clustered = [x for x in d["layers"] if x["status"] == "clustered"]
    assert {x["method"] for x in clustered} == {"scaled-fit"}
    assert {x["group_size"] for x in clustered} <= {64, 128}  # chosen per layer
    r = wclust("compress", model_dir, "-o", out, "--target-bits", "10")  # Fisher needs a task
    assert r.returncode == 2 and "cannot be calibrated" in r.stderr.replace("\n", " ")


def test_compress_with_row_split_chooses_bits_per_row_range(model_dir, tmp_path):
    out = tmp_path / "rows.wclust"
    emb = "model.decoder.embed_tokens"
    args = ["--target-bits", "5", "--calibrate", "none", "--row-split", f"{emb}=100,200"]
    r = wclust("compress", model_dir, "-o", out, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)
    assert d["bits_per_weight"] <= 5
    (layer,) = [x for x in d["layers"] if x["name"] == emb]
    assert [x["rows"] for x in layer["row_split"]] == [[0, 100], [100, 200], [200, 300]]
    assert layer["bits"] == max(x["bits"] for x in layer["row_split"])
    import wclust as wc

    m = wc.load(out)
    assert m.model.decoder.embed_tokens.clustered.bounds == [0, 100, 200, 300]
    r = wclust("inspect", out)
    shown = "/".join(str(x["bits"]) for x in layer["row_split"])
    assert r.returncode == 0 and shown in r.stdout
    # the streaming path (one tensor at a time) splits the same way
    r = wclust("compress", model_dir, "-o", out, "--stream", "--row-split", f"{emb}=100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert wc.load(out).model.decoder.embed_tokens.clustered.bounds == [0, 100, 300]
    for bad in (f"{emb}", f"{emb}=a,b", "=100"):
        r = wclust("compress", model_dir, "-o", out, "--row-split", bad)
        assert r.returncode == 2 and "GLOB=ROW,ROW" in r.stderr.replace("\n", " ")
    r = wclust("compress", model_dir, "-o", out, "--row-split", f"{emb}=200,100")
    assert r.returncode == 2 and "above 200" in r.stderr.replace("\n", " ")


def test_target_bits_splits_a_large_token_embedding_by_default(tmp_path):
    # token ids follow BPE merge order: the first 4,000 rows choose their bits apart
    d = tmp_path / "vocab5k"
    tiny_whisper(vocab_size=5000).save_pretrained(d)
    out = tmp_path / "m.wclust"
    emb = "model.decoder.embed_tokens"
    for extra, ranges in (([], [[0, 4000], [4000, 5000]]), (["--row-split", "none"], None)):
        r = wclust("compress", d, "-o", out, "--target-bits", "5", "--calibrate", "none", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        layers = json.loads(wclust("inspect", out, "--json").stdout)["layers"]
        (layer,) = [x for x in layers if x["name"] == emb]
        got = [x["rows"] for x in layer["row_split"]] if layer["row_split"] else None
        assert got == ranges


def test_compress_layers_preset(model_dir, tmp_path):
    out = tmp_path / "attn.wclust"
    r = wclust("compress", model_dir, "-o", out, "--bits", "3", "--layers", "attention")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)
    clustered = {x["name"] for x in d["layers"] if x["status"] == "clustered"}
    assert clustered and all("attn" in n for n in clustered)
    assert any("fc1" in x["name"] for x in d["layers"] if x["status"] == "dense")
    r = wclust("compress", model_dir, "-o", out, "--layers", "conv")
    assert r.returncode == 2 and "layer preset 'conv' is unknown" in r.stderr


def test_compress_stream_writes_the_same_tensors(model_dir, tmp_path):
    from safetensors.torch import load_file

    outs, said = {}, {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / f"{flag.strip('-')}.wclust"
        r = wclust("compress", model_dir, "-o", outs[flag], "--bits", "3", flag)
        assert r.returncode == 0, r.stderr[-2000:]
        said[flag] = "one tensor at a time" in " ".join(r.stderr.split())
    assert said == {"--stream": True, "--no-stream": False}
    a, b = (load_file(str(outs[f])) for f in ("--stream", "--no-stream"))
    assert sorted(a) == sorted(b)
    assert all((a[k] == b[k]).all() for k in a)


def test_compress_distils_on_the_given_data(asr_model_dir, two_clips, tmp_path):
    out = tmp_path / "d.wclust"
    args = ["compress", asr_model_dir, "-o", out, "--bits", "3", "--method", "scaled-fit"]
    args += ["--group-size", "64", "--distill-epochs", "1"]
    r = wclust(*args, "--distill-data", two_clips)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distillation epoch 1: mean KL" in r.stderr + r.stdout
    h = json.loads(wclust("inspect", out, "--json").stdout)
    assert h["extra"]["distill"]["items"] == 2 and len(h["extra"]["distill"]["kl"]) == 1
    assert {x["method"] for x in h["layers"] if x["status"] == "clustered"} == {
        "scaled-fit+distill"
    }
    r = wclust(*args, "--distill-data", two_clips, "--distill-holdout", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)["extra"]["distill"]
    assert (d["items"], d["held_out"], len(d["val_kl"])) == (1, 1, 2)
    assert d["kept_epoch"] in (0, 1) and d["val_kl"][d["kept_epoch"]] == min(d["val_kl"])
    bad = wclust(*args, "--distill-data", tmp_path / "nope")
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr.replace("\n", " ")
    bad = wclust(*args, "--distill-data", two_clips, "--stream")
    assert bad.returncode == 2 and "drop --stream" in bad.stderr.replace("\n", " ")
    bad = wclust(*args, "--distill-data", two_clips, "--distill-lr", "0")
    assert bad.returncode == 2 and "--distill-lr" in bad.stderr.replace("\n", " ")


def test_compress_distils_on_speed_perturbed_copies_too(asr_model_dir, two_clips, tmp_path):
    out = tmp_path / "s.wclust"
    args = ["compress", asr_model_dir, "-o", out, "--bits", "3", "--method", "scaled-fit"]
    args += ["--group-size", "64", "--distill-epochs", "1", "--distill-data", two_clips]
    r = wclust(
        *args, "--distill-speeds", "0.9,1.1", "--distill-holdout", "0.5", "--distill-hidden", "0.5"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(wclust("inspect", out, "--json").stdout)["extra"]["distill"]
    # one clip held out, the other trained on at three speeds
    assert (d["items"], d["held_out"], d["speeds"], d["hidden"]) == (3, 1, [0.9, 1.1], 0.5)
    assert len(d["hidden_error"]) == 1 and d["hidden_error"][0] > 0
    assert "incl. speeds [0.9, 1.1]" in wclust("inspect", out).stdout.replace("\n", " ")
    for speeds, said in (("fast", "comma-separated numbers"), ("1,1.1", "other than 1")):
        bad = wclust(*args, "--distill-speeds", speeds)
        assert bad.returncode == 2 and said in bad.stderr.replace("\n", " ")
    bad = wclust(*args, "--distill-hidden", "-1")
    assert bad.returncode == 2 and "--distill-hidden must be >= 0" in bad.stderr.replace("\n", " ")
    bad = wclust(*args[:-2], "--distill-speeds", "0.9")
    assert bad.returncode == 2 and "needs --distill-data" in bad.stderr.replace("\n", " ")


def test_compress_distils_on_clips_without_transcripts(asr_model_dir, two_clips, tmp_path):
    (two_clips / "transcripts.tsv").unlink()  # the original model transcribes them
    out = tmp_path / "u.wclust"
    r = wclust(
        *("compress", asr_model_dir, "-o", out, "--bits", "3", "--method", "scaled-fit"),
        *("--group-size", "64", "--distill-epochs", "1", "--distill-data", two_clips),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(wclust("inspect", out, "--json").stdout)["extra"]["distill"]["items"] == 2


# A path longer than any terminal: 6 folders of 50 characters, and one name of 300
# characters (longer than file systems allow: the OS refuses to look it up).
LONG_PATH = "/tmp/" + "/".join(["d" * 50] * 6) + "/nope"
LONG_NAME = "/tmp/" + "n" * 300


ONE_LINE_CASES = [
    (["compress", "m", "-o", "x.wclust", "--distill-data", LONG_PATH], "no such file"),
    (["compress", "m", "-o", "x.wclust", "--distill-data", LONG_NAME], "no such file"),
    (["compress", "m", "-o", "x.wclust", "--calib-data", LONG_PATH], "no such file"),
    (["inspect", LONG_PATH + ".wclust"], "no such file"),
    (["inspect", LONG_NAME + ".wclust"], "no such file"),
    (["compress", LONG_NAME, "-o", "x.wclust"], "too long"),
    (["compress", "m", "-o", "x.wclust", "--layers", LONG_NAME], "layer preset"),
    (["compress", "m", "-o", "x.wclust", "--" + "x" * 300], "No such option"),
]

# Runs the entry point once per case in one process (one import, not eight), stderr a
# pipe-like stream as in CI; prints [exit code, stderr] per case as JSON.
_DRIVER = """
import contextlib, io, json, sys
from wclust.cli import main
res = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["wclust", *args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    res.append([code, err.getvalue()])
print(json.dumps(res))
"""


def test_errors_are_one_line_whatever_the_path_length():
    # COLUMNS=80: what rich assumes when stderr is not a terminal (CI, a pipe)
    r = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps([a for a, _ in ONE_LINE_CASES])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "COLUMNS": "80"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for (args, match), (code, stderr) in zip(ONE_LINE_CASES, json.loads(r.stdout), strict=True):
        assert code == 2, (args, stderr[-2000:])
        assert "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr
        (line,) = errors
        assert match in line
        given = next(a for a in args if len(a) > 300)
        assert given.removesuffix(".wclust").lstrip("-") in line  # the whole path, unbroken
        # nothing of the message spills onto further lines
        assert stderr.rstrip("\n").endswith(line), stderr


def test_compress_gptq_items_needs_a_gptq_grid(model_dir, tmp_path):
    out = tmp_path / "k.wclust"
    r = wclust("compress", model_dir, "-o", out, "--bits", "3", "--gptq-items", "3")
    assert r.returncode == 2 and "gptq re-chooses codes" in r.stderr.replace("\n", " ")
    assert not out.exists()
