"""Bit packing of ``b``-bit codes (``1 <= b <= 16``), the layout of docs/format.md.

Code ``i`` of a row occupies stream bits ``[i*b, (i+1)*b)`` least significant
bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. A row of
``n`` codes packs into exactly ``ceil(n*b/8)`` bytes whose trailing pad bits
are zero. The Rust packer, the CUDA kernels and the pure-torch reference
(:func:`gsrq.reference.unpack_codes_torch`) all read and write this layout.

Multi-dimensional arrays pack along the last axis: every leading index is an
independent row, padded to whole bytes (this is how the cache stores one
packed row per token and KV head). The work runs in Rust without the GIL.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from gsrq import _gsrq
from gsrq.errors import InvalidValueError, ShapeError

__all__ = ["pack_codes", "unpack_codes", "packed_size"]


def _int_arg(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidValueError(f"{name} must be an integer, got {value!r}") from None


def _native(arr: np.ndarray) -> np.ndarray:
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def packed_size(count: int, bits: int) -> int:
    """Bytes of one packed row of ``count`` codes of ``bits`` bits: ``ceil(count*bits/8)``."""
    return _gsrq.packed_size(_int_arg("count", count), _int_arg("bits", bits))


def pack_codes(codes: Any, bits: int) -> np.ndarray:
    """Pack integer codes into the little-endian bitstream.

    codes: any signed or unsigned integer array (or nested sequence), shape
        ``[..., n]``; every value must lie in ``0 .. 2**bits - 1``.
    bits: code width, 1..16.
    Returns uint8, shape ``[..., ceil(n*bits/8)]``: each row along the last
    axis packed on its own and padded to whole bytes with zero bits.

    Raises :class:`~gsrq.errors.InvalidValueError` for ``bits`` outside 1..16
    or a code that does not fit (the message names the first such value and
    its index), :class:`~gsrq.errors.ShapeError` for a non-integer dtype or a
    0-d array.
    """
    b = _int_arg("bits", bits)
    arr = np.asarray(codes)
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"codes must have an integer dtype, got {arr.dtype}")
    if arr.ndim == 0:
        raise ShapeError("codes must have at least one dimension, got a 0-d array")
    return _gsrq.pack_codes(_native(arr), b)


def unpack_codes(packed: Any, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes from the start of every packed row.

    packed: uint8, shape ``[..., nbytes]`` with ``nbytes >= ceil(count*bits/8)``
        (bytes past that are ignored).
    Returns uint16 codes, shape ``[..., count]``.

    Raises :class:`~gsrq.errors.ShapeError` if a row is too short or the
    dtype is not uint8, :class:`~gsrq.errors.InvalidValueError` for ``bits``
    outside 1..16 or a negative ``count``.
    """
    b = _int_arg("bits", bits)
    n = _int_arg("count", count)
    arr = np.asarray(packed)
    if arr.dtype != np.uint8:
        raise ShapeError(f"packed must have dtype uint8, got {arr.dtype}")
    if arr.ndim == 0:
        raise ShapeError("packed must have at least one dimension, got a 0-d array")
    return _gsrq.unpack_codes(np.ascontiguousarray(arr), b, n)
