import math

import pytest
import torch

from tests.conftest import tiny_gpt2
from wclust.tasks import get_task
from wclust.tasks.lm import TextData, builtin_text, evaluate, load_text, windows


def test_windows_score_every_token_once():
    data = TextData("t", "x", window=8, stride=3)
    wins = windows(20, data)
    scored = [p for _, e, f in wins for p in range(f, e)]
    assert scored == list(range(1, 20))
    assert all(e - s <= 8 for s, e, _ in wins)
    # every scored token after the first window has >= window - stride tokens of context
    assert all(f - s >= 8 - 3 for s, _, f in wins[1:])


def test_windows_every_and_limit():
    data = TextData("t", "x", window=8, stride=4, every=2, limit=2)
    full = windows(40, TextData("t", "x", window=8, stride=4))
    assert windows(40, data) == full[::2][:2]


def test_builtin_text_and_bad_input(tmp_path):
    assert "Naomi" in builtin_text().read_text(encoding="utf-8")
    assert load_text(None).text.startswith("It happened")
    with pytest.raises(ValueError, match="not found"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="every"):
        load_text(None, every=0)


def test_perplexity_matches_a_direct_computation(char_tokenizer):
    model = tiny_gpt2()
    text = "in the beginning god created the heavens and the earth. " * 3
    # one window holding everything: perplexity = exp(HF's mean next-token loss)
    data = TextData("t", text, max_tokens=30, window=30, stride=30)
    r = evaluate(model, char_tokenizer, data)
    ids = char_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :30]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert r["n_tokens"] == 29 and r["n_windows"] == 1
    assert r["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    # sliding windows score the same tokens with less context: close, not equal
    r2 = evaluate(model, char_tokenizer, TextData("t", text, max_tokens=30, window=12, stride=6))
    assert r2["n_tokens"] == 29 and r2["n_windows"] > 1 and len(r2["latency_s"]) == r2["n_windows"]
    assert 1 < r2["ppl"] < 10 * r["ppl"]
    # per-window NLL and tokens (paired intervals) give back the perplexity
    items = r2["item_errors"]
    assert items["metric"] == "ppl" and len(items["edits"]) == r2["n_windows"]
    assert sum(items["words"]) == 29
    assert math.exp(sum(items["edits"]) / 29) == pytest.approx(r2["ppl"], rel=1e-9)


def test_registered_task_and_calibration(char_tokenizer):
    task = get_task("lm")
    assert task.lower_is_better and task.reference is None
    model = tiny_gpt2()
    data = task.load_data(None, 2)
    data.max_tokens, data.window, data.stride = 64, 32, 16  # tiny GPT-2: 32 positions
    r = task.evaluate(model, char_tokenizer, data)
    assert set(r["quality"]) == {"ppl"} and r["quality"]["ppl"] > 1
    batches = task.calibration_batches(model, char_tokenizer, data)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (1, 64)  # chunks of 256
    out = model(**{k: v[:, :32] for k, v in batches[0].items()})
    assert torch.isfinite(out.loss)


def test_lm_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(tiny_gpt2(), None, TextData("t", "abc"))
