import pytest
import torch

from wclust.core.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, 4097])
def test_round_trip_every_width_and_length(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    wide = torch.int32 if bits > 8 else torch.uint8  # what unpack_codes gives back
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(wide)
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


@pytest.mark.parametrize("bits", [9, 11, 12, 13, 16])
def test_wide_codes_follow_the_same_bit_stream(bits):
    """Codes wider than a byte: the stream a plain Python bit loop writes."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (21,), generator=g).tolist()
    stream = [(c >> t) & 1 for c in codes for t in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [sum(stream[i + t] << t for t in range(8)) for i in range(0, len(stream), 8)]
    assert pack_codes(torch.tensor(codes), bits).tolist() == want
    # 12-bit codes 0xABC, 0x123: bytes BC, 3A, 12
    assert pack_codes(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]


def test_out_of_range_codes_and_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)
    for bits in (0, 17):
        with pytest.raises(ValueError, match="1 to 16"):
            pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 10)


@pytest.mark.parametrize("bits", [*range(1, 8), 9, 10, 15, 16])
def test_round_trip_across_batches(bits, monkeypatch):
    """Packing works in batches of CHUNK codes: lengths around batch edges round-trip."""
    import wclust.core.packing as packing

    dt = torch.int32 if bits > 8 else torch.uint8
    span = 1 << bits
    whole = {n: pack_codes((torch.arange(n) * 977 % span).to(dt), bits) for n in (1, 50)}
    monkeypatch.setattr(packing, "CHUNK", 16)
    for n in (15, 16, 17, 32, 33, 50):
        codes = (torch.arange(n) * 977 % span).to(dt)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(packed, whole[50])  # same bytes as one batch
