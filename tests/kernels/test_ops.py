"""The compiled kernels (wclust._C via wclust.kernels.ops) against a torch reference,
on every instruction set this CPU has, and their torch-op fallback."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import wclust
from wclust.kernels import ops

CONFIGS = [
    dict(bits=4, method="nf4"),  # shared codebook, scale per 64
    dict(bits=4, method="rtn", group_size=32),  # scales and offsets
    dict(bits=4, method="exact"),  # one codebook per row
    dict(bits=4, outliers=0.02),  # exact outliers
    dict(bits=3, method="scaled-fit", group_size=64),  # widened to 4-bit pairs
    dict(bits=2, method="kmeans", granularity="tensor"),
    dict(bits=5, method="rtn", group_size=64),  # one code per byte
    dict(bits=8, method="kmeans", granularity="tensor"),  # 256 entries: 8 pairs
    dict(bits=6, method="exact"),  # 64-entry codebook per row
    dict(bits=5, method="scaled-fit", group_size=64),  # 32 entries from registers, scaled
    dict(bits=7, method="exact"),  # 128 entries per row: a 4-pair permute tree
]


def reference_dense(cw) -> torch.Tensor:
    """The (out, in) weight from the unpacked codes with torch indexing only."""
    codes = cw.codes().reshape(cw.shape[0], -1).long()
    cb = cw.codebook_float()
    w = cb[0][codes] if cb.shape[0] == 1 else cb.gather(1, codes)
    if cw.group_scale is not None:
        w = w.reshape(cw.group_scale.numel(), -1) * cw.group_scale.float()[:, None]
        if cw.group_offset is not None:
            w = w + cw.group_offset.float()[:, None]
    w = w.reshape(-1)
    if cw.outlier_idx is not None:
        w = w.index_put((cw.outlier_idx.long(),), cw.outlier_val.float())
    return w.view(cw.shape[0], -1)


@pytest.fixture(params=["avx512", "avx2", "portable", "torch"])
def isa(request, monkeypatch):
    """Each instruction set the compiled kernels have (capped at this CPU's best), and
    the torch-op fallback."""
    if request.param == "torch":
        monkeypatch.setattr(ops, "_AVAILABLE", False)
        yield "torch"
        return
    if not ops.available():
        pytest.skip("compiled kernels not built")
    got = ops.isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield got
    finally:
        ops.isa("best")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_linear_dense_and_rows_match_the_reference(cfg, isa):
    torch.manual_seed(0)
    d = 200 if "group_size" not in cfg and cfg.get("method") != "nf4" else 192  # 200: tails
    m = nn.Sequential(nn.Linear(d, 40), nn.Embedding(40, d))
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    cw = m[0].clustered
    ref = reference_dense(cw)
    with torch.no_grad():
        assert cw.kernel_ok()
        # 1 and 5 rows: the look-up GEMV; 37: blocks decoded for the matmul
        for shape in [(d,), (1, 1, d), (5, d), (37, d)]:
            x = torch.randn(shape)
            want = torch.nn.functional.linear(x, ref, m[0].bias)
            torch.testing.assert_close(m[0](x), want, rtol=1e-4, atol=1e-4)
        assert cw.layout == ("nibbles" if cw.bits <= 4 else "bytes")
        torch.testing.assert_close(cw.dense(), ref, rtol=1e-6, atol=1e-6)
        emb = m[1].clustered
        ids = torch.tensor([[39, 0, 7], [7, 20, 1]])
        torch.testing.assert_close(m[1](ids), reference_dense(emb)[ids], rtol=1e-6, atol=1e-6)


def test_kernel_layout_keeps_codes_and_file(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 40, bias=False))
    wclust.compress_(m, wclust.ClusterConfig(bits=3, method="kmeans", granularity="tensor"))
    cw = m[0].clustered
    codes = cw.codes().clone()
    wclust.save(m, tmp_path / "a.wclust")
    with torch.no_grad():
        m[0](torch.randn(1, 128))
    assert cw.layout == "nibbles" and cw.packed.shape == (40, 64)  # widened to 4 bits
    assert torch.equal(cw.codes(), codes)
    wclust.save(m, tmp_path / "b.wclust")
    assert (tmp_path / "a.wclust").read_bytes() == (tmp_path / "b.wclust").read_bytes()
    cw.set_packed(cw.packed_rows().clone())
    assert cw.layout == "rows" and torch.equal(cw.codes(), codes)


def test_missing_library_warns_once_and_runs_torch_ops(monkeypatch):
    monkeypatch.setattr(ops, "_AVAILABLE", None)
    monkeypatch.setitem(sys.modules, "wclust._C", None)  # `import wclust._C` fails
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 24))
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    x = torch.randn(2, 128)
    with torch.no_grad(), pytest.warns(UserWarning, match="compiled kernels not built"):
        y = m[0](x)
    assert ops.available() is False and ops.isa() == "torch"
    ref = torch.nn.functional.linear(x, reference_dense(m[0].clustered), m[0].bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_compiled_kernels_are_built():
    # `pip install -e .` (make install) builds wclust._C; the fallback is for
    # installs without a compiler, not for this project's CI
    assert ops.available(), "run `pip install -e .` to build the compiled kernels"
    assert ops.isa() in ("avx512", "avx2", "portable")


def test_bad_arguments_raise_clear_errors():
    if not ops.available():
        pytest.skip("compiled kernels not built")
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    cb = torch.zeros(1, 16)
    with pytest.raises(RuntimeError, match="x has 15 features, the weight 16"):
        torch.ops.wclust.lut_linear(torch.zeros(1, 15), codes, 4, cb, *[None] * 5)
    with pytest.raises(RuntimeError, match="codebook rows must be 1 or out_features"):
        torch.ops.wclust.lut_decode(codes, 4, torch.zeros(3, 16), *[None] * 4)
    with pytest.raises(RuntimeError, match="row index 4 out of range"):
        torch.ops.wclust.lut_rows(codes, 4, cb, None, None, torch.tensor([4]))


def test_loaded_model_runs_without_numba(tmp_path):
    # a fresh process loads a saved model and runs it: the kernels are compiled
    # code, numba (kept for compress-time work) and llvmlite stay unimported
    from tests.conftest import tiny_whisper

    m = tiny_whisper()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    path = tmp_path / "w.wclust"
    wclust.save(m, path)
    code = textwrap.dedent(f"""
        import sys, torch, wclust
        from wclust.kernels import ops
        m = wclust.load({str(path)!r})
        with torch.no_grad():
            out = m(torch.randn(1, 16, 100), decoder_input_ids=torch.tensor([[1, 5, 7]]))
        assert out.logits.shape == (1, 3, 300), out.logits.shape
        assert ops.available(), "compiled kernels not loaded"
        bad = [n for n in ("numba", "llvmlite") if n in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_decoder_step_compiles_to_one_op_per_layer():
    from tests.conftest import tiny_whisper

    if not ops.available():
        pytest.skip("compiled kernels not built")
    m = tiny_whisper()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    n_linear = sum(isinstance(mod, nn.Linear) for mod in m.model.decoder.modules())
    dec = m.model.decoder
    enc = torch.randn(1, 25, 64)
    ids = torch.tensor([[1, 5, 7]])
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(ids, enc):
        return dec(input_ids=ids, encoder_hidden_states=enc, use_cache=False).last_hidden_state

    with torch.no_grad():
        want = step(ids, enc)  # eager first: codes switch to the kernel layout
        got = torch.compile(step, backend=counting, fullgraph=True)(ids, enc)
        got_ind = torch.compile(step, backend="aot_eager")(ids, enc)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ind, want, rtol=1e-5, atol=1e-5)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    n_ops = sum(str(t).startswith("wclust.lut_linear") for t in targets)
    assert n_ops == n_linear > 0  # one operator per compressed Linear


def test_loading_decodes_no_weight(tmp_path, monkeypatch):
    # the model is built on the meta device and filled with the stored codes: no
    # dense copy of any clustered weight is made while loading
    from tests.conftest import tiny_whisper
    from wclust.nn.modules import ClusteredWeight

    m = tiny_whisper()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    wclust.save(m, tmp_path / "w.wclust")

    def no_dense(self):
        raise AssertionError("a dense weight was built while loading")

    monkeypatch.setattr(ClusteredWeight, "dense", no_dense)
    loaded = wclust.load(tmp_path / "w.wclust")
    assert any(isinstance(b, ClusteredWeight) for b in loaded.modules())


def test_loading_prepares_the_kernel_layout(tmp_path):
    # loading switches 3-bit codes to the kernels' 4-bit pairs and builds the call
    # arguments before any forward; the model still computes what it computed before
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    wclust.compress_(m, wclust.ClusterConfig(bits=3, method="kmeans", granularity="tensor"))
    wclust.save(m, tmp_path / "m.wclust")
    if not ops.available():
        pytest.skip("compiled kernels not built")
    loaded = wclust.load(
        tmp_path / "m.wclust",
        lambda: nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)),
    )
    for i in (0, 2):
        cw = loaded[i].clustered
        assert cw.layout == "nibbles" and "_kargs" in cw.__dict__
        assert torch.equal(cw.codes(), m[i].clustered.codes())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("code_bits", [4, 8])
def test_many_rows_span_several_decoded_blocks(code_bits, isa):
    """Wide inputs make the decoded blocks a few rows each, so the matmul writes
    several column blocks of the output (with bias and outliers in later blocks)."""
    g = torch.Generator().manual_seed(code_bits)
    out_f, in_f, n = 70, 1 << 15, 12  # blocks of 32 rows: 0-31, 32-63, 64-69
    width = in_f // 2 if code_bits == 4 else in_f
    codes = torch.randint(0, 256, (out_f, width), dtype=torch.uint8, generator=g)
    cb = torch.randn(out_f, 1 << code_bits, generator=g)
    scale = torch.rand(out_f * in_f // 64, generator=g) + 0.5
    idx = torch.tensor([5, 40 * in_f + 3, 69 * in_f + in_f - 1], dtype=torch.int32)
    val = torch.tensor([2.0, -3.0, 4.0], dtype=torch.float16)
    x, bias = torch.randn(n, in_f, generator=g), torch.randn(out_f, generator=g)
    w = ops.decode(codes, code_bits, cb, scale, None, idx, val)
    assert w.view(-1)[idx.long()].tolist() == [2.0, -3.0, 4.0]
    want = torch.nn.functional.linear(x, w, bias)
    got = ops.linear(x, codes, code_bits, cb, scale, None, idx, val, bias)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    got = ops.linear(x, codes, code_bits, cb, scale, None, idx, val, None)
    torch.testing.assert_close(got, want - bias, rtol=1e-4, atol=1e-3)
    with torch.inference_mode():  # the blocks' matmuls write inference tensors
        got = ops.linear(x, codes, code_bits, cb, scale, None, idx, val, bias)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("group", [None, 32, 64, 128, 96, 384])
@pytest.mark.parametrize("k", [4, 16])
def test_nibble_decode_matches_indexing_for_every_group_shape(group, k, isa):
    """4-bit decode of rows of 384 inputs: no scales (one group per row), scale groups
    of 1, 2, 4 and 3 x 32 inputs and a whole row, a full and a 4-entry codebook (one
    per row), offsets on every other case."""
    if isa == "torch":
        pytest.skip("the torch fallback is checked by the layer tests")
    g = torch.Generator().manual_seed(k + (group or 0))
    out_f, in_f = 6, 384
    codes = torch.randint(0, k, (out_f, in_f), generator=g)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    cb = torch.randn(out_f, k, generator=g)
    want = cb.gather(1, codes)
    scale = offset = None
    if group is not None:
        scale = torch.rand(out_f, in_f // group, generator=g) + 0.5
        want = (want.view(out_f, -1, group) * scale[..., None]).view(out_f, in_f)
        if group % 64:
            offset = torch.randn(out_f, in_f // group, generator=g)
            want = (want.view(out_f, -1, group) + offset[..., None]).view(out_f, in_f)
    got = torch.ops.wclust.lut_decode(packed, 4, cb, scale, offset, None, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7])
def test_kernel_layout_matches_unpacking_with_torch_ops(bits, monkeypatch):
    from wclust.core.packing import pack_codes

    if not ops.available():
        pytest.skip("compiled kernels not built")
    g = torch.Generator().manual_seed(bits)
    rows, cols = 37, 70  # 2590 codes: streams ending mid-byte for the odd widths
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    packed = pack_codes(codes, bits)
    got = ops.kernel_layout(packed, bits, rows, cols)
    monkeypatch.setattr(ops, "_AVAILABLE", False)
    want = ops.kernel_layout(packed, bits, rows, cols)
    assert got.shape == want.shape == (rows, cols // 2 if bits < 4 else cols)
    assert torch.equal(got, want)
    if bits > 4:
        assert torch.equal(got, codes.to(torch.uint8))
    else:  # low nibble: even column, high nibble: odd column
        assert torch.equal(got & 15, codes[:, 0::2].to(torch.uint8))
        assert torch.equal(got >> 4, codes[:, 1::2].to(torch.uint8))
    with pytest.raises(RuntimeError, match="need"):
        torch.ops.wclust.kernel_layout(packed[:-1], bits, rows, cols)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[7]], ids=["rtn", "outliers", "8b"])
def test_int8_products_match_the_float_product_to_8_bit_error(cfg):
    # compiled and torch-op versions compute the same quantized product (same scales,
    # same rounding); both stay within 8-bit error of the exact float product
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(192, 72))
    wclust.compress_(m, wclust.ClusterConfig(**cfg))
    args = m[0].clustered._call_args()
    x, bias = torch.randn(300, 192), m[0].bias.detach()
    with torch.no_grad():
        exact = ops.linear(x, *args, bias)
        got = ops.linear_int8(x, *args, bias)
        assert ((got - exact).norm() / exact.norm()) < 0.02
        if ops.available():
            ops._AVAILABLE = False
            try:
                torch_ops = ops.linear_int8(x, *args, bias)
            finally:
                ops._AVAILABLE = None
            torch.testing.assert_close(got, torch_ops, rtol=1e-4, atol=1e-4)


def test_int8_matmul_setting_runs_many_rows_in_int8_and_survives_a_file(tmp_path, monkeypatch):
    from wclust.nn.modules import INT8_MIN_ROWS, set_int8_matmul

    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    m = make()
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    assert set_int8_matmul(m) == 2
    wclust.save(m, tmp_path / "m.wclust")
    loaded = wclust.load(tmp_path / "m.wclust", make)
    calls = []
    real = ops.linear_int8
    monkeypatch.setattr(ops, "linear_int8", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        loaded(torch.randn(INT8_MIN_ROWS + 1, 64))
        assert calls == [INT8_MIN_ROWS + 1] * 2
        loaded(torch.randn(3, 64))  # decoder steps keep the exact lookups
        assert len(calls) == 2
    set_int8_matmul(loaded, False)
    wclust.save(loaded, tmp_path / "off.wclust")
    assert not any(
        "int8_matmul" in e for e in wclust.read_header(tmp_path / "off.wclust")["clustered"]
    )


def test_new_operators_pass_torch_library_opcheck():
    # schema, fake (meta) implementation and dispatch agree, as torch.compile needs
    from wclust.core.packing import pack_codes

    if not ops.available():
        pytest.skip("compiled kernels not built")
    ops._register_fakes()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 24))
    wclust.compress_(m, wclust.ClusterConfig(bits=4, method="nf4"))
    args = m[0].clustered._call_args()
    x = torch.randn(70, 64)
    torch.library.opcheck(torch.ops.wclust.lut_linear_int8, (x, *args, m[0].bias.detach()))
    packed = pack_codes(torch.randint(0, 8, (6, 10)), 3)
    torch.library.opcheck(torch.ops.wclust.kernel_layout, (packed, 3, 6, 10))
    codes = torch.randint(0, 256, (24, 32), dtype=torch.uint8)
    cb, scale = torch.randn(256, 2), torch.rand(24 * 2) + 0.5
    torch.library.opcheck(
        torch.ops.wclust.vq_linear, (torch.randn(3, 64), codes, cb, scale, None, 24)
    )
    tiles, tscale = ops.vq_tiles(codes, scale.view(24, 2), 256)
    torch.library.opcheck(
        torch.ops.wclust.vq_linear, (torch.randn(3, 64), tiles, cb, tscale, None, 24)
    )


def _int16_chunk(vec_per_group):
    """Slices per table scale in the AVX2 int16 kernel: the largest divisor of a scale
    group up to 8."""
    return next(c for c in range(8, 0, -1) if vec_per_group % c == 0)


def _int16_tables(x, cb, vec_per_group):
    """The tables the AVX2 kernel looks up for tiles of up to 64 centroids, as it rounds them:
    per row of x, ``T[j, c] = dot(cb[c], x[j*d : j*d + d])`` (float32, fused
    multiply-adds in the kernel's order), one scale per chunk of slices (the largest
    divisor of a scale group up to 8), ``max|T| / (32767 // chunk)``, and the int16
    entries rounded half to even. Returns (q (n, n_vec, K) int64, scales per slice)."""
    chunk = _int16_chunk(vec_per_group)
    n, d = x.shape[0], cb.shape[1]
    xs = x.view(n, -1, d).double()
    t = (xs[..., 0:1] * cb[:, 0].double()).float()  # the first product, rounded
    for e in range(1, d):  # fma: one rounding per step
        t = (xs[..., e : e + 1] * cb[:, e].double() + t.double()).float()
    m = t.view(n, -1, chunk * cb.shape[0]).abs().amax(-1)
    s = torch.where(m > 0, m / (32767 // chunk), torch.ones_like(m))
    inv = (1 / s).repeat_interleave(chunk, dim=1)[..., None]
    return torch.round(t * inv).long(), s.repeat_interleave(chunk, dim=1)


@pytest.mark.parametrize(
    "k,d,tiled",
    [(16, 2, True), (32, 2, True), (64, 2, True), (200, 4, True), (256, 2, True), (300, 2, False)],
)
def test_vector_linear_matches_the_dense_weight_on_every_isa(k, d, tiled, isa):
    """``vq_linear`` (rows or tiles of 16 rows, 40 rows: a partial tile) against the
    dense product, with scales per group of 8 codes and a bias. With up to 64 centroids
    AVX2 rounds its tables to int16: there each output may be off by half a table step
    per code, times the code's scale."""
    g = torch.Generator().manual_seed(k)
    out_f, n_vec = 40, 48
    codes = torch.randint(0, k, (out_f, n_vec), generator=g)
    cb = torch.randn(k, d, generator=g)
    scale = torch.rand(out_f, n_vec // 8, generator=g) + 0.5
    w = (cb[codes].view(out_f, n_vec // 8, 8 * d) * scale[:, :, None]).view(out_f, -1)
    x, bias = torch.randn(3, n_vec * d, generator=g), torch.randn(out_f, generator=g)
    if tiled:
        c, s = ops.vq_tiles(codes.to(torch.uint8), scale, k)
    else:
        c, s = codes.to(torch.int16), scale.reshape(-1)
    int16 = isa == "avx2" and tiled and k <= 64
    for vpg, sc, dense in ((8, scale, w), (n_vec, None, cb[codes].view(out_f, -1))):
        got = ops.vq_linear(x, c, cb, s if sc is not None else None, bias, out_f)
        want = x @ dense.t() + bias
        tol = torch.full_like(want, 1e-4)
        if int16:
            step = _int16_tables(x, cb, vpg)[1]  # (3, n_vec) table step per slice
            per_code = (
                scale.repeat_interleave(vpg, dim=1) if sc is not None else torch.ones(out_f, n_vec)
            )
            tol = tol + 0.5 * step @ per_code.t()
            assert (got - want).abs().max() > 1e-4  # the rounded tables are in use
        assert ((got - want).abs() <= tol + 1e-4 * want.abs()).all()


@pytest.mark.parametrize(
    "vec_per_group,k",
    [(8, 64), (16, 48), (6, 64), (12, 40), (3, 64), (8, 16), (16, 9), (6, 32), (4, 20)],
)
def test_vector_linear_avx2_int16_tables_are_the_documented_rounding(vec_per_group, k):
    """AVX2 tiles of up to 64 centroids: the result is the sum of the int16-rounded tables
    (``_int16_tables``) times their chunk's scale, times the group's scale: a wrong
    chunk, byte order, sub-table pick or overflow would move it by whole steps."""
    if not ops.available() or ops.isa("avx2") != "avx2":
        ops.isa("best")
        pytest.skip("no AVX2 kernels on this CPU")
    try:
        g = torch.Generator().manual_seed(vec_per_group)
        out_f, n_vec = 50, 96  # 4 blocks of 16 rows: two pairs, the last one partial
        codes = torch.randint(0, k, (out_f, n_vec), generator=g)
        codes[:, :4] = k - 1  # the top entry (at 64: code bits 4 and 5 set)
        cb = torch.randn(k, 2, generator=g)
        x = torch.randn(2, n_vec * 2, generator=g) * torch.linspace(0.1, 10, n_vec * 2)
        scale = torch.rand(out_f, n_vec // vec_per_group, generator=g) + 0.5
        c, s = ops.vq_tiles(codes.to(torch.uint8), scale, k)
        got = ops.vq_linear(x, c, cb, s, None, out_f).double()
        q, step = _int16_tables(x, cb, vec_per_group)
        assert q.abs().max() <= 32767 // _int16_chunk(vec_per_group)
        picked = q.gather(2, codes.t()[None].expand(2, -1, -1)).double() * step[..., None].double()
        per_group = picked.view(2, n_vec // vec_per_group, vec_per_group, out_f).sum(2)
        want = (per_group * scale.t().double()).sum(1)
        # float32 sums of a few hundred terms; one step of rounding is about 2e-3 here
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-4)
    finally:
        ops.isa("best")
