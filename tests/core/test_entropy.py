import numpy as np
import pytest

from wclust.core.entropy import (
    CODERS,
    EntropyError,
    decode_codes,
    decode_gaps,
    decode_symbols,
    encode_codes,
    encode_gaps,
    encode_symbols,
    entropy_bits,
)

RNG = np.random.default_rng(0)
STREAMS = {
    "empty": np.zeros(0, np.uint8),
    "one-symbol": np.full(1000, 7, np.uint8),
    "single": np.array([255], np.uint8),
    "all-256": RNG.permutation(np.repeat(np.arange(256), 3)).astype(np.uint8),
    "skewed": RNG.choice(5, 20000, p=[0.9, 0.05, 0.03, 0.015, 0.005]).astype(np.uint8),
    "two-far-apart": np.array([0, 200, 0, 0, 200], np.uint8),
}


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("name", list(STREAMS))
def test_symbols_round_trip_exactly(coder, name):
    x = STREAMS[name]
    blob = encode_symbols(x, coder)
    y, end = decode_symbols(blob, x.size)
    assert end == len(blob)
    assert y.dtype == np.uint8 and np.array_equal(y, x)


@pytest.mark.parametrize("coder", CODERS)
def test_skewed_stream_is_near_its_entropy(coder):
    x = STREAMS["skewed"]
    ideal = entropy_bits(np.bincount(x)) / 8
    size = len(encode_symbols(x, coder))
    assert size < x.size * 3 / 8  # far below the 3-bit fixed width
    if coder == "ans":  # within a few percent of the entropy (tables included)
        assert size < 1.05 * ideal + 40
    else:  # a prefix code pays >= 1 bit a symbol: here 0.9*1 + 0.05*2 + 0.03*3 + 0.02*4
        assert x.size / 8 < size < 1.18 * x.size / 8 + 40


def test_bad_symbols_and_coder_are_rejected():
    with pytest.raises(ValueError, match="256"):
        encode_symbols(np.array([256]))
    with pytest.raises(ValueError, match="coder"):
        encode_symbols(np.array([1, 2]), "lzw")


@pytest.mark.parametrize("coder", CODERS)
def test_truncated_or_corrupt_streams_raise_entropy_error(coder):
    x = STREAMS["skewed"]
    blob = encode_symbols(x, coder)
    for bad in (blob[:-5], blob[:3], blob[: len(blob) // 2]):
        with pytest.raises(EntropyError):
            decode_symbols(bad, x.size)
    flipped = bytearray(blob)
    flipped[len(blob) - 20] ^= 0x5A  # inside the compressed words
    with pytest.raises(EntropyError):
        decode_symbols(bytes(flipped), x.size)
    with pytest.raises(EntropyError, match="expected"):
        decode_symbols(blob, x.size + 1)
    wrong_coder = bytearray(blob)
    wrong_coder[0] = 9
    with pytest.raises(EntropyError, match="coder"):
        decode_symbols(bytes(wrong_coder))


@pytest.mark.parametrize("escape", [1, 3, 255])
def test_gaps_round_trip_with_fillers(escape):
    pos = np.array([0, 1, 5, 600, 601, 5000])
    g = encode_gaps(pos, escape)
    assert g.max() <= escape
    assert np.array_equal(decode_gaps(g, escape), pos)
    assert encode_gaps(np.array([], np.int64), escape).size == 0


def test_gap_symbols_by_hand():
    # gaps: 2 (pos 2), 0 (pos 3), 7 (pos 11) -> with escape 3: 2 | 0 | 3 3 1
    assert encode_gaps(np.array([2, 3, 11]), 3).tolist() == [2, 0, 3, 3, 1]


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("density", [0.0, 0.08, 1.0])
def test_codes_round_trip_sparse_and_dense(coder, density):
    n = 5000
    codes = np.where(RNG.random(n) < density, RNG.integers(1, 32, n), 0).astype(np.uint8)
    for sparse in (False, True):
        blob, info = encode_codes(codes, coder, sparse)
        assert np.array_equal(decode_codes(blob, info, n), codes)
    if density == 0.08:  # the sparse index pays on a pruned weight
        sparse_blob, _ = encode_codes(codes, coder, True)
        assert len(sparse_blob) < n * 5 / 8 / 2.5


def test_codes_with_bad_info_raise():
    codes = np.array([0, 0, 3, 0, 1], np.uint8)
    blob, info = encode_codes(codes, "ans", True)
    with pytest.raises(EntropyError, match="layout"):
        decode_codes(blob, {"layout": "zigzag"}, 5)
    with pytest.raises(EntropyError):
        decode_codes(blob, info, 2)  # positions beyond the weight
    with pytest.raises(EntropyError, match="unexpected bytes"):
        decode_codes(blob + b"\0", info, 5)
