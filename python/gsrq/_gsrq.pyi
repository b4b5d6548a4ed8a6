"""Type stub of the Rust extension ``gsrq._gsrq``.

Errors are raised as the classes of :mod:`gsrq.errors`; I/O failures as
:class:`OSError`. Every function releases the GIL around its work.
"""

import os

import numpy as np
import numpy.typing as npt

__version__: str
CODEBOOK_FORMAT_VERSION: int

# ---------------------------------------------------------------- packing

def pack_codes(codes: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.uint8]:
    """Pack ``codes`` (any native-endian integer dtype, C-contiguous, shape
    ``[..., n]``) into ``uint8 [..., ceil(n*bits/8)]``, each row along the last
    axis on its own. InvalidValueError: bits outside 1..16, a code outside
    ``0 .. 2**bits - 1`` (value and index named). ShapeError: 0-d or
    non-integer input."""

def unpack_codes(packed: npt.NDArray[np.uint8], bits: int, count: int) -> npt.NDArray[np.uint16]:
    """Unpack ``count`` codes from each row of ``packed`` (``uint8 [..., nbytes]``,
    ``nbytes >= ceil(count*bits/8)``) into ``uint16 [..., count]``.
    ShapeError: rows too short."""

def packed_size(count: int, bits: int) -> int:
    """``ceil(count*bits/8)``."""

# ---------------------------------------------------------------- codebook files

def write_codebook_file(
    path: str | os.PathLike[str],
    meta_json: str,
    tensors: dict[str, npt.NDArray[np.float32]],
    dtype: str,
) -> None:
    """Validate and write a codebook file atomically; ``dtype`` is
    ``"float16" | "bfloat16" | "float32"`` and must equal the metadata's.
    CodebookFormatError: metadata or tensor names/shapes inconsistent.
    InvalidValueError: NaN/inf or a value the dtype cannot hold. OSError: I/O."""

def validate_codebook(meta_json: str, tensors: dict[str, npt.NDArray[np.float32]], dtype: str) -> None:
    """The checks of :func:`write_codebook_file` without writing anything."""

def read_codebook_file(
    path: str | os.PathLike[str],
) -> tuple[str, dict[str, npt.NDArray[np.float32]], str]:
    """Read and validate a codebook file: ``(meta_json, tensors as float32, dtype)``.
    CodebookFormatError: any defect of the file. OSError: I/O."""

def parse_codebook_bytes(data: bytes) -> tuple[str, dict[str, npt.NDArray[np.float32]], str]:
    """:func:`read_codebook_file` on bytes held in memory."""
