"""KIVI-style asymmetric scalar quantization of the KV cache: the 2-bit baseline.

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache") quantizes **keys per channel** (each channel of a head, in groups of
``group`` consecutive tokens) and **values per token** (each token's head
vector, in groups of ``group`` consecutive channels). Each group stores a
zero point (its minimum) and a scale ``(max - min) / (2^bits - 1)`` in fp16;
an element becomes ``q = clamp(round((x - min) / scale), 0, 2^bits - 1)`` and
is reconstructed as ``q * scale + min``.

Differences from KIVI's streaming cache, on purpose: in the fake-quantization
protocol every cached token after the sinks is quantized, so a key group that
is not full (the last ``T mod group`` tokens) is quantized as a shorter group
of its own instead of staying in KIVI's full-precision residual; its scale
and zero point are counted in :func:`kivi_rate_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gsrq.errors import ConfigError, ShapeError

KIVI_PARAM_BITS = 16  # scale and zero point are stored in fp16


def _check_bits_group(bits: int, group: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ConfigError(f"KIVI bits must be an integer in 1..=8, got {bits!r}")
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ConfigError(f"KIVI group size must be a positive integer, got {group!r}")


def _quant_groups(g: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max quantization of each row of ``g`` ``[..., n]`` (float32)."""
    levels = (1 << bits) - 1
    mn = g.amin(dim=-1, keepdim=True)
    mx = g.amax(dim=-1, keepdim=True)
    # what KIVI stores: fp16 scale and zero point
    scale = ((mx - mn) / levels).to(torch.float16).float()
    zero = mn.to(torch.float16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, ((g - zero) / safe).round().clamp(0, levels), torch.zeros_like(g))
    return q * scale + zero


def fake_quant_lastdim(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in groups of ``group`` consecutive elements of the last axis.

    x: float tensor ``[..., n]``; a trailing group of ``n mod group`` elements
    is its own (shorter) group. Returns the reconstruction, same shape and
    dtype as ``x``.
    """
    _check_bits_group(bits, group)
    if not x.is_floating_point():
        raise ShapeError(f"KIVI quantizes floating-point tensors, got {x.dtype}")
    n = x.shape[-1]
    if n == 0:
        return x.clone()
    xf = x.float()
    full = (n // group) * group
    parts = []
    if full:
        g = xf[..., :full].reshape(*xf.shape[:-1], full // group, group)
        parts.append(_quant_groups(g, bits).reshape(*xf.shape[:-1], full))
    if n > full:
        parts.append(_quant_groups(xf[..., full:], bits))
    return torch.cat(parts, dim=-1).to(x.dtype)


def kivi_fake_quant_keys(x: torch.Tensor, bits: int = 2, group: int = 32) -> torch.Tensor:
    """Per-channel key quantization, groups of ``group`` tokens.

    x: keys ``[B, Hkv, T, hd]`` (any float dtype); returns the same shape/dtype.
    """
    if x.dim() != 4:
        raise ShapeError(f"keys must be [B, Hkv, T, hd], got shape {tuple(x.shape)}")
    return fake_quant_lastdim(x.transpose(-1, -2), bits, group).transpose(-1, -2).contiguous()


def kivi_fake_quant_values(x: torch.Tensor, bits: int = 2, group: int = 32) -> torch.Tensor:
    """Per-token value quantization, groups of ``group`` channels.

    x: values ``[B, Hkv, T, hd]`` (any float dtype); returns the same shape/dtype.
    """
    if x.dim() != 4:
        raise ShapeError(f"values must be [B, Hkv, T, hd], got shape {tuple(x.shape)}")
    return fake_quant_lastdim(x, bits, group)


@dataclass(frozen=True)
class KiviQuantizer:
    """Callable ``x [B, Hkv, T, hd] -> x_hat`` for one kind (``"keys"`` or ``"values"``)."""

    kind: str
    bits: int = 2
    group: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("keys", "values"):
            raise ConfigError(f"kind must be 'keys' or 'values', got {self.kind!r}")
        _check_bits_group(self.bits, self.group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "keys":
            return kivi_fake_quant_keys(x, self.bits, self.group)
        return kivi_fake_quant_values(x, self.bits, self.group)


def kivi_rate_report(
    context_len: int,
    *,
    head_dim: int,
    num_kv_heads: int,
    bits: int = 2,
    group: int = 32,
    sinks: int = 4,
    window: int = 0,
    exact_bits: int = 16,
) -> dict[str, float]:
    """Bits per cached element of a KIVI cache for one layer of one sequence.

    Parts: ``codes`` (``bits`` per coded element), ``scales`` (an fp16 scale
    and zero point per group: keys have ``ceil(Tc / group)`` groups per
    channel, values ``ceil(hd / group)`` groups per token) and ``exact``
    (sink and window tokens at ``exact_bits``); ``total`` is their sum.
    """
    _check_bits_group(bits, group)
    if context_len < 1:
        raise ConfigError(f"context_len must be >= 1, got {context_len}")
    exact = min(context_len, sinks + window)
    coded = context_len - exact
    elements = 2 * context_len * num_kv_heads * head_dim
    codes = 2 * coded * num_kv_heads * head_dim * bits
    key_groups = math.ceil(coded / group) * head_dim * num_kv_heads
    value_groups = coded * math.ceil(head_dim / group) * num_kv_heads
    scales = (key_groups + value_groups) * 2 * KIVI_PARAM_BITS
    exact_b = 2 * exact * num_kv_heads * head_dim * exact_bits
    out = {"codes": codes / elements, "scales": scales / elements, "exact": exact_b / elements}
    out["total"] = out["codes"] + out["scales"] + out["exact"]
    return out


__all__ = [
    "KiviQuantizer",
    "fake_quant_lastdim",
    "kivi_fake_quant_keys",
    "kivi_fake_quant_values",
    "kivi_rate_report",
]
