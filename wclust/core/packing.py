"""Pack and unpack n-bit codes (1..16 bits) into uint8 storage.

Format (every width): a little-endian bit stream. Code ``i`` occupies bits
``[i*b, (i+1)*b)`` of the stream, bit ``t`` of the stream is bit ``t % 8`` of byte
``t // 8``. The stream is padded with zero bits to a whole number of bytes, so
``n`` codes of ``b`` bits take ``ceil(n*b/8)`` bytes. All functions are vectorized
torch code (no Python loop over elements). Codes of up to 8 bits unpack to uint8,
wider codes (vector codebooks, ``core.vector``) to int32.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_CODE_BITS", "pack_codes", "unpack_codes", "packed_nbytes"]

CHUNK = 1 << 20  # codes per batch (a multiple of 8)
MAX_CODE_BITS = 16


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(
            f"code width must be an integer from 1 to {MAX_CODE_BITS} bits, got {bits!r}"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into a uint8 bit stream.

    Args:
        codes: integer tensor of any shape, every value in ``[0, 2**bits)``.
        bits: code width, 1..16.

    Returns:
        1-D uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack them in {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    # Chunks of CHUNK codes (a multiple of 8) fill exactly CHUNK*bits/8 bytes: the
    # int64 temporaries stay bounded however many codes there are.
    for i in range(0, n, CHUNK):
        part = (_pack_part if bits <= 8 else _pack_part_wide)(flat[i : i + CHUNK], bits)
        out[i * bits // 8 : i * bits // 8 + part.numel()] = part
    return out


def _pack_part(flat: torch.Tensor, bits: int) -> torch.Tensor:
    n = flat.numel()
    # Groups of 8 codes fill exactly `bits` bytes, for every width.
    pad = (-n) % 8
    c = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)  # (m, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    word = (c << shifts).sum(dim=1)  # (m,) at most 56 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (m*bits,)
    return out[: packed_nbytes(n, bits)]


def _pack_part_wide(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of 9 to 16 bits: 8 codes fill ``bits`` bytes, more than an int64 word
    holds, so the stream is built bit by bit (one byte per bit, per chunk)."""
    n = flat.numel()
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    stream = ((flat.to(torch.int64)[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)  # (bytes, 8)
    weights = (1 << torch.arange(8, dtype=torch.int64, device=flat.device)).to(torch.uint8)
    out = (stream * weights).sum(1, dtype=torch.int64).to(torch.uint8)
    return out[: packed_nbytes(n, bits)]


def _unpack_part_wide(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)
    stream = stream[: numel * bits].view(numel, bits)  # (codes, bits), LSB first
    weights = 1 << torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream * weights).sum(1).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: 1-D uint8 tensor as returned by ``pack_codes``.
        bits: code width, 1..16.
        numel: number of codes stored.

    Returns:
        1-D tensor of ``numel`` codes: uint8 for up to 8 bits, int32 above.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(
            f"{numel} codes of {bits} bits need {need} packed bytes, got {packed.numel()}"
        )
    if bits == 8:
        return packed.clone()
    if bits > 8:
        out = torch.empty(numel, dtype=torch.int32, device=packed.device)
        step = CHUNK * bits // 8  # bytes of CHUNK codes (CHUNK is a multiple of 8)
        for i in range(0, need, step):
            lo = i * 8 // bits
            hi = min(numel, lo + CHUNK)
            out[lo:hi] = _unpack_part_wide(packed[i : i + step], bits, hi - lo)
        return out
    if bits == 4:  # the hot path of compressed modules: two codes per byte
        out = torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)
        return out[:numel]
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    step = CHUNK * bits // 8  # bytes of CHUNK codes
    for i in range(0, need, step):
        codes = _unpack_part(packed[i : i + step], bits)
        lo = i * 8 // bits
        hi = min(numel, lo + codes.numel())
        out[lo:hi] = codes[: hi - lo]
    return out


def _unpack_part(packed: torch.Tensor, bits: int) -> torch.Tensor:
    need = packed.numel()
    groups = (need * 8 // bits + 7) // 8
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - need)).view(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=1)  # (groups,)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((word[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
