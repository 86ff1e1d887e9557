"""Row-split weights: a weight clustered in row ranges, each with its own width."""

import pytest
import torch
from torch import nn

import wclust
from wclust.config import ConfigError
from wclust.formats.wclust_file import FormatError
from wclust.nn import RowSplitWeight
from wclust.stages.allocate import allocate_bits

SPLIT = [{"until": 30, "bits": 4}, {"until": 60, "bits": 5}]


def tied(seed=0, rows=100, dim=128):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(rows, dim), nn.Linear(dim, rows, bias=False))
    m[1].weight = m[0].weight
    return m


def split_config(**kw):
    return wclust.ClusterConfig(
        bits=3, method="scaled-fit", group_size=64, overrides={"0": {"row_split": SPLIT}}, **kw
    )


def test_each_row_range_gets_its_own_width_and_codebook():
    m = tied()
    ref = m[0].weight.detach().clone()
    rep = wclust.compress_(m, split_config())
    cw = m[0].clustered
    assert isinstance(cw, RowSplitWeight) and m[1].clustered is cw  # still tied
    assert [p.bits for p in cw.parts] == [4, 5, 3] and cw.bounds == [0, 30, 60, 100]
    (entry,) = rep.clustered
    assert entry.bits == 5 and entry.n_codebooks == 3 and entry.shared_with == ["1"]
    assert [(r["rows"], r["bits"]) for r in entry.row_split] == [
        ([0, 30], 4),
        ([30, 60], 5),
        ([60, 100], 3),
    ]
    # the bytes are the parts' bytes: fewer than 4-bit codes everywhere would cost
    codes_bits = (30 * 4 + 30 * 5 + 40 * 3) * 128
    assert entry.bytes_after == cw.nbytes == sum(p.nbytes for p in cw.parts)
    assert codes_bits / 8 < cw.nbytes < 4 * 100 * 128 / 8 + 2000
    # every range is its own clustering of its own rows: more bits, smaller error
    w = cw.dense().detach()
    rel = [
        float(((w[a:b] - ref[a:b]) ** 2).mean() / (ref[a:b] ** 2).mean())
        for a, b in ((0, 30), (30, 60), (60, 100))
    ]
    assert rel[1] < rel[0] < rel[2]
    alone = wclust.ClusterConfig(bits=5, method="scaled-fit", group_size=64)
    only = nn.Sequential(nn.Embedding(30, 128))
    only[0].weight.data.copy_(ref[30:60])
    wclust.compress_(only, alone)
    assert torch.equal(only[0].clustered.dense(), w[30:60])


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
def test_lookups_and_kernels_agree_with_the_dense_weight(kernels, monkeypatch):
    from wclust.kernels import ops

    if kernels == "torch":
        monkeypatch.setattr(ops, "_AVAILABLE", False)
    m = tied()
    wclust.compress_(m, split_config())
    cw = m[0].clustered
    dense = cw.dense().detach()
    ids = torch.tensor([[99, 0, 31], [59, 60, 29]])
    with torch.no_grad():
        assert torch.equal(m[0](ids), dense[ids])  # rows decoded part by part
        assert m[0](torch.zeros(0, dtype=torch.long)).shape == (0, 128)
        assert cw.kernel_ok()
        for x in (torch.randn(128), torch.randn(1, 3, 128), torch.randn(20, 128)):
            torch.testing.assert_close(m[1](x), x @ dense.t(), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_strip(tmp_path):
    m = tied()
    rep = wclust.compress_(m, split_config())
    dense = m[0].clustered.dense().detach()
    for entropy in (None, "huffman"):
        path = tmp_path / f"a{entropy}.wclust"
        wclust.save(m, path, report=rep, entropy=entropy)
        header = wclust.read_header(path)
        assert header["version"] == 3
        (e,) = header["clustered"]
        assert [p["rows"] for p in e["parts"]] == [[0, 30], [30, 60], [60, 100]]
        back = wclust.load(path, model_factory=lambda: tied(seed=1))
        assert (
            isinstance(back[0].clustered, RowSplitWeight) and back[1].clustered is back[0].clustered
        )
        assert torch.equal(back[0].clustered.dense(), dense)
        if entropy is None:  # every part's codes are counted for the weight
            sizes = wclust.formats.stored_bytes(path)["clustered"]
            assert sizes["0"] >= sum(p.packed_rows().numel() for p in m[0].clustered.parts)
    plain = wclust.strip(m)
    assert torch.equal(plain[0].weight.detach(), dense) and plain[1].weight is plain[0].weight


def test_a_file_whose_parts_do_not_cover_the_rows_is_refused(tmp_path):
    import json

    from wclust.formats import wclust_file as wf

    m = tied()
    wclust.compress_(m, split_config())
    path = tmp_path / "a.wclust"
    wclust.save(m, path)
    raw = wf._read_raw_header(path)
    header = raw["header"]
    header["clustered"][0]["parts"][1]["rows"] = [30, 61]
    with pytest.raises(FormatError, match="do not continue the split"):
        wf._check_header(path, json.loads(json.dumps(header)))
    header["clustered"][0]["parts"][1]["rows"] = [30, 60]
    header["clustered"][0]["parts"] = header["clustered"][0]["parts"][:2]
    with pytest.raises(FormatError, match="parts cover 60 rows of 100"):
        wf._check_header(path, header)


def test_bad_row_splits_are_clear_errors():
    for split, match in (
        ([{"until": 30}, {"until": 30}], "above 30"),
        ([{"until": "30"}], "integer row"),
        ([{"until": 10, "colour": 1}], "unknown field"),
        ([], "non-empty list"),
        ([{"until": 10, "bits": 99}], "row_split"),
    ):
        with pytest.raises(ConfigError, match=match):
            wclust.ClusterConfig(overrides={"0": {"row_split": split}})
    # beyond the weight's rows: reported, left dense, and said why
    m = tied()
    cfg = wclust.ClusterConfig(overrides={"0": {"row_split": [{"until": 500}]}})
    rep = wclust.compress_(m, cfg)
    (entry,) = [r for r in rep.layers if r.name == "0"]
    assert entry.status == "dense" and "row_split needs rows below 100" in entry.reason


def test_allocator_gives_the_important_rows_more_bits():
    m = tied(rows=200)
    # importance concentrated on the first rows (the frequent tokens)
    sw = {"0": torch.cat([torch.full((50, 128), 100.0), torch.ones(150, 128)])}
    base = wclust.ClusterConfig(
        method="scaled-fit", group_size=64, overrides={"0": {"row_split": [{"until": 50}]}}
    )
    cands = ((3, 64), (4, 64), (5, 64))
    cfg, summary = allocate_bits(m, 3.7, base, sample_weights=sw, candidates=cands)
    assert summary["bits"] == {"0[0:50]": 4, "0[50:200]": 3}
    rep = wclust.compress_(m, cfg, sample_weights=sw)
    assert rep.bits_per_weight <= 3.7
    assert rep.bits_per_weight == pytest.approx(summary["bits_per_weight"])
    assert [r["bits"] for r in rep.clustered[0].row_split] == [4, 3]
    # the same budget without the split: one width for all rows
    plain = base.replace(overrides={})
    _, whole = allocate_bits(tied(rows=200), 3.7, plain, sample_weights=sw, candidates=cands)
    assert whole["bits"] == {"0": 3}
    assert summary["predicted_loss"] < whole["predicted_loss"]


def test_fine_tuning_trains_every_part():
    m = tied()
    wclust.compress_(m, split_config())
    cw = m[0].clustered
    before = [p.codebook.detach().clone() for p in cw.parts]
    params = wclust.stages.train.trainable_codebooks_(m, scales=True)
    assert len(params) == 6  # a codebook and a scale tensor per part
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randint(0, 100, (8,))
    loss = m(x).square().mean()
    loss.backward()
    opt.step()
    wclust.stages.train.freeze_codebooks_(m)
    assert all(not torch.equal(p.codebook, b) for p, b in zip(cw.parts, before, strict=True))
    assert not cw.trainable()


def test_token_embedding_split_cuts_only_inside_the_table():
    from tests.conftest import tiny_gpt2, tiny_whisper
    from wclust.stages.allocate import token_embedding_split

    big = tiny_whisper(vocab_size=5000)
    assert token_embedding_split(big) == {
        "model.decoder.embed_tokens": {"row_split": [{"until": 4000}]}
    }
    assert token_embedding_split(tiny_whisper()) == {}  # 300 rows: nothing to cut
    assert list(token_embedding_split(tiny_gpt2(), rows=(10,))) == ["transformer.wte"]
