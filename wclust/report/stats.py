"""How sure a difference between two models' error rates on the same items is.

A corpus error rate is ``sum(edits) / sum(words)`` over items (clips, images, text
windows). Two models scored on the same items differ partly by chance: which items
happen to be in the set. The paired bootstrap (Koehn 2004; Bisani and Ney 2004 for WER)
resamples the items with replacement, recomputes both corpus rates on each resample
and reads the spread of their difference. A 95% interval that excludes 0 says the
difference is unlikely to come from the choice of items alone; it says nothing about
other data. Perplexity is the same with ``exp`` of the rate (nats per token).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap"]


def paired_bootstrap(
    edits_a: Sequence[float],
    edits_b: Sequence[float],
    words: Sequence[float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    scale: str = "percent",
) -> tuple[float, float, float]:
    """The difference of two corpus error rates on the same items, with its interval.

    Args:
        edits_a, edits_b: per-item edit counts of model a and model b.
        words: per-item reference lengths (the same references for both).
        resamples: bootstrap resamples of the items.
        level: coverage of the percentile interval.
        seed: the resampling's seed (the interval is reproducible).
        scale: ``"percent"`` compares ``100 * rate``; ``"exp"`` compares ``exp(rate)``
            (perplexity, with summed NLL in nats as edits and tokens as words).

    Returns:
        ``(a - b, low, high)`` on that scale (percentage points, or perplexity): the
        difference on all items and the ``level`` percentile interval of the
        resampled differences.

    Raises:
        ValueError: lengths differ, no items, no reference words, or an unknown scale.
    """
    a, b, n = (np.asarray(v, dtype=np.float64) for v in (edits_a, edits_b, words))
    if not (a.shape == b.shape == n.shape) or a.ndim != 1:
        raise ValueError(
            f"per-item counts must be three 1-D sequences of one length, got "
            f"{a.shape}, {b.shape}, {n.shape}"
        )
    if not a.size or n.sum() <= 0:
        raise ValueError("no reference words to compute an error rate on")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if scale not in ("percent", "exp"):
        raise ValueError(f"scale must be 'percent' or 'exp', got {scale!r}")

    def diff_of(sa, sb, total):
        if scale == "exp":
            return np.exp(sa / total) - np.exp(sb / total)
        return 100.0 * (sa - sb) / total

    diff = diff_of(a.sum(), b.sum(), n.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    counts = np.zeros((resamples, a.size))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    total = counts @ n
    keep = total > 0
    d = diff_of((counts @ a)[keep], (counts @ b)[keep], total[keep])
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(diff), float(lo), float(hi)
