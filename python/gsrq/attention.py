"""Decode attention over a compressed KV segment.

:class:`CompressedKV` is what a :class:`gsrq.GSRQCache` layer hands to decode
attention: exact sink and window tokens plus packed codes of everything in
between. The fused CUDA kernel and the pure-torch reference both take it.

Key levers are folded into the query so the kernel never sees them:
``score(q, coded token t) = key_norms[t] * <q @ query_map, k_hat_t>`` and the
coded part of the output is ``(sum_t p_t v_hat_t) @ value_map``, where
``k_hat``/``v_hat`` are the plain RQ reconstructions (sum of codewords).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedKV:
    """One layer's cache for one decode step.

    Shapes: ``B`` batch, ``Hkv`` KV heads, ``hd`` head_dim, ``Ts``/``Tc``/``Tw``
    sink, coded and window token counts, ``H`` codebook heads (1 if shared,
    else Hkv), ``C``/``M``/``Kc``/``D`` chunks, stages, codewords, chunk length.

    sink_keys, sink_values: ``[B, Hkv, Ts, hd]``, model dtype (exact).
    key_codes, value_codes: uint8 ``[B, Hkv, Tc, R]`` packed rows (docs/format.md,
        codes ordered ``c * M + m``).
    key_codebooks, value_codebooks: float ``[H, C, M, Kc, D]``.
    key_bits, value_bits: code width in bits.
    window_keys, window_values: ``[B, Hkv, Tw, hd]`` exact recent tokens.
    key_norms: ``[B, Hkv, Tc]`` float or None — per-token key scale.
    query_map: ``[H, hd, hd]`` or None — applied to the query for coded keys.
    value_map: ``[H, hd, hd]`` or None — applied to the coded value sum.
    valid: bool ``[B, Ts + Tc + Tw]`` or None — False marks padding, in the
        order sinks, coded, window.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    key_codes: torch.Tensor
    value_codes: torch.Tensor
    key_codebooks: torch.Tensor
    value_codebooks: torch.Tensor
    key_bits: int
    value_bits: int
    window_keys: torch.Tensor
    window_values: torch.Tensor
    key_norms: torch.Tensor | None = None
    query_map: torch.Tensor | None = None
    value_map: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def num_coded(self) -> int:
        return int(self.key_codes.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.sink_keys.shape[2] + self.key_codes.shape[2] + self.window_keys.shape[2])
