"""Entropy coding of symbol streams (cluster codes, sparse-position gaps).

The coders come from ``constriction`` (Rust, maintained by R. Bamler): ``"huffman"``
(Deep Compression's choice: a prefix code, at least 1 bit per symbol) and ``"ans"``
(asymmetric numeral systems: within a fraction of a percent of the entropy, and
vectorized, so much faster on large tensors). Both are static: the symbol counts are
stored with the stream and both sides build the same model from them.

One encoded stream is self-describing bytes (little-endian)::

    u8   coder          0 empty/constant, 1 huffman, 2 ans
    u32  n              number of symbols
    u32  crc32          of the decoded symbols as uint8 (catches corrupt payloads)
    constant:  u8 symbol
    huffman/ans:
      u16 alphabet      table entries (symbols 0 .. alphabet-1)
      u16 x alphabet    symbol counts scaled to at most 65535 (0 = unused symbol)
      u32 n_words       then n_words u32 words of compressed bits

Every byte above is counted in reported sizes. Symbols are at most 8 bits (0..255).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = [
    "CODERS",
    "EntropyError",
    "best_escape",
    "decode_codes",
    "decode_gaps",
    "decode_symbols",
    "encode_codes",
    "encode_gaps",
    "encode_symbols",
    "entropy_bits",
]

CODERS = ("huffman", "ans")
_IDS = {"const": 0, "huffman": 1, "ans": 2}


class EntropyError(ValueError):
    """An encoded stream is truncated or corrupt."""


def _constriction():
    try:
        import constriction
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError(
            "entropy coding needs the 'constriction' package: pip install constriction"
        ) from None
    return constriction


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon bits to code a stream with these symbol counts (the ideal payload)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    return float(-(c * np.log2(c / c.sum())).sum())


def _table(symbols: np.ndarray) -> np.ndarray:
    counts = np.bincount(symbols, minlength=int(symbols.max()) + 1).astype(np.float64)
    # Scale into u16 keeping every used symbol at >= 1, so the table costs 2 bytes
    # a symbol and both sides see the same (integer) model.
    scaled = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0)
    return scaled.astype(np.uint16)


def encode_symbols(symbols, coder: str = "ans") -> bytes:
    """Entropy-code a 1-D stream of symbols in 0..255.

    Args:
        symbols: integer array-like, values in [0, 256).
        coder: "huffman" or "ans".

    Returns:
        The self-describing encoded bytes (see the module docstring).
    """
    if coder not in CODERS:
        raise ValueError(f"unknown entropy coder {coder!r}; choose {', '.join(CODERS)}")
    s = np.ascontiguousarray(np.asarray(symbols).reshape(-1))
    if s.size and (s.min() < 0 or s.max() > 255):
        raise ValueError("symbols must lie in [0, 256)")
    s = s.astype(np.uint8)
    n = s.size
    head = struct.pack("<IL", n, zlib.crc32(s.tobytes()))
    if n == 0 or (s == s[0]).all():
        return struct.pack("<B", 0) + head + struct.pack("<B", int(s[0]) if n else 0)
    table = _table(s)
    c = _constriction()
    probs = table.astype(np.float64)
    if coder == "ans":
        enc = c.stream.stack.AnsCoder()
        enc.encode_reverse(s.astype(np.int32), c.stream.model.Categorical(probs, perfect=False))
        words = enc.get_compressed()
    else:
        tree = c.symbol.huffman.EncoderHuffmanTree(probs)
        enc = c.symbol.QueueEncoder()
        for sym in s.tolist():  # constriction's Huffman coder takes one symbol a call
            enc.encode_symbol(sym, tree)
        words, _ = enc.get_compressed_and_bitrate()
    words = np.ascontiguousarray(words, dtype="<u4")
    return b"".join(
        [
            struct.pack("<B", _IDS[coder]),
            head,
            struct.pack("<H", table.size),
            table.astype("<u2").tobytes(),
            struct.pack("<I", words.size),
            words.tobytes(),
        ]
    )


def _read(buf: memoryview, pos: int, fmt: str):
    size = struct.calcsize(fmt)
    if pos + size > len(buf):
        raise EntropyError("encoded stream is truncated")
    return struct.unpack_from(fmt, buf, pos), pos + size


def decode_symbols(data: bytes, expected_n: int | None = None, offset: int = 0):
    """Inverse of :func:`encode_symbols`.

    Args:
        data: bytes holding the stream at ``offset``.
        expected_n: if given, the stream must hold exactly this many symbols.
        offset: where the stream starts in ``data``.

    Returns:
        ``(symbols as a uint8 array, offset just past the stream)``.

    Raises:
        EntropyError: truncated or corrupt stream (wrong length, checksum, table).
    """
    buf = memoryview(data)
    (cid, n, crc), pos = _read(buf, offset, "<BIL")
    if expected_n is not None and n != expected_n:
        raise EntropyError(f"stream holds {n} symbols, expected {expected_n}")
    if cid == 0:
        (sym,), pos = _read(buf, pos, "<B")
        out = np.full(n, sym, dtype=np.uint8)
    elif cid in (1, 2):
        (k,), pos = _read(buf, pos, "<H")
        if pos + 2 * k > len(buf):
            raise EntropyError("encoded stream is truncated (code table)")
        table = np.frombuffer(buf, dtype="<u2", count=k, offset=pos).astype(np.float64)
        pos += 2 * k
        if k < 2 or (table > 0).sum() < 2:
            raise EntropyError("corrupt code table")
        (n_words,), pos = _read(buf, pos, "<I")
        if pos + 4 * n_words > len(buf):
            raise EntropyError("encoded stream is truncated (payload)")
        words = np.frombuffer(buf, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
        pos += 4 * n_words
        out = _run_decoder(cid, table, words, n)
    else:
        raise EntropyError(f"unknown coder id {cid}")
    if out.size and int(out.max()) >= 256:
        raise EntropyError("decoded symbol out of range")
    out = out.astype(np.uint8)
    if zlib.crc32(out.tobytes()) != crc:
        raise EntropyError("decoded symbols fail their checksum: the payload is corrupt")
    return out, pos


def _run_decoder(cid: int, table: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    c = _constriction()
    try:
        if cid == 2:
            dec = c.stream.stack.AnsCoder(words)
            out = np.asarray(dec.decode(c.stream.model.Categorical(table, perfect=False), n))
            if not dec.is_empty():
                raise EntropyError("encoded stream has trailing data: corrupt payload")
            return out
        tree = c.symbol.huffman.DecoderHuffmanTree(table)
        dec = c.symbol.QueueDecoder(words)
        return np.fromiter((dec.decode_symbol(tree) for _ in range(n)), dtype=np.int64, count=n)
    except EntropyError:
        raise
    except Exception as e:  # constriction raises ValueError/AssertionError on bad data
        raise EntropyError(f"corrupt entropy-coded payload: {e}") from None


def encode_gaps(positions: np.ndarray, escape: int) -> np.ndarray:
    """Sparse positions as gap symbols, Deep Compression style.

    ``gap_i = p_i - p_{i-1} - 1`` (with ``p_{-1} = -1``); a gap of ``escape`` or more
    is written as ``gap // escape`` filler symbols ``escape`` (each: skip ``escape``
    positions, no weight) followed by ``gap % escape``.

    Args:
        positions: strictly increasing non-negative integers.
        escape: filler symbol, 1..255.

    Returns:
        uint8 symbols in [0, escape].
    """
    if not 1 <= escape <= 255:
        raise ValueError("escape must be in 1..255")
    p = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(p, prepend=-1) - 1
    if gaps.size and gaps.min() < 0:
        raise ValueError("positions must be strictly increasing and non-negative")
    fill = gaps // escape
    reps = fill + 1
    out = np.full(int(reps.sum()), escape, dtype=np.uint8)
    out[np.cumsum(reps) - 1] = (gaps % escape).astype(np.uint8)
    return out


def decode_gaps(symbols: np.ndarray, escape: int) -> np.ndarray:
    """Inverse of :func:`encode_gaps`: the int64 positions."""
    s = np.asarray(symbols, dtype=np.int64)
    step = np.where(s == escape, escape, s + 1)
    return (np.cumsum(step) - 1)[s != escape]


def best_escape(positions: np.ndarray, coder: str = "ans") -> tuple[int, bytes]:
    """The filler symbol whose encoded gap stream (table included) is smallest.

    Returns:
        ``(escape, encoded gap stream)``.
    """
    best = None
    for esc in (3, 7, 15, 31, 63, 127, 255):
        blob = encode_symbols(encode_gaps(positions, esc), coder)
        if best is None or len(blob) < len(best[1]):
            best = (esc, blob)
    return best


def encode_codes(codes: np.ndarray, coder: str, sparse: bool) -> tuple[bytes, dict]:
    """Entropy-code the cluster codes of one weight.

    Args:
        codes: 1-D uint8 codes in flat (row-major) order.
        coder: "huffman" or "ans".
        sparse: code 0 means a pruned (exactly zero) weight: store the positions of
            the other weights as gap symbols plus their codes minus one, as Deep
            Compression does, instead of one code per weight.

    Returns:
        ``(bytes, info)``: info (JSON-able) holds what decoding needs besides the
        bytes: ``layout`` and, when sparse, ``escape``.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if not sparse:
        return encode_symbols(codes, coder), {"layout": "dense"}
    pos = np.flatnonzero(codes)
    escape, gap_blob = best_escape(pos, coder)
    blob = gap_blob + encode_symbols(codes[pos] - 1, coder)
    return blob, {"layout": "sparse", "escape": escape}


def decode_codes(data: bytes, info: dict, numel: int) -> np.ndarray:
    """Inverse of :func:`encode_codes`: ``numel`` uint8 codes.

    Raises:
        EntropyError: the bytes or ``info`` are corrupt or do not match ``numel``.
    """
    layout = info.get("layout") if isinstance(info, dict) else None
    if layout == "dense":
        out, end = decode_symbols(data, numel)
    elif layout == "sparse":
        escape = info.get("escape")
        if not isinstance(escape, int) or not 1 <= escape <= 255:
            raise EntropyError(f"bad escape symbol {escape!r}")
        gaps, mid = decode_symbols(data)
        pos = decode_gaps(gaps, escape)
        vals, end = decode_symbols(data, pos.size, mid)
        if pos.size and (pos[-1] >= numel or int(vals.max()) == 255):
            raise EntropyError("sparse positions or codes out of range")
        out = np.zeros(numel, dtype=np.uint8)
        out[pos] = vals + 1
    else:
        raise EntropyError(f"unknown entropy layout {layout!r}")
    if end != len(data):
        raise EntropyError(f"{len(data) - end} unexpected bytes after the encoded codes")
    return out
