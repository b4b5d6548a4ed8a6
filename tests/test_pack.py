"""gsrq.pack against an independent numpy implementation of docs/format.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsrq import CodebookFormatError, InvalidValueError, ShapeError
from gsrq.pack import pack_codes, packed_size, unpack_codes

# ---------------------------------------------------------------- the oracle
# Built from np.packbits / np.unpackbits with bitorder="little": stream bit j
# is bit j % 8 of byte j // 8, code i is stream bits [i*b, (i+1)*b), LSB first.


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    c = np.asarray(codes).astype(np.uint64)
    lead, n = c.shape[:-1], c.shape[-1]
    stream = ((c[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = stream.reshape(*lead, n * bits)
    out = np.packbits(stream, axis=-1, bitorder="little")
    return out.reshape(*lead, (n * bits + 7) // 8)


def np_unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    lead = packed.shape[:-1]
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    stream = stream.reshape(*lead, count, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.uint16)


def _dtypes_for(bits: int) -> list[np.dtype]:
    out = []
    for dt in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64):
        if np.iinfo(dt).max >= (1 << bits) - 1:
            out.append(np.dtype(dt))
    return out


@st.composite
def code_arrays(draw):
    bits = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(_dtypes_for(bits)))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim - 1, max_size=ndim - 1))) + (
        draw(st.integers(0, 70)),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=shape, dtype=np.int64).astype(dtype)
    return codes, bits


# -------------------------------------------------------------------- layout


def test_known_bytes():
    # 3-bit codes 1..5: stream 100 010 110 001 101 (LSB first) + one pad bit
    assert pack_codes(np.array([1, 2, 3, 4, 5]), 3).tolist() == [0xD1, 0x58]
    assert pack_codes(np.array([0x1234], np.uint16), 16).tolist() == [0x34, 0x12]
    assert pack_codes(np.array([0x3FF, 0]), 10).tolist() == [0xFF, 0x03, 0x00]
    assert unpack_codes(np.array([0xD1, 0x58], np.uint8), 3, 5).tolist() == [1, 2, 3, 4, 5]


@settings(max_examples=300, deadline=None)
@given(code_arrays())
def test_round_trip_matches_numpy_oracle(case):
    codes, bits = case
    packed = pack_codes(codes, bits)
    n = codes.shape[-1]
    assert packed.dtype == np.uint8
    assert packed.shape == codes.shape[:-1] + (packed_size(n, bits),)
    np.testing.assert_array_equal(packed, np_pack(codes, bits))
    back = unpack_codes(packed, bits, n)
    assert back.dtype == np.uint16
    assert back.shape == codes.shape
    np.testing.assert_array_equal(back, codes.astype(np.uint16))


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1), extra=st.integers(0, 9))
def test_unpack_matches_numpy_oracle_on_random_bytes(bits, n, seed, extra):
    """Any byte string unpacks as the oracle says; extra trailing bytes are ignored."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=packed_size(n, bits) + extra, dtype=np.uint8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), np_unpack(packed, bits, n))


def test_trailing_pad_bits_are_zero():
    for bits in range(1, 17):
        for n in range(1, 17):
            packed = pack_codes(np.full(n, (1 << bits) - 1), bits)
            used = n * bits
            stream = np.unpackbits(packed, bitorder="little")
            assert stream[:used].all() and not stream[used:].any(), (bits, n)


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 12, 13, 16])
def test_large_inputs_take_the_parallel_path(bits):
    rng = np.random.default_rng(bits)
    flat = rng.integers(0, 1 << bits, size=600_001, dtype=np.int64)
    np.testing.assert_array_equal(pack_codes(flat, bits), np_pack(flat, bits))
    rows = rng.integers(0, 1 << bits, size=(9000, 37), dtype=np.int32)
    packed = pack_codes(rows, bits)
    np.testing.assert_array_equal(packed, np_pack(rows, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), rows)
    np.testing.assert_array_equal(unpack_codes(pack_codes(flat, bits), bits, flat.size), flat)


def test_each_row_is_padded_to_whole_bytes():
    codes = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)  # 3 codes x 3 bits = 9 bits -> 2 bytes/row
    packed = pack_codes(codes, 3)
    assert packed.shape == (2, 2)
    np.testing.assert_array_equal(packed[0], pack_codes(codes[0], 3))
    np.testing.assert_array_equal(packed[1], pack_codes(codes[1], 3))


def test_non_contiguous_and_foreign_byte_order_inputs():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1024, size=(6, 40), dtype=np.int64)
    view = base[::2, ::3]
    np.testing.assert_array_equal(pack_codes(view, 10), np_pack(np.ascontiguousarray(view), 10))
    big_endian = base.astype(">u2")
    np.testing.assert_array_equal(pack_codes(big_endian, 10), np_pack(base, 10))
    packed = pack_codes(base, 10)
    wide = np.zeros((6, packed.shape[1] * 2), np.uint8)
    wide[:, : packed.shape[1]] = packed
    np.testing.assert_array_equal(unpack_codes(wide[:, : packed.shape[1]], 10, 40), base)
    assert pack_codes([3, 1, 2], 2).tolist() == [0b10_01_11]


def test_agrees_with_torch_reference():
    torch = pytest.importorskip("torch")
    from gsrq.reference import pack_codes_torch, unpack_codes_torch

    rng = np.random.default_rng(1)
    for bits in range(1, 17):
        codes = rng.integers(0, 1 << bits, size=(3, 4, 29), dtype=np.int64)
        ours = pack_codes(codes, bits)
        theirs = pack_codes_torch(torch.from_numpy(codes), bits).numpy()
        np.testing.assert_array_equal(ours, theirs)
        back = unpack_codes_torch(torch.from_numpy(ours), bits, 29).numpy()
        np.testing.assert_array_equal(back, codes)


def test_packed_size():
    for bits in range(1, 17):
        for n in (0, 1, 7, 8, 9, 1000):
            assert packed_size(n, bits) == -(-n * bits // 8)
    with pytest.raises(InvalidValueError, match="count"):
        packed_size(-1, 4)
    with pytest.raises(InvalidValueError, match="bits"):
        packed_size(4, 0)


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [0, 17, -1, 100])
def test_bad_bits(bits):
    with pytest.raises(InvalidValueError, match=f"got {bits}"):
        pack_codes(np.zeros(4, np.uint8), bits)
    with pytest.raises(InvalidValueError, match=f"got {bits}"):
        unpack_codes(np.zeros(4, np.uint8), bits, 1)


def test_non_integer_bits():
    with pytest.raises(InvalidValueError, match="bits must be an integer"):
        pack_codes(np.zeros(4, np.uint8), 4.0)
    with pytest.raises(InvalidValueError, match="bits must be an integer"):
        pack_codes(np.zeros(4, np.uint8), True)


def test_code_too_large_names_value_and_index():
    codes = np.array([1, 2, 300, 7, 400], np.uint16)
    with pytest.raises(InvalidValueError, match=r"code 300 at index 2 does not fit in 8 bits"):
        pack_codes(codes, 8)
    grid = np.zeros((2, 3, 4), np.int32)
    grid[1, 2, 3] = 16
    with pytest.raises(InvalidValueError, match=r"code 16 at index \(1, 2, 3\) does not fit in 4 bits"):
        pack_codes(grid, 4)
    huge = np.array([0, np.iinfo(np.uint64).max], np.uint64)
    with pytest.raises(InvalidValueError, match=str(np.iinfo(np.uint64).max)):
        pack_codes(huge, 16)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_negative_code(dtype):
    with pytest.raises(InvalidValueError, match=r"code -5 at index 3"):
        pack_codes(np.array([0, 1, 2, -5, 3], dtype), 4)


def test_non_integer_codes():
    for bad in (np.zeros(3, np.float32), np.zeros(3, bool), np.array(["a"])):
        with pytest.raises(ShapeError, match="integer dtype"):
            pack_codes(bad, 4)
    with pytest.raises(ShapeError, match="0-d"):
        pack_codes(np.int64(3), 4)


def test_unpack_errors():
    with pytest.raises(ShapeError, match="need 4 bytes, got 3"):
        unpack_codes(np.zeros(3, np.uint8), 10, 3)
    with pytest.raises(ShapeError, match="need 2 bytes, got 1"):
        unpack_codes(np.zeros((5, 1), np.uint8), 4, 3)
    with pytest.raises(ShapeError, match="uint8"):
        unpack_codes(np.zeros(3, np.int16), 4, 3)
    with pytest.raises(InvalidValueError, match="count must be >= 0"):
        unpack_codes(np.zeros(3, np.uint8), 4, -1)
    with pytest.raises(ShapeError, match="0-d"):
        unpack_codes(np.uint8(3), 4, 1)


def test_errors_are_gsrq_errors_not_codebook_errors():
    with pytest.raises(InvalidValueError) as info:
        pack_codes([9], 3)
    assert not isinstance(info.value, CodebookFormatError)
    assert isinstance(info.value, ValueError)
