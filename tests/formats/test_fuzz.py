"""Hostile and broken .wclust files: every reader ends in FormatError, never another
exception, a hang or a huge allocation.

Two kinds of damage: raw byte damage (truncation, bit flips, a changed header length,
random bytes), which the checksum or the safetensors parser must reject, and *hostile*
files whose JSON header or tensors were changed and whose SHA-256 was recomputed (the
checksum is not a signature: anyone can write a file that passes it), which the
header and tensor validation must reject before allocating anything large.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import wclust
import wclust.formats.wclust_file as wf
from tests.conftest import small_cnn, tiny_gpt2
from wclust.cli import app
from wclust.stages.prune import prune_

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TB = 1 << 40


def mlp_factory():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Valid files: a CNN (Conv2d, depthwise/grouped Conv2d, Conv1d, Embedding,
    Linear; with report) and an entropy-coded (Huffman, sparse) pruned MLP."""
    d = tmp_path_factory.mktemp("valid")
    m = small_cnn()
    rep = wclust.compress_(m, wclust.ClusterConfig(bits=3))
    cnn = wclust.save(m, d / "cnn.wclust", report=rep)
    torch.manual_seed(0)
    e = mlp_factory()
    prune_(e, 0.9, scope="layer")
    rep = wclust.compress_(e, wclust.ClusterConfig(bits=4, granularity="tensor", keep_zeros=True))
    ent = wclust.save(e, d / "ent.wclust", report=rep, entropy="huffman")
    return {"cnn": (cnn, small_cnn), "ent": (ent, mlp_factory)}


def expect_format_error(path, factory):
    """load, read_header and stored_bytes each either succeed or raise FormatError."""
    for fn in (lambda: wclust.load(path, factory), lambda: wf.read_header(path)):
        try:
            fn()
        except wclust.FormatError:
            pass
    try:
        wf.stored_bytes(path)
    except wclust.FormatError:
        pass


def must_fail(path, factory):
    with pytest.raises(wclust.FormatError):
        wclust.load(path, factory)


def parts(path):
    """(wclust header dict, tensors) of a valid file."""
    return json.loads(wf._read_raw_header(path)["text"]), load_file(str(path))


def write_hostile(path, header, tensors):
    """A file with the given header and tensors and a *correct* checksum."""
    text = json.dumps(header, sort_keys=True, default=str)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"wclust": text, "wclust_sha256": wf._digest(text, tensors)}
    wf._write_safetensors(str(path), tensors, meta)
    return path


def write_raw(path, st_header: dict, payload: bytes):
    """A safetensors-shaped file with any header at all (no validation)."""
    head = json.dumps(st_header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)
    return path


# --- raw byte damage -------------------------------------------------------------


@pytest.mark.parametrize("which", ["cnn", "ent"])
@SETTINGS
@given(data=st.data())
def test_truncated_files(valid, tmp_path, which, data):
    path, factory = valid[which]
    blob = path.read_bytes()
    n = data.draw(st.integers(0, len(blob) - 1))
    q = tmp_path / "t.wclust"
    q.write_bytes(blob[:n])
    must_fail(q, factory)
    expect_format_error(q, factory)


@pytest.mark.parametrize("which", ["cnn", "ent"])
@SETTINGS
@given(data=st.data())
def test_bit_flipped_files(valid, tmp_path, which, data):
    path, factory = valid[which]
    blob = bytearray(path.read_bytes())
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)), min_size=1, max_size=4
        )
    )
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    q = tmp_path / "f.wclust"
    q.write_bytes(bytes(blob))
    if bytes(blob) != path.read_bytes():
        # Flips in the JSON's insignificant spaces can leave it valid; nothing else can.
        head_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if any(pos >= 8 + head_len or pos < 8 for pos, _ in flips):
            must_fail(q, factory)
    expect_format_error(q, factory)


@SETTINGS
@given(n=st.one_of(st.integers(0, 1 << 64 - 1), st.integers(0, 4096)))
def test_changed_header_length(valid, tmp_path, n):
    path, factory = valid["cnn"]
    blob = path.read_bytes()
    if n == struct.unpack("<Q", blob[:8])[0]:
        return
    q = tmp_path / "h.wclust"
    q.write_bytes(struct.pack("<Q", n) + blob[8:])
    must_fail(q, factory)
    expect_format_error(q, factory)


@SETTINGS
@given(blob=st.binary(max_size=2048), n=st.integers(0, 2048))
def test_random_bytes(tmp_path, blob, n):
    for b in (blob, struct.pack("<Q", n) + blob, struct.pack("<Q", len(blob)) + blob):
        q = tmp_path / "r.wclust"
        q.write_bytes(b)
        must_fail(q, small_cnn)
        expect_format_error(q, small_cnn)


# --- hostile files (checksum recomputed) ------------------------------------------

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 9, 64, 10**12, 1 << 63, 10**400, TB, -(1 << 63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 1 << 62), max_size=4),
    st.just([TB]),
    st.just([TB, TB]),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
ENTRY_FIELDS = [
    "key",
    "owners",
    "owner_types",
    "shape",
    "bits",
    "dtype",
    "transpose",
    "meta",
    "entropy",
]


@pytest.mark.parametrize("which", ["cnn", "ent"])
@SETTINGS
@given(data=st.data())
def test_hostile_header_fields(valid, tmp_path, which, data):
    path, factory = valid[which]
    header, tensors = parts(path)
    where = data.draw(st.sampled_from(["entry", "entropy", "top"]))
    if where == "top":
        field = data.draw(st.sampled_from(["clustered", "aliases", "version", "arch", "report"]))
        header[field] = data.draw(NASTY)
    else:
        e = header["clustered"][data.draw(st.integers(0, len(header["clustered"]) - 1))]
        if where == "entropy" and "entropy" in e:
            e["entropy"][data.draw(st.sampled_from(sorted(e["entropy"]) + ["x"]))] = data.draw(
                NASTY
            )
        elif data.draw(st.booleans()):
            e[data.draw(st.sampled_from(ENTRY_FIELDS))] = data.draw(NASTY)
        else:
            del e[data.draw(st.sampled_from(sorted(e)))]
    q = write_hostile(tmp_path / "x.wclust", header, tensors)
    expect_format_error(q, factory)


@pytest.mark.parametrize("value", [[], {}, [[]], {"a": []}])
def test_unhashable_values_in_every_entry_field(valid, tmp_path, value):
    """Found by benchmarks/fuzz_files.py (seed 377): a list as dtype was a TypeError."""
    path, factory = valid["ent"]
    for field in ENTRY_FIELDS:
        header, tensors = parts(path)
        header["clustered"][0][field] = value
        q = write_hostile(tmp_path / "u.wclust", header, tensors)
        if not (field == "meta" and isinstance(value, dict)):  # any dict is a valid meta
            must_fail(q, factory)
        expect_format_error(q, factory)


DTYPES = [torch.float32, torch.float16, torch.int8, torch.uint8, torch.int64, torch.bool]


@pytest.mark.parametrize("which", ["cnn", "ent"])
@SETTINGS
@given(data=st.data())
def test_hostile_tensors(valid, tmp_path, which, data):
    path, factory = valid[which]
    header, tensors = parts(path)
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    how = data.draw(st.sampled_from(["dtype", "shape", "drop", "shrink", "extra"]))
    if how == "dtype":
        dt = data.draw(st.sampled_from([d for d in DTYPES if d != t.dtype]))
        tensors[name] = t.to(dt)
    elif how == "shape":
        tensors[name] = t.reshape(-1, 1) if t.dim() != 2 else t.reshape(-1)
    elif how == "drop":
        del tensors[name]
    elif how == "shrink":
        tensors[name] = t.reshape(-1)[: max(t.numel() - 1, 0)]
    else:
        tensors[data.draw(st.sampled_from(["p:nothing", "clustered.99.codes", "b:fc.x"]))] = t
    q = write_hostile(tmp_path / "x.wclust", header, tensors)
    if not (how == "dtype" and t.dtype.is_floating_point and tensors[name].dtype.is_floating_point):
        must_fail(q, factory)  # another float width is a valid file
    expect_format_error(q, factory)


def test_wrong_dtype_codes_and_codebook_are_rejected(valid, tmp_path):
    path, factory = valid["cnn"]
    for name, dt in [("clustered.0.codes", torch.int8), ("clustered.0.codebook", torch.int64)]:
        header, tensors = parts(path)
        tensors[name] = tensors[name].to(dt)
        with pytest.raises(wclust.FormatError, match="dtype"):
            wclust.load(write_hostile(tmp_path / "d.wclust", header, tensors), factory)


def test_dense_parameter_with_integer_dtype_is_rejected(valid, tmp_path):
    path, factory = valid["cnn"]
    header, tensors = parts(path)
    tensors["p:norm.weight"] = tensors["p:norm.weight"].to(torch.int64)
    with pytest.raises(wclust.FormatError, match="dtype"):
        wclust.load(write_hostile(tmp_path / "d.wclust", header, tensors), factory)


@pytest.mark.parametrize("which", ["cnn", "ent"])
def test_header_declaring_a_terabyte_weight(valid, tmp_path, which):
    """Shape and bits claiming 1 TB of weights: rejected from the header alone."""
    path, factory = valid[which]
    for shape in ([TB], [1 << 20, 1 << 20], [TB, TB, TB]):
        header, tensors = parts(path)
        header["clustered"][0]["shape"] = shape
        with pytest.raises(wclust.FormatError):
            wclust.load(write_hostile(tmp_path / "big.wclust", header, tensors), factory)


def test_huge_declared_tensors_and_offsets(tmp_path):
    meta = {"wclust": json.dumps({"format": "wclust", "version": 1, "clustered": []})}
    cases = {
        "tb-shape": {"x": {"dtype": "F32", "shape": [TB // 4], "data_offsets": [0, TB]}},
        "tb-offsets": {"x": {"dtype": "U8", "shape": [8], "data_offsets": [TB, TB + 8]}},
        "u64-offsets": {"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, (1 << 64) - 1]}},
        "overflow-shape": {
            "x": {"dtype": "F64", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 8]}
        },
        "negative": {"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 8]}},
        "bad-dtype": {"x": {"dtype": "PICKLE", "shape": [8], "data_offsets": [0, 8]}},
        "overlap": {
            "x": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "y": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        },
    }
    for name, entries in cases.items():
        q = write_raw(tmp_path / f"{name}.wclust", {"__metadata__": meta, **entries}, b"\0" * 8)
        must_fail(q, small_cnn)
        expect_format_error(q, small_cnn)


def test_deeply_nested_json_header(tmp_path):
    """A header nesting JSON 100k deep: RecursionError must not escape."""
    for inner in ("[" * 100_000 + "]" * 100_000, '"' + "[" * 100_000 + '"'):
        head = '{"__metadata__":{"wclust":' + json.dumps(inner) + "}}"
        q = tmp_path / "deep.wclust"
        q.write_bytes(struct.pack("<Q", len(head)) + head.encode())
        must_fail(q, small_cnn)
        expect_format_error(q, small_cnn)
    raw = "[" * 100_000 + "]" * 100_000
    q.write_bytes(struct.pack("<Q", len(raw)) + raw.encode())
    must_fail(q, small_cnn)


def test_inspect_on_hostile_files_gives_exit_2(valid, tmp_path):
    """The CLI's inspect path (read_header + stored_bytes) on damaged files."""
    path, _ = valid["cnn"]
    header, tensors = parts(path)
    files = {"trunc": path.read_bytes()[:1000], "junk": b"\xff" * 300}
    for k, v in files.items():
        (tmp_path / f"{k}.wclust").write_bytes(v)
    for field, value in [
        ("owners", None),
        ("key", 5),
        ("clustered", "x"),
        ("report", [1]),
        ("report", {"totals": 5}),
        ("report", {"totals": {}, "layers": 3}),
    ]:
        h = json.loads(json.dumps(header))
        if field in ("owners", "key"):
            h["clustered"][0][field] = value
        else:
            h[field] = value
        write_hostile(tmp_path / f"{field}{len(str(value))}.wclust", h, tensors)
    runner = CliRunner()
    for q in sorted(tmp_path.glob("*.wclust")):
        r = runner.invoke(app, ["inspect", str(q)])
        assert r.exit_code == 2, (q.name, r.exit_code, r.output, r.exception)
        assert isinstance(r.exception, SystemExit), (q.name, r.exception)


@pytest.mark.parametrize(
    "where,field,value",
    [
        ("config", "vocab_size", True),  # transformers' strict dataclass errors
        ("config", "pad_token_id", 1.5),
        ("config", "use_cache", []),
        ("config", "model_type", "no-such-model"),
        ("config", "model_type", None),
        ("arch", "config", "x"),
        ("arch", "class", "PreTrainedModel"),
        ("arch", "class", "AutoModel"),
        ("arch", "generation_config", "x"),
        # benchmarks/fuzz_files.py seeds 25981, 28814: building 10**12 layers hung
        ("config", "n_layer", 10**12),
        ("config", "n_layer", 1 << 40),
    ],
)
def test_hostile_transformers_config(tmp_path, where, field, value):
    """Found by a probe of the no-factory path: invalid config values escaped load
    as huggingface_hub's StrictDataclassFieldValidationError."""
    m = tiny_gpt2()
    wclust.compress_(m)
    header, tensors = parts(wclust.save(m, tmp_path / "g.wclust"))
    target = header["arch"]["config"] if where == "config" else header["arch"]
    target[field] = value
    with pytest.raises(wclust.FormatError):
        wclust.load(write_hostile(tmp_path / "h.wclust", header, tensors))
