"""from_pretrained / save_pretrained / pipeline through the wclust quantizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wclust
from tests.conftest import tiny_bert, tiny_gpt2, tiny_whisper
from wclust.nn.modules import ClusteredWeight, is_clustered

transformers = pytest.importorskip("transformers")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(d)
    return d


def test_gpt2_compresses_on_load_saves_and_reloads_identically(gpt2_dir, tmp_path):
    cls = transformers.AutoModelForCausalLM
    m = cls.from_pretrained(gpt2_dir, quantization_config=wclust.WclustConfig(bits=3))
    # the tied head is clustered with the embedding, one shared weight
    assert is_clustered(m.lm_head) and m.lm_head.clustered is m.transformer.wte.clustered
    assert m.transformer.h[0].attn.c_attn.clustered.bits == 3  # Conv1D
    # the same as wclust.compress_ with the ClusterConfig the bits stand for
    ref = tiny_gpt2()
    wclust.compress_(ref, wclust.ClusterConfig(bits=3, granularity="channel", method="exact"))
    with torch.no_grad():
        logits = m(IDS).logits
        assert torch.equal(logits, ref(IDS).logits)
    m.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "wclust" and cfg["bits"] == 3
    wte = next(e for e in cfg["layers"] if "transformer.wte" in e["owners"])
    assert wte["owners"] == ["transformer.wte", "lm_head"]
    keys = _keys(tmp_path / "q")
    assert "transformer.wte.clustered.packed" in keys
    assert not any(k.startswith("lm_head") for k in keys)  # stored once
    assert not any(k.endswith(".weight") and "h.0.attn" in k for k in keys)  # no dense copy
    r = cls.from_pretrained(tmp_path / "q")
    assert r.lm_head.clustered is r.transformer.wte.clustered
    with torch.no_grad():
        assert torch.equal(r(IDS).logits, logits)
    # loaded in bfloat16: the rebuilt weights follow the model's dtype
    r16 = cls.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert r16.lm_head.clustered.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(r16(IDS).logits.float(), logits, atol=0.05, rtol=0.05)
    # saved again: the same tensors
    r.save_pretrained(tmp_path / "q2")
    a, b = (
        load_file(tmp_path / "q" / "model.safetensors"),
        load_file(tmp_path / "q2" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_whisper_default_recipe_round_trip_and_greedy_decode(tmp_path, whisper_inputs):
    tiny_whisper().save_pretrained(tmp_path / "fp")
    cls = transformers.WhisperForConditionalGeneration
    m = cls.from_pretrained(tmp_path / "fp", quantization_config=wclust.WclustConfig())
    cw = m.model.encoder.layers[0].fc1.clustered
    assert cw.bits == 4 and cw.meta["method"] == "scaled-lloyd" and cw.group_scale is not None
    assert m.proj_out.clustered is m.model.decoder.embed_tokens.clustered
    with torch.no_grad():
        logits = m(**whisper_inputs).logits
        feats = whisper_inputs["input_features"]
        gen = m.generate(feats, max_new_tokens=5, do_sample=False, num_beams=1)
    m.save_pretrained(tmp_path / "q")
    assert not any(k.startswith("proj_out") for k in _keys(tmp_path / "q"))
    r = cls.from_pretrained(tmp_path / "q")
    assert r.proj_out.clustered is r.model.decoder.embed_tokens.clustered
    # Whisper's forward deep-copies its config: the per-layer entries are shared, not copied
    import copy

    q = r.config.quantization_config
    assert copy.deepcopy(r.config).quantization_config.layers is q.layers
    with torch.no_grad():
        assert torch.equal(r(**whisper_inputs).logits, logits)
        assert torch.equal(r.generate(feats, max_new_tokens=5, do_sample=False, num_beams=1), gen)


@pytest.mark.parametrize(
    "recipe",
    [
        "kmeans:bits=2,granularity=tensor,algorithm=lloyd",
        {"quantizer": {"kind": "kmeans", "bits": 2, "granularity": "tensor", "algorithm": "lloyd"}},
    ],
)
def test_bert_recipe_round_trip(tmp_path, recipe):
    tiny_bert().save_pretrained(tmp_path / "fp")
    cls = transformers.BertModel
    m = cls.from_pretrained(tmp_path / "fp", quantization_config=wclust.WclustConfig(recipe=recipe))
    cw = m.encoder.layer[0].attention.self.query.clustered
    assert cw.bits == 2 and cw.n_codebooks == 1
    assert not is_clustered(m.embeddings.position_embeddings)  # default exclusion
    with torch.no_grad():
        h = m(IDS).last_hidden_state
    m.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["recipe"] == recipe
    r = cls.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(r(IDS).last_hidden_state, h)
    r.dequantize()  # dense weights with the clustered values
    assert not any(is_clustered(mod) for mod in r.modules())
    assert not hasattr(r.config, "quantization_config")
    assert r.encoder.layer[0].attention.self.query.weight.unique().numel() <= 4
    with torch.no_grad():
        torch.testing.assert_close(r(IDS).last_hidden_state, h)


def test_fresh_process_reloads_after_import_wclust(gpt2_dir, tmp_path):
    cls = transformers.AutoModelForCausalLM
    m = cls.from_pretrained(gpt2_dir, quantization_config=wclust.WclustConfig(bits=4))
    m.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.save(m(IDS).logits, tmp_path / "want.pt")
    code = f"""
import sys, torch
import wclust
assert "transformers" not in sys.modules, "import wclust imported transformers"
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r})
assert type(m.lm_head).__name__ == "ClusteredLinear", type(m.lm_head)
with torch.no_grad():
    got = m(torch.tensor({IDS.tolist()})).logits
want = torch.load({str(tmp_path / "want.pt")!r})
assert torch.equal(got, want), (got - want).abs().max()
print("ok")
"""
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 9}, "bits must be an integer from 1 to 8"),
        ({"recipe": "fast-4bit"}, "neither a preset"),
        ({"recipe": {"quantizer": {"kind": "kmeans", "methd": "exact"}}}, "no field 'methd'"),
        ({"recipe": "nf4", "bits": 4}, "not both"),
        ({"recipe": "budget-4.25"}, "need no data"),
        ({"bitz": 4}, "unknown field"),
        ({"modules_to_not_convert": "lm_head"}, "must be a list"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(wclust.ConfigError, match=match):
        wclust.WclustConfig(**kwargs)


def test_bad_quantization_config_in_config_json_is_one_clear_error(gpt2_dir, tmp_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        gpt2_dir, quantization_config=wclust.WclustConfig(bits=2)
    )
    m.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["bits"] = "four"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(wclust.ConfigError, match="bits must be an integer"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg["quantization_config"]["bits"] = 2
    single = next(e for e in cfg["quantization_config"]["layers"] if len(e["owners"]) == 1)
    single["owners"] = ["transformer.nope"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(wclust.FormatError, match="no module transformer.nope"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_keeping_the_largest_weight_dense_warns(tmp_path):
    tiny_whisper().save_pretrained(tmp_path / "fp")
    cfg = wclust.WclustConfig(bits=4, modules_to_not_convert=["model.decoder.embed_tokens"])
    with pytest.warns(UserWarning, match="largest weight, model.decoder.embed_tokens"):
        m = transformers.WhisperForConditionalGeneration.from_pretrained(
            tmp_path / "fp", quantization_config=cfg
        )
    assert not is_clustered(m.proj_out)  # tied to it: both stay dense, reported
    assert is_clustered(m.model.decoder.layers[0].fc1)


def test_convert_round_trip_keeps_identical_tensors(tmp_path):
    from wclust.integrations.transformers import from_hf, to_hf

    m = tiny_gpt2()
    cfg = wclust.ClusterConfig(
        bits=3, overrides={"transformer.wte": {"row_split": [{"until": 50, "bits": 4}]}}
    )
    report = wclust.compress_(m, cfg)
    wclust.save(m, tmp_path / "a.wclust", report=report, config=cfg)
    to_hf(tmp_path / "a.wclust", tmp_path / "hf")
    keys = _keys(tmp_path / "hf")
    assert "transformer.wte.clustered.parts.0.packed" in keys
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(r(IDS).logits, wclust.load(tmp_path / "a.wclust")(IDS).logits)
    from_hf(tmp_path / "hf", tmp_path / "b.wclust")
    a, b = load_file(tmp_path / "a.wclust"), load_file(tmp_path / "b.wclust")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ha, hb = wclust.read_header(tmp_path / "a.wclust"), wclust.read_header(tmp_path / "b.wclust")
    assert ha["clustered"] == hb["clustered"] and ha["config"] == hb["config"]
    assert ha["report"] == hb["report"]


def test_asr_pipeline_runs_the_clustered_modules(asr_model_dir, monkeypatch):
    m = transformers.WhisperForConditionalGeneration.from_pretrained(
        asr_model_dir, quantization_config=wclust.WclustConfig(bits=4)
    )
    proc = transformers.WhisperProcessor.from_pretrained(asr_model_dir)
    calls = []
    for name in ("dense", "linear", "rows"):
        orig = getattr(ClusteredWeight, name)

        def spy(self, *a, _orig=orig, **k):
            calls.append(self)
            return _orig(self, *a, **k)

        monkeypatch.setattr(ClusteredWeight, name, spy)
    asr = transformers.pipeline(
        "automatic-speech-recognition",
        model=m,
        tokenizer=proc.tokenizer,
        feature_extractor=proc.feature_extractor,
        device="cpu",
    )
    from wclust.tasks.asr import read_audio

    audio = read_audio(Path(__file__).parents[1] / "data" / "hello.wav")  # (no ffmpeg needed)
    out = asr(
        {"raw": audio, "sampling_rate": 16000},
        generate_kwargs={"max_new_tokens": 4, "num_beams": 1},
    )
    assert isinstance(out["text"], str)
    used = {id(c) for c in calls}
    assert id(m.model.encoder.layers[0].fc1.clustered) in used
    assert id(m.proj_out.clustered) in used


def test_int8_products_setting_survives_save_pretrained(tmp_path):
    from wclust.nn.modules import ClusteredWeight

    tiny_bert().save_pretrained(tmp_path / "fp")
    cls = transformers.BertModel
    cfg = wclust.WclustConfig(recipe="nf4+int8")
    m = cls.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    m.save_pretrained(tmp_path / "q")
    r = cls.from_pretrained(tmp_path / "q")
    flags = [cw.int8_matmul for cw in r.modules() if isinstance(cw, ClusteredWeight)]
    assert flags and all(flags)
