"""Speech recognition task: load a folder of clips, transcribe with Whisper, score WER/CER.

A data folder holds audio files (any format soundfile reads: wav, flac, ogg, ...) and a
``transcripts.tsv`` with a header line and at least the columns ``file`` (path relative to
the folder) and ``text`` (the reference transcript). ``builtin_clips_dir()`` is a small such
folder shipped with the package (synthetic English speech, see ``scripts/make_clips.py``).

Scores follow Whisper's paper: both sides go through Whisper's English text normalizer,
then corpus-level WER and CER (total edits / total reference words or characters).

transformers, jiwer and soundfile are optional (``pip install wclust[asr]``) and imported
only inside the functions that need them.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

SAMPLE_RATE = 16_000
"""Whisper's input rate; every loaded clip is resampled to it."""

MAX_SECONDS = 30.0
"""Whisper's window; longer clips would be cut silently, so ``transcribe`` refuses them."""

TRANSCRIPTS = "transcripts.tsv"
MACHINE_TRANSCRIPTS = "machine_transcripts.tsv"
"""Models' own transcripts of a folder without references, one row per clip and model
(``scripts/make_machine_transcripts.py``)."""

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _require(module: str):
    """Import an optional dependency, naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"wclust.tasks.asr needs {module.split('.')[0]!r}: pip install 'wclust[asr]'"
        ) from e


@dataclass
class AudioSample:
    """One clip: ``audio`` is float32 mono at 16 kHz, shape (n_samples,)."""

    name: str
    audio: np.ndarray
    text: str
    # text is a model's transcript (a pseudo-label), used as written, not a
    # person's reference in LibriSpeech's upper case
    machine: bool = False

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def builtin_clips_dir() -> Path:
    """Returns the folder of the packaged synthetic clips (24 FLAC files +
    transcripts.tsv): quick checks that need speech with known text."""
    return _DATA_DIR / "clips"


def builtin_eval_dir() -> Path:
    """Returns the folder of the packaged evaluation clips: 100 real LibriSpeech
    test-other utterances (10 speakers) with their reference transcripts (CC BY 4.0)."""
    return _DATA_DIR / "speech" / "test-other"


def builtin_calibration_dir() -> Path:
    """Returns the folder of the packaged calibration clips: 251 real LibriSpeech
    train-clean-100 utterances, one per speaker, none shared with the evaluation
    clips, without transcripts (the original model's transcripts stand in)."""
    return _DATA_DIR / "speech" / "train-clean" / "clips"


def read_audio(path: str | Path) -> np.ndarray:
    """Reads an audio file as float32 mono 16 kHz.

    Args:
        path: any file soundfile can read.
    Returns:
        (n_samples,) float32 array; channels are averaged, other rates resampled.
    """
    sf = _require("soundfile")
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    audio = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(SAMPLE_RATE, rate)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g)
    return np.ascontiguousarray(audio, dtype=np.float32)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def _read_tsv(tsv: Path, more: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, row) of each row of a transcripts file naming a file; none if
    the file does not exist. Its header must name ``file``, ``text`` and ``more``."""
    if not tsv.is_file():
        return []
    # QUOTE_NONE: transcripts contain quotes and apostrophes that must stay literal.
    with tsv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"file", "text", *more} - set(reader.fieldnames or [])
        if missing:
            need = ", ".join(repr(c) for c in ("file", *more, "text"))
            raise ValueError(
                f"{tsv} lacks the column(s) {sorted(missing)} in its header line "
                f"(found {reader.fieldnames}); the header must name {need}, tab-separated"
            )
        # skip blank file cells so a trailing empty line is harmless
        return [(i + 2, r) for i, r in enumerate(reader) if (r["file"] or "").strip()]


def load_audio_dir(
    path: str | Path,
    limit: int | None = None,
    every: int = 1,
    *,
    transcripts: bool = True,
    machine: str | None = None,
) -> list[AudioSample]:
    """Loads the clips listed in ``<path>/transcripts.tsv``.

    Args:
        path: folder with audio files and ``transcripts.tsv`` (tab-separated, header line,
            columns ``file`` and ``text``; other columns are ignored).
        limit: keep at most this many clips (after ``every``); None keeps all.
        every: keep every n-th row (1 = all), for quick subsets spread over the set.
        transcripts: False allows a folder without ``transcripts.tsv``: its audio
            files (``AUDIO_SUFFIXES``, sorted by name) load with empty text, or with
            ``machine``'s transcript (for calibration and distillation, which
            transcribe a clip without text with the model first).
        machine: a model name: where ``transcripts`` is False, take that model's own
            transcripts from ``machine_transcripts.tsv`` (columns ``file``, ``model``,
            ``text``) for the clips it lists (``AudioSample.machine`` set). Only the
            model that wrote them should use them: its Fisher weights then equal those
            from transcribing the clips itself.
    Returns:
        The clips in file order, as ``AudioSample`` (name = the ``file`` column).
    Raises:
        ValueError: missing folder, tsv, column or audio file (the message says which).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"ASR data folder not found: {root}; pass a folder holding audio files and {TRANSCRIPTS}"
        )
    tsv = root / TRANSCRIPTS
    if not tsv.is_file() and not transcripts:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise ValueError(
                f"{root} holds neither {TRANSCRIPTS} nor audio files ({', '.join(AUDIO_SUFFIXES)})"
            )
        files = files[::every][:limit]
        said = _read_tsv(root / MACHINE_TRANSCRIPTS, ("model",)) if machine else []
        said = {
            row["file"].strip(): (row["text"] or "").strip()
            for _, row in said
            if (row["model"] or "").strip() == machine
        }
        return [
            AudioSample(p.name, read_audio(p), said.get(p.name, ""), p.name in said) for p in files
        ]
    if not tsv.is_file():
        raise ValueError(
            f"{tsv} not found; add a tab-separated {TRANSCRIPTS} with a header line "
            "and the columns 'file' (audio path relative to the folder) and 'text'"
        )
    rows = _read_tsv(tsv)[::every]
    if limit is not None:
        rows = rows[:limit]

    samples = []
    for line, row in rows:
        name = row["file"].strip()
        audio_path = root / name
        if not audio_path.is_file():
            raise ValueError(
                f"audio file {audio_path} (listed on line {line} of {tsv}) not found; "
                "add the file or remove its row"
            )
        samples.append(AudioSample(name, read_audio(audio_path), (row["text"] or "").strip()))
    return samples


def speed_perturb(samples: list[AudioSample], speeds=(0.9, 1.1)) -> list[AudioSample]:
    """Copies of ``samples`` played faster or slower (Kaldi-style speed perturbation:
    resampled, so tempo and pitch change together), transcripts unchanged. More
    varied speech for distillation from few clips (Ko et al., Interspeech 2015).

    Args:
        samples: clips at ``SAMPLE_RATE``.
        speeds: factors (> 0, != 1): 1.1 plays 10% faster (a shorter clip).
    Returns:
        One copy per clip and speed, clip by clip; names get ``@<speed>x``.
    Raises:
        ValueError: a factor <= 0 or 1, or a copy longer than Whisper's 30 s window.
    """
    from fractions import Fraction

    from scipy.signal import resample_poly

    out = []
    for speed in speeds:
        if not speed > 0 or speed == 1:
            raise ValueError(f"speed factors must be positive and not 1, got {speed!r}")
    for s in samples:
        for speed in speeds:
            r = Fraction(1 / speed).limit_denominator(100)  # new length / old length
            audio = resample_poly(s.audio, r.numerator, r.denominator).astype(np.float32)
            if len(audio) > MAX_SECONDS * SAMPLE_RATE:
                raise ValueError(
                    f"{s.name} at speed {speed:g} lasts {len(audio) / SAMPLE_RATE:.1f} s, "
                    f"longer than Whisper's {MAX_SECONDS:.0f} s window; use speeds >= 1 or "
                    "shorter clips"
                )
            out.append(AudioSample(f"{s.name}@{speed:g}x", audio, s.text, s.machine))
    return out


@functools.cache
def _normalizer():
    mod = _require("transformers.models.whisper.english_normalizer")
    # Whisper's British -> American spelling map (MIT, from openai-whisper; see data/README.md).
    spelling = json.loads((_DATA_DIR / "english_spelling.json").read_text(encoding="utf-8"))
    return mod.EnglishTextNormalizer(spelling)


def normalize_text(s: str) -> str:
    """Whisper's English text normalizer (lower case, no punctuation or fillers, numbers as
    digits, American spelling), so that formatting differences are not counted as errors.

    Example: ``"Mr. Smith's twenty-one cats!"`` -> ``"mister smith is 21 cats"``.
    """
    return _normalizer()(s)


def wer_cer(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level word and character error rates, in percent, after ``normalize_text``.

    Edits are summed over all pairs and divided by the total reference words (characters,
    spaces included), so long clips weigh more, as in Whisper's evaluation. A reference that
    is empty after normalization (silence, fillers only) adds no reference words but its
    hypothesis words count as insertions: a hallucination on silence is an error.

    Args:
        references: reference transcripts.
        hypotheses: model transcripts, same length and order.
    Returns:
        ``{"wer": float, "cer": float}`` in percent (can exceed 100 with many insertions).
    Raises:
        ValueError: lengths differ, or every reference is empty after normalization.
    """
    return _rates(clip_errors(references, hypotheses), clip_errors(references, hypotheses, "char"))


def _rates(words: dict[str, list[int]], chars: dict[str, list[int]]) -> dict[str, float]:
    """``wer_cer``'s corpus rates from ``clip_errors``' word and character counts."""
    return {
        "wer": 100.0 * sum(words["edits"]) / sum(words["words"]),
        "cer": 100.0 * sum(chars["edits"]) / sum(chars["words"]),
    }


def clip_errors(
    references: list[str], hypotheses: list[str], unit: str = "word"
) -> dict[str, list[int]]:
    """Per-clip edit counts behind ``wer_cer``: ``{"edits": [...], "words": [...]}``, one
    entry per pair (``words``: the reference's length in words, or in characters with
    ``unit="char"``).

    The corpus rate is ``sum(edits) / sum(words)``; per-clip counts let a paired bootstrap
    over clips (``report.stats.paired_bootstrap``) say how sure a difference between two
    models on the same clips is.

    Raises:
        ValueError: lengths differ, or every reference is empty after normalization.
    """
    jiwer = _require("jiwer")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("every reference is empty after normalization; nothing to score")
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    edits, lengths = [], []
    for r, h in zip(refs, hyps, strict=True):
        if not r:  # scored by hand: some jiwer versions reject empty references
            edits.append(len(h.split()) if unit == "word" else len(h))
            lengths.append(0)
            continue
        out = process(r, h)
        edits.append(out.substitutions + out.deletions + out.insertions)
        lengths.append(out.hits + out.substitutions + out.deletions)
    return {"edits": edits, "words": lengths}


def _is_multilingual(model) -> bool:
    flag = getattr(model.generation_config, "is_multilingual", None)
    if flag is not None:
        return bool(flag)
    # openai-whisper's own rule: English-only vocabularies have 51864 entries.
    return model.config.vocab_size >= 51865


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no {token!r} token; is it a Whisper tokenizer?")
    return tid


def _generation_config(
    model: WhisperForConditionalGeneration, processor: WhisperProcessor, max_new_tokens: int
):
    """A copy of the model's generation config set for greedy English transcription.

    The Whisper prompt ids come from the tokenizer, so this works for English-only and
    multilingual models and for models built without the hub's generation_config.json.
    Every setting lives in the config, none as ``generate`` kwargs: transformers warns when
    both are given. generate() fills settings left at None from ``model.generation_config``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = processor.tokenizer
    gc = copy.deepcopy(model.generation_config)
    gc.decoder_start_token_id = _token_id(tok, "<|startoftranscript|>")
    gc.eos_token_id = gc.pad_token_id = _token_id(tok, "<|endoftext|>")
    gc.no_timestamps_token_id = _token_id(tok, "<|notimestamps|>")
    gc.num_beams, gc.do_sample, gc.use_cache, gc.return_timestamps = 1, False, True, False
    # Whisper's generate() counts max_length in new tokens (it adds the prompt length itself).
    # Setting max_new_tokens as well would warn on every call when the model's config has a
    # max_length; but if the model's config has a max_new_tokens, generate() would restore
    # it over a None, so then ours must be given explicitly.
    gc.max_length = max_new_tokens
    if model.generation_config.max_new_tokens is not None:
        gc.max_new_tokens = max_new_tokens
    gc.is_multilingual = _is_multilingual(model)
    if gc.is_multilingual:
        lang_to_id = dict(getattr(gc, "lang_to_id", None) or {})
        lang_to_id.setdefault("<|en|>", _token_id(tok, "<|en|>"))
        gc.lang_to_id = lang_to_id
        gc.task_to_id = {t: _token_id(tok, f"<|{t}|>") for t in ("transcribe", "translate")}
        # Explicit language/task: no language detection, and an old forced_decoder_ids
        # in the model's config is ignored.
        gc.language, gc.task = "en", "transcribe"
    # English-only models take no language/task; their prompt is sot + notimestamps.
    if not getattr(gc, "begin_suppress_tokens", None):
        # Whisper's SuppressBlank: never start with a space or end before any text.
        gc.begin_suppress_tokens = [*tok.encode(" ", add_special_tokens=False), gc.eos_token_id]
    return gc


def _transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audio: np.ndarray,
    gen_config,
) -> str:
    import torch

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D array, got shape {audio.shape}")
    if audio.size > MAX_SECONDS * SAMPLE_RATE:
        raise ValueError(
            f"audio is {audio.size / SAMPLE_RATE:.1f} s; transcribe handles at most "
            f"{MAX_SECONDS:.0f} s (Whisper's window); cut the clip into shorter pieces"
        )
    feats = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    param = next(model.parameters())
    input_features = feats.input_features.to(param.device, param.dtype)  # (1, n_mels, 3000)
    with torch.inference_mode():
        ids = model.generate(input_features, generation_config=gen_config)  # copies gen_config
    return processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audio: np.ndarray,
    *,
    max_new_tokens: int = 128,
) -> str:
    """Transcribes one English clip with greedy decoding (KV cache, no timestamps).

    Args:
        model: a transformers ``WhisperForConditionalGeneration`` (English-only or
            multilingual; multilingual ones are told ``language="en", task="transcribe"``).
        processor: the matching ``WhisperProcessor``.
        audio: (n_samples,) float32 mono at 16 kHz, at most 30 s.
        max_new_tokens: decoding stops after this many tokens.
    Returns:
        The raw (unnormalized) transcript.
    """
    model.eval()  # dropout off: results must not depend on the caller's mode
    return _transcribe(
        model, processor, audio, _generation_config(model, processor, max_new_tokens)
    )


def evaluate(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    samples: list[AudioSample],
    *,
    max_new_tokens: int = 128,
    warmup: bool = True,
) -> dict[str, Any]:
    """Transcribes every clip and scores the set.

    Args:
        model, processor: as for ``transcribe``.
        samples: clips from ``load_audio_dir``.
        max_new_tokens: as for ``transcribe``.
        warmup: transcribe the first clip once, untimed, so one-time costs (allocations,
            lazy kernels) do not land in the first latency.
    Returns:
        dict with ``wer`` and ``cer`` (percent, see ``wer_cer``), ``n_clips``,
        ``audio_seconds`` (total), ``latency_s`` (per clip, seconds: features + decoding +
        detokenizing), ``names``, ``hypotheses`` (raw transcripts, in sample order),
        ``item_errors`` (``clip_errors``' per-clip word edits and reference words).
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    model.eval()
    gc = _generation_config(model, processor, max_new_tokens)
    if warmup:
        _transcribe(model, processor, samples[0].audio, gc)
    hypotheses, latency = [], []
    for s in samples:
        t0 = time.perf_counter()
        hypotheses.append(_transcribe(model, processor, s.audio, gc))
        latency.append(time.perf_counter() - t0)
    refs = [s.text for s in samples]
    words = clip_errors(refs, hypotheses)
    return {
        **_rates(words, clip_errors(refs, hypotheses, "char")),
        "item_errors": words,
        "n_clips": len(samples),
        "audio_seconds": sum(s.seconds for s in samples),
        "latency_s": latency,
        "names": [s.name for s in samples],
        "hypotheses": hypotheses,
    }


def calibration_batches(model, processor, samples: list[AudioSample]) -> list[dict]:
    """Teacher-forced inputs for calibration: ``model(**batch).loss`` is the
    cross-entropy of the reference transcript after Whisper's English prompt.

    Args:
        model, processor: as for ``transcribe``.
        samples: calibration clips (keep them apart from the evaluation clips). A clip
            with empty text is transcribed by ``model`` (greedy) and that transcript,
            as written, is used instead (pseudo-labels: pass the uncompressed model).
    Returns:
        One dict per clip with ``input_features``, ``decoder_input_ids`` and ``labels``.
    """
    import torch

    tok = processor.tokenizer
    sot = _token_id(tok, "<|startoftranscript|>")
    eot = _token_id(tok, "<|endoftext|>")
    prompt = [sot]
    if _is_multilingual(model):
        prompt += [_token_id(tok, "<|en|>"), _token_id(tok, "<|transcribe|>")]
    prompt.append(_token_id(tok, "<|notimestamps|>"))
    out = []
    for s in samples:
        feats = processor.feature_extractor(s.audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        if s.machine and s.text.strip():  # a model's transcript, as it wrote it
            said = s.text.strip()
        elif s.text.strip():
            said = s.text.strip().lower().capitalize()
        else:  # no transcript: the model's own
            said = transcribe(model, processor, s.audio)
        text = tok.encode(" " + said, add_special_tokens=False)
        ids = prompt + text + [eot]
        dec = torch.tensor([ids[:-1]])
        labels = torch.tensor([ids[1:]])
        labels[0, : len(prompt) - 1] = -100  # the prompt is given, not predicted
        out.append(
            {"input_features": feats.input_features, "decoder_input_ids": dec, "labels": labels}
        )
    return out
