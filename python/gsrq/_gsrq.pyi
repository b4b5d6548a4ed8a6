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

# ---------------------------------------------------------------- engine
# x: float32 [N, D] C-contiguous; weights: float32 [N] (non-negative, finite,
# not all zero) or None; threads: None = the global rayon pool, else a local
# pool of that size (results are bitwise identical for any thread count).

def kmeans(
    x: npt.NDArray[np.float32],
    k: int,
    weights: npt.NDArray[np.float32] | None = None,
    iters: int = 20,
    init: str = "kmeans++",
    seed: int = 0,
    threads: int | None = None,
    init_centroids: npt.NDArray[np.float32] | None = None,
    return_history: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float64]
]:
    """Weighted Lloyd k-means: ``(centroids [k, D], labels [N])`` (+ objective
    history ``[iters + 1]`` with ``return_history``)."""

def gskm(
    x: npt.NDArray[np.float32],
    k: int,
    weights: npt.NDArray[np.float32] | None = None,
    init_iters: int = 20,
    iters: int = 10,
    seed: int = 0,
    threads: int | None = None,
    weights_in_init_only: bool = False,
    init_centroids: npt.NDArray[np.float32] | None = None,
    return_history: bool = False,
    init: str = "kmeans++",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float64]
]:
    """Gain-Shape K-means: ``(codebook [k, D], labels [N])``; codeword = gain x unit shape."""

def rq_fit(
    x: npt.NDArray[np.float32],
    weights: npt.NDArray[np.float32] | None,
    codebook_size: int,
    stages: int,
    method: str = "gskm",
    seed: int = 0,
    iters: int = 10,
    init_iters: int = 20,
    weights_in_init_only: bool = False,
    threads: int | None = None,
    init: str = "kmeans++",
) -> npt.NDArray[np.float32]:
    """Train a residual quantizer: codebooks ``float32 [stages, codebook_size, D]``."""

def rq_encode(
    x: npt.NDArray[np.float32],
    codebooks: npt.NDArray[np.float32],
    beam: int = 1,
    threads: int | None = None,
) -> npt.NDArray[np.uint16]:
    """Greedy (beam == 1, ties to the lowest index) or beam-search encoding: ``uint16 [N, M]``."""

def rq_decode(
    codes: npt.NDArray[np.uint16],
    codebooks: npt.NDArray[np.float32],
    threads: int | None = None,
) -> npt.NDArray[np.float32]:
    """Sum of the chosen codewords: ``float32 [N, D]``."""
