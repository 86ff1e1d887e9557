import os
import pickletools
import subprocess
import sys

import pytest
import torch

import wclust
from tests.conftest import small_cnn, tiny_gpt2, tiny_whisper


def test_round_trip_whisper_bit_identical_in_fresh_process(tmp_path, whisper_inputs):
    m = tiny_whisper()
    cfg = wclust.ClusterConfig(bits=4)
    rep = wclust.compress_(m, cfg)
    path = wclust.save(m, tmp_path / "m.wclust", report=rep, config=cfg)
    with torch.no_grad():
        ref = m(**whisper_inputs).logits
    torch.save({"ref": ref, **whisper_inputs}, tmp_path / "io.pt")
    code = f"""
import torch, wclust
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
m = wclust.load({str(path)!r})
assert m.proj_out.clustered is m.model.decoder.embed_tokens.clustered
with torch.no_grad():
    out = m(input_features=io['input_features'], decoder_input_ids=io['decoder_input_ids']).logits
assert torch.equal(out, io['ref']), (out - io['ref']).abs().max()
print('OK')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().endswith("OK"), r.stderr[-2000:]
    hdr = wclust.read_header(path)
    assert hdr["config"]["bits"] == 4 and hdr["report"]["totals"]["layers_clustered"] == len(
        rep.clustered
    )


def test_plain_torch_model_needs_factory(tmp_path):
    m = small_cnn()
    wclust.compress_(m, wclust.ClusterConfig(bits=3))
    p = wclust.save(m, tmp_path / "cnn.wclust")
    with pytest.raises(wclust.FormatError, match="model_factory"):
        wclust.load(p)
    m2 = wclust.load(p, small_cnn)
    x, tok = torch.randn(2, 3, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        assert torch.equal(m(x, tok), m2(x, tok))
    assert torch.equal(m.norm.running_var, m2.norm.running_var)


def test_gpt2_tied_round_trip(tmp_path):
    m = tiny_gpt2()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, granularity="group", group_size=16))
    m2 = wclust.load(wclust.save(m, tmp_path / "g.wclust"))
    assert m2.lm_head.clustered is m2.transformer.wte.clustered
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


def test_no_pickle_opcodes_in_file(tmp_path):
    m = tiny_gpt2()
    wclust.compress_(m)
    data = (wclust.save(m, tmp_path / "g.wclust")).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    assert header.lstrip().startswith(b"{")  # JSON, not a pickle stream
    assert b"\x80\x04\x95" not in data[: 8 + n]  # pickle protocol-4 frame marker
    with pytest.raises(Exception):  # noqa: B017 - any failure proves it is not a pickle
        list(pickletools.genops(data))


def test_same_input_gives_byte_identical_file(tmp_path):
    paths = []
    for i in range(2):
        m = tiny_gpt2(seed=3)
        wclust.compress_(m, wclust.ClusterConfig(bits=3, method="kmeans", init="random", seed=7))
        paths.append(wclust.save(m, tmp_path / f"{i}.wclust"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_corrupt_truncated_and_flipped_files_are_rejected(tmp_path):
    m = tiny_gpt2()
    wclust.compress_(m)
    p = wclust.save(m, tmp_path / "g.wclust")
    data = p.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "flipped": data[:-100] + bytes([data[-100] ^ 0x01]) + data[-99:],
        "garbage": b"\x00" * 64,
        "json-only": b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
    }
    for name, blob in cases.items():
        q = tmp_path / f"{name}.wclust"
        q.write_bytes(blob)
        with pytest.raises(wclust.FormatError):
            wclust.load(q)


def test_newer_version_is_rejected_with_upgrade_hint(tmp_path):
    import json

    from safetensors.torch import save_file

    p = tmp_path / "new.wclust"
    save_file(
        {"x": torch.zeros(1)},
        p,
        metadata={"wclust": json.dumps({"format": "wclust", "version": 99})},
    )
    with pytest.raises(wclust.FormatError, match="upgrade wclust"):
        wclust.load(p)


def test_atomic_save_keeps_existing_file_on_failure(tmp_path, monkeypatch):
    m = tiny_gpt2()
    wclust.compress_(m)
    p = wclust.save(m, tmp_path / "g.wclust")
    before = p.read_bytes()
    import wclust.formats.wclust_file as wf

    real = wf.FileWriter._write_file

    def boom(self, target, *a, **k):  # write half a file, then fail
        real(self, target, *a, **k)
        with open(target, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(wf.FileWriter, "_write_file", boom)
    with pytest.raises(OSError):
        wclust.save(m, p)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["g.wclust"]


def test_wrong_architecture_is_a_format_error(tmp_path):
    m = small_cnn()
    wclust.compress_(m)
    p = wclust.save(m, tmp_path / "cnn.wclust")
    with pytest.raises(wclust.FormatError):
        wclust.load(p, lambda: torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_saved_file_gets_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = wclust.save(small_cnn(), tmp_path / "c.wclust")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def _mapped_kb(path) -> int:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, cur = 0, None
    target = str(os.path.realpath(path))
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                cur = head[5] if len(head) > 5 else None
            elif head and head[0] == "Rss:" and cur == target:
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_loading_gives_back_the_file_pages_the_model_no_longer_reads(tmp_path):
    """Codes converted to the kernels' layout (3-bit here) leave their stored bytes
    unread: those pages of the mapped file stop counting as resident; 4-bit codes are
    read in place and stay."""
    from wclust.kernels import ops

    if not ops.available():
        pytest.skip("without the compiled kernels nothing is converted")
    torch.manual_seed(0)
    m3 = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    m4 = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    wclust.compress_(m3, wclust.ClusterConfig(bits=3, granularity="tensor"))
    wclust.compress_(m4, wclust.ClusterConfig(bits=4, granularity="tensor"))
    m = torch.nn.Sequential(m3[0], m4[0])
    p = wclust.save(m, tmp_path / "m.wclust")
    loaded = wclust.load(
        p, lambda: torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    )
    kb3 = 1024 * 1024 * 3 // 8 // 1024  # 384 KB of 3-bit codes, converted at load
    kb4 = 1024 * 1024 // 2 // 1024  # 512 KB of 4-bit codes, read where they lie
    resident = _mapped_kb(p)
    assert kb4 - 8 <= resident < kb4 + kb3 // 2, resident
    x = torch.randn(3, 1024)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=1e-5)
