"""Paired bootstrap intervals for the difference of two corpus error rates."""

from __future__ import annotations

import numpy as np
import pytest

from wclust.report.stats import paired_bootstrap


def test_same_errors_give_a_zero_difference_and_interval():
    words = [10, 20, 5, 30]
    assert paired_bootstrap([1, 2, 0, 3], [1, 2, 0, 3], words) == (0.0, 0.0, 0.0)


def test_a_difference_on_every_clip_is_sure_and_one_on_a_single_clip_is_not():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 40, size=100)
    base = rng.binomial(words, 0.1)
    worse = base + rng.binomial(words, 0.03)  # about 3 points more, spread over the clips
    diff, lo, hi = paired_bootstrap(worse, base, words)
    assert diff == pytest.approx(100 * (worse.sum() - base.sum()) / words.sum())
    assert 0 < lo < diff < hi
    one = base.copy()
    one[0] += 8  # the same number of extra edits as a few clips' worth, on one clip
    d1, lo1, hi1 = paired_bootstrap(one, base, words)
    assert d1 > 0 and lo1 <= 0 <= hi1
    # the sign flips with the order, and the seed makes it reproducible
    back = paired_bootstrap(base, worse, words)
    assert back[0] == pytest.approx(-diff) and back[1] == pytest.approx(-hi, abs=0.05)
    assert paired_bootstrap(worse, base, words) == (diff, lo, hi)


def test_the_interval_covers_the_sampling_spread():
    """Over many clip sets drawn from one population, the 95% interval of one set covers
    the population's difference about 95% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        words = rng.integers(5, 40, size=80)
        a = rng.binomial(words, 0.12)
        b = rng.binomial(words, 0.10)
        _, lo, hi = paired_bootstrap(a, b, words, resamples=2000, seed=trial)
        covered += lo <= 2.0 <= hi  # the true difference: 12% - 10%
    assert 50 <= covered <= 60


def test_perplexity_differences_compare_exp_of_the_rate():
    """``scale="exp"``: summed NLL per window over its tokens; the difference is of the
    two perplexities, and a model worse on every window is surely worse."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(100, 300, size=40)
    base = tokens * rng.normal(2.0, 0.3, size=40)  # about 2 nats per token
    worse = base + tokens * rng.normal(0.05, 0.02, size=40)
    diff, lo, hi = paired_bootstrap(worse, base, tokens, scale="exp")
    want = np.exp(worse.sum() / tokens.sum()) - np.exp(base.sum() / tokens.sum())
    assert diff == pytest.approx(want) and 0 < lo < diff < hi
    assert paired_bootstrap(base, base, tokens, scale="exp") == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="scale"):
        paired_bootstrap(base, base, tokens, scale="log")


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1, 2], [1], [3, 4])
    with pytest.raises(ValueError, match="no reference words"):
        paired_bootstrap([], [], [])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1], [1], [3], level=95)
