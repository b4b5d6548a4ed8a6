"""Pure-torch reference implementations: the oracle of every kernel.

These functions mirror the CUDA kernels and the Rust encoder one to one and are
written for clarity, not speed. Shapes use: ``T`` tokens, ``C`` chunk
positions per head vector, ``M`` residual stages, ``Kc`` codewords, ``D``
chunk length, ``b`` code bits.
"""

from __future__ import annotations

import torch


def unpack_codes_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack the little-endian bitstream of docs/format.md.

    packed: uint8, shape ``[..., nbytes]``; returns int64 codes ``[..., count]``.
    Code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``; stream bit ``j``
    is bit ``j % 8`` of byte ``j // 8``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    lead = packed.shape[:-1]
    bit_idx = torch.arange(count * bits, device=packed.device)
    byte = packed.long()[..., bit_idx // 8]
    stream = (byte >> (bit_idx % 8)) & 1
    stream = stream.reshape(*lead, count, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).long()
    return (stream * weights).sum(-1)


def pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_codes_torch`: int codes ``[..., n]`` -> uint8 ``[..., ceil(n*bits/8)]``."""
    lead = codes.shape[:-1]
    n = codes.shape[-1]
    nbytes = (n * bits + 7) // 8
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    stream = stream.reshape(*lead, nbytes, 8)
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def rq_decode_torch(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen codewords.

    codes: integer ``[..., C, M]``; codebooks: float ``[C, M, Kc, D]``.
    Returns ``[..., C * D]`` in the codebooks' dtype.
    """
    C, M, Kc, D = codebooks.shape
    if codes.shape[-2:] != (C, M):
        raise ValueError(f"codes end in {tuple(codes.shape[-2:])}, codebooks need ({C}, {M})")
    c_idx = torch.arange(C, device=codes.device).view(C, 1)
    m_idx = torch.arange(M, device=codes.device).view(1, M)
    words = codebooks[c_idx, m_idx, codes.long()]  # [..., C, M, D]
    return words.sum(-2).reshape(*codes.shape[:-2], C * D)


def rq_encode_torch(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual encoding: x ``[..., C * D]`` -> int64 codes ``[..., C, M]``.

    Ties go to the lowest code index (torch.argmin's rule, also the Rust and
    CUDA encoders' rule). Distances are computed in float32.
    """
    C, M, Kc, D = codebooks.shape
    r = x.float().reshape(*x.shape[:-1], C, D)
    cb = codebooks.float()
    out = []
    for m in range(M):
        # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2 ; ||r||^2 does not change the argmin
        dots = torch.einsum("...cd,ckd->...ck", r, cb[:, m])
        dist = (cb[:, m] ** 2).sum(-1) - 2 * dots
        code = dist.argmin(-1)
        out.append(code)
        r = r - cb[torch.arange(C, device=x.device), m, code]
    return torch.stack(out, dim=-1)
