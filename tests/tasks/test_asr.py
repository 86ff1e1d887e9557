"""Tests for wclust.tasks.asr: scoring, normalization, data loading, and the decode loop
on a tiny random-init Whisper (its transcripts are noise; only their form is checked)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("jiwer")
sf = pytest.importorskip("soundfile")

from wclust.tasks.asr import (  # noqa: E402
    SAMPLE_RATE,
    AudioSample,
    builtin_clips_dir,
    calibration_batches,
    clip_errors,
    evaluate,
    load_audio_dir,
    normalize_text,
    speed_perturb,
    transcribe,
    wer_cer,
)

# ----------------------------------------------------------------------------- scoring


def test_wer_cer_one_substitution():
    r = wer_cer(["the cat sat down"], ["the cat sat up"])
    assert r["wer"] == pytest.approx(25.0)  # 1 of 4 words
    assert r["cer"] == pytest.approx(25.0)  # "down" -> "up": 4 edits over 16 characters


def test_wer_is_corpus_level():
    # 1 + 2 word errors over 4 + 2 reference words; a per-clip mean would give 62.5.
    r = wer_cer(["a b c d", "e f"], ["a b x d", ""])
    assert r["wer"] == pytest.approx(50.0)


def test_wer_cer_normalizes_both_sides():
    r = wer_cer(["Hello, World! Twenty-one colours."], ["hello world 21 colors"])
    assert r == {"wer": 0.0, "cer": 0.0}


def test_empty_reference_counts_insertions():
    # The empty reference adds no words; its hypothesis words are insertions.
    r = wer_cer(["a b c d", "", "Um."], ["a b c d", "x y", ""])
    assert r["wer"] == pytest.approx(50.0)  # 2 insertions / 4 words
    assert r["cer"] == pytest.approx(100 * 3 / 7)  # "x y" / "a b c d"


def test_clip_errors_add_up_to_the_corpus_rates():
    refs = ["a b c d", "", "Um.", "the cat sat down", "e f"]
    hyps = ["a b x d", "x y", "", "the cat sat", "e f g h"]
    w, c = clip_errors(refs, hyps), clip_errors(refs, hyps, "char")
    assert w == {"edits": [1, 2, 0, 1, 2], "words": [4, 0, 0, 4, 2]}
    r = wer_cer(refs, hyps)
    assert r["wer"] == pytest.approx(100 * 6 / 10)
    assert r["cer"] == pytest.approx(100 * sum(c["edits"]) / sum(c["words"]))
    assert c["words"][0] == 7 and c["edits"][1] == 3


def test_wer_cer_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer_cer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty after normalization"):
        wer_cer(["", "uh"], ["a", "b"])


@pytest.mark.parametrize(
    "text, expected",
    [
        # Expected values are the output of openai-whisper's own EnglishTextNormalizer.
        ("Mr. Smith's 2 cats!", "mister smith is 2 cats"),
        ("He colour-coded twenty-one files in 1999.", "he color coded 21 files in 1999"),
        ("Dr. Jones paid three hundred and fifty dollars.", "doctor jones paid $350"),
        ("Um, the [noise] hello (laughs) world", "the hello world"),
        ("ten percent", "10%"),
        ("  ", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


# ----------------------------------------------------------------------------- data


def _write_tsv(folder, rows, header=("file", "text", "speaker")):
    lines = ["\t".join(r) for r in [header, *rows]]
    (folder / "transcripts.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _sine(freq, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    sf.write(tmp_path / "a.wav", _sine(440, 1.0, 8000), 8000)  # 8 kHz mono
    x = _sine(300, 0.5, SAMPLE_RATE)
    sf.write(tmp_path / "b.flac", np.stack([x, 0.5 * x], axis=1), SAMPLE_RATE)  # stereo
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "c.wav", _sine(200, 0.25, 44100), 44100)
    _write_tsv(
        tmp_path,
        [("a.wav", 'He said "hi"', "s1"), ("b.flac", "two", "s2"), ("sub/c.wav", "three", "s1")],
    )
    return tmp_path


def test_load_audio_dir_resamples_and_downmixes(audio_dir):
    a, b, c = load_audio_dir(audio_dir)
    assert [s.name for s in (a, b, c)] == ["a.wav", "b.flac", "sub/c.wav"]
    assert a.text == 'He said "hi"'  # quotes kept literally
    for s in (a, b, c):
        assert isinstance(s, AudioSample)
        assert s.audio.dtype == np.float32 and s.audio.ndim == 1
    # 8 kHz -> 16 kHz: same tone at twice the samples (edges skipped: filter ramp-up)
    assert len(a.audio) == SAMPLE_RATE and a.seconds == pytest.approx(1.0)
    np.testing.assert_allclose(a.audio[400:-400], _sine(440, 1.0, SAMPLE_RATE)[400:-400], atol=0.02)
    # stereo -> mean of the channels
    np.testing.assert_allclose(b.audio, 0.75 * _sine(300, 0.5, SAMPLE_RATE), atol=1e-4)
    assert len(c.audio) == SAMPLE_RATE // 4  # 44.1 kHz -> 16 kHz


def test_load_audio_dir_subsets(audio_dir):
    assert [s.name for s in load_audio_dir(audio_dir, every=2)] == ["a.wav", "sub/c.wav"]
    assert [s.name for s in load_audio_dir(audio_dir, limit=1)] == ["a.wav"]
    assert [s.name for s in load_audio_dir(audio_dir, limit=1, every=2)] == ["a.wav"]
    with pytest.raises(ValueError, match="every"):
        load_audio_dir(audio_dir, every=0)


def test_load_audio_dir_errors(tmp_path, audio_dir):
    with pytest.raises(ValueError, match="folder not found"):
        load_audio_dir(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="transcripts.tsv not found"):
        load_audio_dir(empty)
    _write_tsv(empty, [("a.wav", "x")], header=("path", "text"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['file'\]"):
        load_audio_dir(empty)
    _write_tsv(empty, [("gone.wav", "x")], header=("file", "text"))
    with pytest.raises(ValueError, match=r"gone\.wav \(listed on line 2"):
        load_audio_dir(empty)


def test_load_audio_dir_without_transcripts(tmp_path, audio_dir):
    (audio_dir / "transcripts.tsv").unlink()
    with pytest.raises(ValueError, match="transcripts.tsv not found"):  # evaluation needs text
        load_audio_dir(audio_dir)
    a, b = load_audio_dir(audio_dir, transcripts=False)  # the folder's own audio files
    assert [a.name, b.name, a.text, b.text] == ["a.wav", "b.flac", "", ""]
    assert len(a.audio) == SAMPLE_RATE
    assert [s.name for s in load_audio_dir(audio_dir, limit=1, transcripts=False)] == ["a.wav"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="neither transcripts.tsv nor audio files"):
        load_audio_dir(tmp_path / "none", transcripts=False)


def test_load_audio_dir_reads_machine_transcripts_where_there_are_no_references(audio_dir):
    (audio_dir / "transcripts.tsv").unlink()
    (audio_dir / "machine_transcripts.tsv").write_text(
        'file\tmodel\ttext\nb.flac\tm1\tMr. Smith said "no", twice.\na.wav\tm2\tOther.\n',
        encoding="utf-8",
    )
    a, b = load_audio_dir(audio_dir, transcripts=False, machine="m1")
    assert (a.text, a.machine) == ("", False)  # only m2's: m1 transcribes it itself
    assert (b.text, b.machine) == ('Mr. Smith said "no", twice.', True)
    assert [s.text for s in load_audio_dir(audio_dir, transcripts=False)] == ["", ""]
    assert [s.text for s in load_audio_dir(audio_dir, transcripts=False, machine="m2")] == [
        "Other.",
        "",
    ]
    with pytest.raises(ValueError, match="transcripts.tsv not found"):  # never references
        load_audio_dir(audio_dir)


def _peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_speed_perturb_changes_tempo_and_pitch_together():
    clip = AudioSample("a.wav", _sine(440, 1.0, SAMPLE_RATE), "HELLO")
    fast, slow = speed_perturb([clip], (1.1, 0.9))
    assert [fast.name, slow.name, fast.text, slow.text] == ["a.wav@1.1x", "a.wav@0.9x"] + [
        "HELLO"
    ] * 2
    assert fast.audio.dtype == np.float32
    assert len(fast.audio) == pytest.approx(SAMPLE_RATE / 1.1, abs=1)
    assert len(slow.audio) == pytest.approx(SAMPLE_RATE / 0.9, abs=1)
    assert _peak_hz(fast.audio) == pytest.approx(440 * 1.1, abs=2)  # played faster: higher
    assert _peak_hz(slow.audio) == pytest.approx(440 * 0.9, abs=2)
    assert len(speed_perturb([clip, clip], (0.9, 1.1))) == 4
    for bad in (1.0, 0.0, -1.0):
        with pytest.raises(ValueError, match="positive and not 1"):
            speed_perturb([clip], (bad,))
    long = AudioSample("long", np.zeros(int(28 * SAMPLE_RATE), np.float32), "x")
    with pytest.raises(ValueError, match="longer than Whisper's 30 s window"):
        speed_perturb([long], (0.9,))


def test_builtin_clips_complete():
    root = builtin_clips_dir()
    with (root / "transcripts.tsv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) >= 20
    for row in rows:
        assert (root / row["file"]).is_file(), row["file"]
        assert 4 <= len(row["text"].split()) <= 15, row["text"]
    assert sum(p.stat().st_size for p in root.iterdir()) < 3e6
    (s,) = load_audio_dir(root, limit=1)
    assert 1.0 < s.seconds < 30.0 and s.text


# ----------------------------------------------------------------------------- decoding

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _tiny_whisper(multilingual: bool):
    """Random-init 1-layer Whisper with a 266-token byte-level tokenizer, built offline."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}  # 256 byte symbols
    for t in SPECIALS:
        vocab[t] = len(vocab)
    tok = transformers.WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    processor = transformers.WhisperProcessor(transformers.WhisperFeatureExtractor(), tok)
    eot = vocab["<|endoftext|>"]
    config = transformers.WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,  # 30 s of features after the stride-2 conv
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.generation_config.is_multilingual = multilingual
    return model, processor


@pytest.fixture(scope="module", params=[False, True], ids=["english_only", "multilingual"])
def tiny_whisper(request):
    return _tiny_whisper(request.param)


def test_transcribe_returns_text(tiny_whisper):
    model, processor = tiny_whisper
    before = model.generation_config.to_dict()
    text = transcribe(model, processor, _sine(440, 1.0, SAMPLE_RATE), max_new_tokens=8)
    assert isinstance(text, str)
    assert len(text.encode()) <= 8 * 3  # <= 8 byte tokens (a broken byte decodes to U+FFFD)
    assert model.generation_config.to_dict() == before  # works on a copy


def test_transcribe_rejects_bad_audio(tiny_whisper):
    model, processor = tiny_whisper
    with pytest.raises(ValueError, match="at most 30 s"):
        transcribe(model, processor, np.zeros(31 * SAMPLE_RATE, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        transcribe(model, processor, np.zeros((2, SAMPLE_RATE), np.float32))


def test_evaluate_metrics_form(tiny_whisper):
    model, processor = tiny_whisper
    samples = [
        AudioSample("x", _sine(440, 1.0, SAMPLE_RATE), "hello world"),
        AudioSample("y", _sine(220, 0.5, SAMPLE_RATE), "one two three"),
    ]
    r = evaluate(model, processor, samples, max_new_tokens=4)
    keys = {"wer", "cer", "n_clips", "audio_seconds", "latency_s", "names", "hypotheses"}
    assert set(r) == keys | {"item_errors"}
    e = r["item_errors"]
    # "one two three" normalizes to one number
    assert e["words"] == [2, 1] and r["wer"] == pytest.approx(100 * sum(e["edits"]) / 3)
    assert r["n_clips"] == 2 and r["names"] == ["x", "y"]
    assert r["audio_seconds"] == pytest.approx(1.5)
    assert len(r["latency_s"]) == 2 and all(t > 0 for t in r["latency_s"])
    assert all(isinstance(h, str) for h in r["hypotheses"])
    assert r["wer"] >= 0 and r["cer"] >= 0


def test_calibration_batches_transcribe_clips_without_text(tiny_whisper):
    model, processor = tiny_whisper
    audio = _sine(440, 1.0, SAMPLE_RATE)
    given, own = calibration_batches(
        model, processor, [AudioSample("x", audio, "HELLO WORLD"), AudioSample("y", audio, "")]
    )
    tok = processor.tokenizer
    n = given["decoder_input_ids"].shape[1] - len(
        tok.encode(" Hello world", add_special_tokens=False)
    )
    prompt = given["decoder_input_ids"][0, :n].tolist()
    said = tok.encode(" " + transcribe(model, processor, audio), add_special_tokens=False)
    assert own["decoder_input_ids"][0].tolist() == prompt + said  # the model's own words
    assert given["decoder_input_ids"][0, n:].tolist() == tok.encode(
        " Hello world", add_special_tokens=False
    )
    # a machine transcript is taken as written (references are upper case: lowered)
    (machine,) = calibration_batches(
        model, processor, [AudioSample("z", audio, "Mr. Smith's HAT", machine=True)]
    )
    assert machine["decoder_input_ids"][0, n:].tolist() == tok.encode(
        " Mr. Smith's HAT", add_special_tokens=False
    )


def test_calibration_data_takes_only_the_loaded_models_own_transcripts(audio_dir):
    from wclust.models import LoadedModel
    from wclust.tasks import TaskData

    (audio_dir / "transcripts.tsv").unlink()
    (audio_dir / "machine_transcripts.tsv").write_text(
        "file\tmodel\ttext\na.wav\twhisper-x\tHello.\n", encoding="utf-8"
    )
    own = TaskData.load(LoadedModel(None, None, "asr", "whisper-x"), str(audio_dir))
    other = TaskData.load(LoadedModel(None, None, "asr", "whisper-y"), str(audio_dir))
    assert [(s.text, s.machine) for s in own.items] == [("Hello.", True), ("", False)]
    assert [s.text for s in other.items] == ["", ""]
