import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import pack, packed_length, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    storage=st.sampled_from([torch.uint8, torch.int32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_bit_exact(bits, rows, cols, storage, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits, storage)
    assert packed.dtype == storage
    assert packed.shape == (rows, packed_length(cols, bits, storage))
    assert torch.equal(unpack(packed, bits, cols, storage), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_packing_is_dense(bits):
    codes = torch.randint(0, 1 << bits, (4, 96), dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits, torch.uint8)
    assert packed.numel() * 8 == codes.numel() * bits  # no wasted bits when 96*bits divides 8


def test_int4_int32_layout_matches_gptq_convention():
    # eight 4-bit codes per int32 word, the first code in the lowest nibble
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack(codes, 4, torch.int32)[0, 0].item() & 0xFFFFFFFF
    assert word == 0xF7654321


def test_three_bit_codes_span_byte_boundaries():
    codes = torch.tensor([[7, 0, 5, 2, 1, 6, 3, 4]], dtype=torch.uint8)
    packed = pack(codes, 3, torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert packed[0].tolist() == [(stream >> (8 * k)) & 0xFF for k in range(3)]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)


def test_bad_bits_and_storage():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="storage"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 4, torch.int16)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("storage", [torch.uint8, torch.int32])
def test_packing_a_row_at_a_time_gives_the_same_words(monkeypatch, bits, storage):
    """Large tensors are packed in chunks of rows (bounded temporaries): the words do not depend on
    where the chunks fall."""
    from lowbit.formats import packing

    codes = torch.randint(0, 2**bits, (37, 45), generator=torch.Generator().manual_seed(bits))
    whole = pack(codes, bits, storage)
    monkeypatch.setattr(packing, "_CHUNK_BYTES", 1)  # one row per chunk
    assert torch.equal(pack(codes, bits, storage), whole)
    assert torch.equal(unpack(whole, bits, 45, storage), codes.to(torch.uint8))
