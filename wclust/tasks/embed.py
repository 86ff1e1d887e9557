"""Sentence embeddings: how close a compressed encoder stays to the original.

Data is a UTF-8 text file with one sentence per line (blank lines and lines starting
with ``#`` are skipped); the built-in ``wclust/data/sentences.txt`` holds 256 verses
of the World English Bible (public domain), picked by ``scripts/make_text_data.py``.

Embeddings: the encoder's last hidden state, mean-pooled over the attention mask and
L2-normalized (all-MiniLM-L6-v2's own recipe: Transformer -> mean Pooling -> Normalize),
one sentence per forward pass (latency is per sentence), at most ``MAX_LENGTH`` tokens.

Metrics against the original model's embeddings of the same sentences (the
*reference*, see :func:`reference`): ``cos_sim`` (mean cosine similarity, 1 = the same
direction), ``cos_min`` (the worst sentence), and ``nn_recall`` (percent of sentences
whose nearest other sentence, by cosine, is the same under both models: recall@1 of the
original's neighbours). ``wclust compare`` computes the reference once per run in its
own process from the source model and stores it in ``OUT/reference/`` (safetensors),
so every cell is scored against the same tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

MAX_LENGTH = 128
"""Token limit per sentence (all-MiniLM-L6-v2 was trained with 128)."""

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class Sentences:
    name: str
    sentences: list[str]


def builtin_sentences() -> Path:
    return _DATA_DIR / "sentences.txt"


def load_sentences(path: str | Path | None, limit: int | None = None, every: int = 1) -> Sentences:
    """Sentences from a text file, one per line (default: the built-in set).

    Raises:
        ValueError: no such file, fewer than 2 sentences, or bad limit/every.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    p = Path(path) if path is not None else builtin_sentences()
    if not p.is_file():
        raise ValueError(f"sentence file {p} not found; pass a UTF-8 file, one sentence a line")
    lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")][::every]
    if limit is not None:
        lines = lines[:limit]
    if len(lines) < 2:
        raise ValueError(f"{p}: need at least 2 sentences to compare neighbours")
    return Sentences(str(p), lines)


def _embed_one(model, tokenizer, sentence: str):
    import torch

    enc = tokenizer(sentence, return_tensors="pt", truncation=True, max_length=MAX_LENGTH)
    hidden = model(**enc).last_hidden_state  # (1, T, d)
    mask = enc["attention_mask"][..., None].to(hidden.dtype)  # (1, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (1, d)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)[0]


def embed(model, tokenizer, data: Sentences, *, warmup: bool = True):
    """Embeddings of every sentence and per-sentence latency.

    Returns:
        (embeddings (n, d) float32, L2-normalized; latencies in seconds).
    """
    import torch

    if tokenizer is None:
        raise ValueError("the embed task needs the model's tokenizer; none was found")
    model.eval()
    out, latency = [], []
    with torch.inference_mode():
        if warmup:
            _embed_one(model, tokenizer, data.sentences[0])
        for s in data.sentences:
            t0 = time.perf_counter()
            out.append(_embed_one(model, tokenizer, s))
            latency.append(time.perf_counter() - t0)
    return torch.stack(out), latency


def reference(model, tokenizer, data: Sentences) -> dict:
    """The original model's embeddings, ``{"embeddings": (n, d)}``."""
    emb, _ = embed(model, tokenizer, data, warmup=False)
    return {"embeddings": emb}


def nearest_neighbours(emb):
    """Index of each row's most cosine-similar other row. ``emb``: (n, d), unit rows."""
    import torch

    sim = emb @ emb.T  # (n, n)
    sim.fill_diagonal_(-float("inf"))
    return torch.argmax(sim, dim=1)


def compare_embeddings(emb, ref) -> dict:
    """``cos_sim``, ``cos_min`` and ``nn_recall`` (percent) of ``emb`` against ``ref``."""
    if emb.shape != ref.shape:
        raise ValueError(
            f"embeddings {tuple(emb.shape)} and reference {tuple(ref.shape)} differ in shape; "
            "was the reference made from other data?"
        )
    cos = (emb * ref).sum(1)  # rows are unit vectors
    agree = (nearest_neighbours(emb) == nearest_neighbours(ref)).float().mean()
    return {
        "cos_sim": float(cos.mean()),
        "cos_min": float(cos.min()),
        "nn_recall": 100.0 * float(agree),
    }


def evaluate(model, tokenizer, data: Sentences, reference: dict | None = None) -> dict:
    """Embeds ``data`` and scores it against ``reference`` (when given).

    Returns:
        ``quality`` (cos_sim, cos_min, nn_recall; empty without a reference),
        ``latency_s`` (per sentence), ``n_sentences``.
    """
    emb, latency = embed(model, tokenizer, data)
    quality = compare_embeddings(emb, reference["embeddings"]) if reference else {}
    return {"quality": quality, "latency_s": latency, "n_sentences": len(data.sentences)}
