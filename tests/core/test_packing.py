import pytest
import torch

from wclust.core.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, 4097])
def test_round_trip_every_width_and_length(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_layout_is_little_endian_bit_stream():
    # 3-bit codes 1, 2, 7: bits 100 010 111 (LSB first) -> byte0 = 0b11010001, byte1 = 0b1
    packed = pack_codes(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b1]
    # 4-bit: low nibble first
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]


def test_out_of_range_codes_and_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 10)


@pytest.mark.parametrize("bits", range(1, 8))
def test_round_trip_across_batches(bits, monkeypatch):
    """Packing works in batches of CHUNK codes: lengths around batch edges round-trip."""
    import wclust.core.packing as packing

    whole = {n: pack_codes(torch.arange(n, dtype=torch.uint8) % (1 << bits), bits) for n in (1, 50)}
    monkeypatch.setattr(packing, "CHUNK", 16)
    for n in (15, 16, 17, 32, 33, 50):
        codes = torch.arange(n, dtype=torch.uint8) % (1 << bits)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(packed, whole[50])  # same bytes as one batch
