"""GPU unpacking (gsrq_unpack_codes) against the torch reference and the Rust unpacker."""

from __future__ import annotations

import pytest
import torch

from gsrq.errors import ShapeError
from gsrq.reference import pack_codes_torch, unpack_codes_torch


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g)


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("count", [0, 1, 7, 64, 333])
def test_unpack_matches_layout(kernels, bits, count):
    codes = _codes((37, count), bits, seed=bits * 1000 + count)
    packed = pack_codes_torch(codes, bits)
    got = kernels.unpack_codes_cuda(packed.cuda(), bits, count)
    assert got.dtype == torch.uint16 and got.shape == (37, count) and got.is_cuda
    assert torch.equal(got.cpu().to(torch.int64), codes)
    assert torch.equal(got.cpu().to(torch.int64), unpack_codes_torch(packed, bits, count))


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 12, 16])
def test_unpack_matches_rust(kernels, bits):
    pack = pytest.importorskip("gsrq.pack")
    import numpy as np

    codes = _codes((5, 4, 129), bits, seed=bits).numpy().astype(np.uint32)
    packed = pack.pack_codes(codes, bits)
    want = pack.unpack_codes(packed, bits, 129)
    got = kernels.unpack_codes_cuda(torch.from_numpy(np.ascontiguousarray(packed)).cuda(), bits, 129)
    assert got.shape == (5, 4, 129)
    assert np.array_equal(got.cpu().to(torch.int32).numpy(), want.astype(np.int32))


def test_unpack_ignores_extra_row_bytes_and_strides(kernels):
    codes = _codes((9, 50), 10, seed=3)
    packed = pack_codes_torch(codes, 10)  # 63 bytes per row
    wide = torch.cat([packed, torch.full((9, 5), 0xFF, dtype=torch.uint8)], dim=1).cuda()
    assert torch.equal(kernels.unpack_codes_cuda(wide, 10, 50).cpu().to(torch.int64), codes)
    # a non-contiguous view is unpacked by value
    view = wide[:, :63]
    assert torch.equal(kernels.unpack_codes_cuda(view, 10, 50).cpu().to(torch.int64), codes)


def test_unpack_large_grid_stride(kernels):
    codes = _codes((4096, 1300), 12, seed=9)  # 5.3 M codes: more than one grid pass
    packed = pack_codes_torch(codes, 12).cuda()
    got = kernels.unpack_codes_cuda(packed, 12, 1300)
    assert torch.equal(got.to(torch.int64).cpu(), codes)


def test_unpack_rejects_bad_arguments(kernels):
    packed = torch.zeros(3, 4, dtype=torch.uint8, device="cuda")
    with pytest.raises(ShapeError, match="need 5"):
        kernels.unpack_codes_cuda(packed, 10, 4)
    with pytest.raises(ShapeError, match="bits"):
        kernels.unpack_codes_cuda(packed, 17, 1)
    with pytest.raises(ShapeError, match="uint8"):
        kernels.unpack_codes_cuda(packed.to(torch.int16), 4, 2)
