"""KIVI-style 2-bit baseline against a loop-by-loop numpy oracle, and its bit count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsrq.errors import ConfigError, ShapeError
from gsrq.eval.kivi import KiviQuantizer, kivi_fake_quant_keys, kivi_fake_quant_values, kivi_rate_report


def _np_group(v: np.ndarray, bits: int) -> np.ndarray:
    """One group, as KIVI: fp16 zero point (min) and scale ((max-min)/(2^b-1))."""
    levels = 2**bits - 1
    mn, mx = float(v.min()), float(v.max())
    scale = float(np.float16((mx - mn) / levels))
    zero = float(np.float16(mn))
    out = np.empty_like(v)
    for i, x in enumerate(v):
        q = 0.0 if scale == 0 else min(max(np.round((x - zero) / scale), 0), levels)
        out[i] = q * scale + zero
    return out


def _np_keys(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    B, H, T, D = x.shape
    out = np.empty_like(x)
    for b in range(B):
        for h in range(H):
            for d in range(D):
                for t0 in range(0, T, group):
                    out[b, h, t0 : t0 + group, d] = _np_group(x[b, h, t0 : t0 + group, d], bits)
    return out


def _np_values(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    B, H, T, D = x.shape
    out = np.empty_like(x)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for d0 in range(0, D, group):
                    out[b, h, t, d0 : d0 + group] = _np_group(x[b, h, t, d0 : d0 + group], bits)
    return out


@pytest.mark.parametrize("T,D,group,bits", [(64, 32, 32, 2), (70, 48, 32, 2), (13, 8, 4, 3)])
def test_kivi_matches_numpy_oracle(T, D, group, bits):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 2, T, D, generator=g, dtype=torch.float64) * 3 + 0.5
    x = x.float()
    k = kivi_fake_quant_keys(x, bits, group)
    v = kivi_fake_quant_values(x, bits, group)
    np.testing.assert_allclose(k.numpy(), _np_keys(x.numpy().astype(np.float64), bits, group), rtol=0, atol=1e-5)
    np.testing.assert_allclose(v.numpy(), _np_values(x.numpy().astype(np.float64), bits, group), rtol=0, atol=1e-5)


def test_kivi_levels_and_constant_groups():
    x = torch.randn(1, 1, 32, 32)
    v = kivi_fake_quant_values(x, 2, 32)
    # at most 4 distinct values per token (one group of 32 channels)
    assert all(len(torch.unique(v[0, 0, t])) <= 4 for t in range(32))
    # min and max are reproduced up to fp16 rounding of scale/zero
    torch.testing.assert_close(v.amin(-1), x.amin(-1), atol=2e-3, rtol=1e-3)
    const = torch.full((1, 1, 40, 8), 1.2345)
    torch.testing.assert_close(kivi_fake_quant_keys(const), torch.full_like(const, float(np.float16(1.2345))))
    assert not torch.isnan(kivi_fake_quant_keys(const)).any()
    # dtype preserved
    assert kivi_fake_quant_keys(x.half()).dtype == torch.float16


def test_kivi_quantizer_errors():
    with pytest.raises(ConfigError):
        KiviQuantizer("queries")
    with pytest.raises(ConfigError):
        KiviQuantizer("keys", bits=0)
    with pytest.raises(ShapeError):
        kivi_fake_quant_keys(torch.randn(4, 8))


def test_kivi_bits_count_scales_and_zero_points():
    # 1024 tokens, 4 sinks, hd=64, 3 heads: 1020 coded tokens
    r = kivi_rate_report(1024, head_dim=64, num_kv_heads=3, bits=2, group=32, sinks=4)
    coded, elems = 1020, 2 * 1024 * 3 * 64
    key_groups = math.ceil(coded / 32) * 64 * 3  # per channel, along tokens
    value_groups = coded * 2 * 3  # per token, 2 groups of 32 channels
    want = (2 * coded * 3 * 64 * 2 + (key_groups + value_groups) * 32 + 2 * 4 * 3 * 64 * 16) / elems
    assert math.isclose(r["total"], want)
    # long contexts approach 2 bits + 32/32 of overhead = 3 bits
    assert math.isclose(kivi_rate_report(1 << 20, head_dim=64, num_kv_heads=3)["total"], 3.0, rel_tol=1e-3)
