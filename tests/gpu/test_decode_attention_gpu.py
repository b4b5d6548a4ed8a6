"""Fused decode attention on the GPU against the pure-torch references.

``gsrq.attention.decode_attention`` on CUDA runs the fused kernels; with
``filterwarnings = error`` any silent fallback to dequantize + attention would
fail these tests (the fallback warns). Oracles: ``fused_decode_attention_ref``
(same algorithm, float32) and ``decode_attention_dequant`` (plain
dequantize-then-attend), both evaluated in float32 on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from gsrq import attention
from gsrq.attention import decode_attention
from gsrq.config import GSRQConfig
from gsrq.reference import decode_attention_dequant, fused_decode_attention_ref, random_compressed_kv

DEV = "cuda"
ONE_BIT = GSRQConfig.from_bits(1.0).keys  # D=64, Kc=256, M=8
HALF_BIT = GSRQConfig.from_bits(0.5).keys  # D=64, Kc=256, M=4
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 3e-5}


def _cfg(k):
    return (k.D, k.Kc, k.M)


def _case_id(c):
    return "-".join(str(v) for v in c[:8]) + ("-" + "+".join(sorted(k for k, v in c[8].items() if v)) if c[8] else "")


# B, Hkv, G, hd, Ts, Tc, Tw, key_cfg, extras(value_cfg, dtype, per_head, key_norms, maps, padding)
CASES = []
for hd in (64, 128):
    for Tc in (1, 255, 1000, 4097):
        CASES.append((1, 2, 4, hd, 4, Tc, 0, _cfg(ONE_BIT), {"dtype": torch.float16}))
        CASES.append((3, 1, 7, hd, 0, Tc, 16, _cfg(HALF_BIT), {"dtype": torch.bfloat16, "padding": 9}))
CASES += [
    (2, 8, 4, 128, 4, 3000, 32, _cfg(ONE_BIT), {"dtype": torch.float16, "key_norms": True, "maps": True}),
    (2, 8, 4, 128, 4, 3000, 32, _cfg(HALF_BIT), {"dtype": torch.bfloat16, "per_head": True, "padding": 100}),
    (4, 2, 1, 64, 4, 777, 5, (16, 256, 2), {"dtype": torch.float16, "value_cfg": (8, 256, 1)}),
    (2, 2, 2, 64, 1, 500, 3, (8, 16, 2), {"dtype": torch.float16, "value_cfg": (16, 200, 3)}),  # 4-bit keys, Kc=200 values
    (2, 4, 8, 128, 4, 2049, 0, (32, 256, 3), {"dtype": torch.bfloat16, "key_norms": True}),
    (1, 1, 1, 64, 4, 0, 9, _cfg(ONE_BIT), {"dtype": torch.float16}),  # only exact tokens
    (2, 2, 4, 64, 0, 300, 0, _cfg(ONE_BIT), {"dtype": torch.float32, "maps": True, "padding": 7}),
    (1, 1, 1, 64, 4, 100_000, 0, (16, 256, 2), {"dtype": torch.float16}),  # many splits
    (2, 2, 2, 64, 2, 300, 2, (64, 256, 3), {"dtype": torch.float16}),  # 3-byte rows: byte-wise code reads
]


def _make(case, seed=0):
    B, Hkv, G, hd, Ts, Tc, Tw, kcfg, extra = case
    extra = dict(extra)
    dtype = extra.pop("dtype")
    vcfg = extra.pop("value_cfg", kcfg)
    ckv = random_compressed_kv(
        B, Hkv, hd, sinks=Ts, coded=Tc, window=Tw, key_cfg=kcfg, value_cfg=vcfg, dtype=dtype, device=DEV,
        seed=seed, **extra,
    )
    g = torch.Generator().manual_seed(seed + 1)
    q = (torch.randn(B, Hkv * G, hd, generator=g) * 2).to(dtype).to(DEV)  # peaky enough to matter
    return q, ckv


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fused_matches_references(case):
    q, ckv = _make(case)
    scale = 1 / math.sqrt(q.shape[-1])
    out = decode_attention(q, ckv, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    assert torch.isfinite(out).all()
    ref = fused_decode_attention_ref(q.float(), ckv, scale)
    plain = decode_attention_dequant(q.float(), ckv, scale)
    torch.testing.assert_close(ref, plain, atol=3e-5, rtol=1e-4)  # the two oracles agree
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # the float32 intermediate of the kernels is tight, before the cast to q's dtype
    if q.dtype != torch.float32:
        out32 = decode_attention(q.float(), ckv, scale)
        torch.testing.assert_close(out32, ref, atol=3e-5, rtol=1e-4)


def test_unaligned_code_rows_are_read_bytewise():
    q, ckv = _make((2, 2, 4, 128, 4, 999, 0, _cfg(ONE_BIT), {"dtype": torch.float16}), seed=8)
    want = decode_attention(q, ckv, 0.1)
    for name in ("key_codes", "value_codes"):
        codes = getattr(ckv, name)
        buf = torch.empty(codes.numel() + 1, dtype=torch.uint8, device=codes.device)
        buf[1:] = codes.flatten()
        shifted = buf[1:].view(codes.shape)  # contiguous, odd address
        assert shifted.is_contiguous() and shifted.data_ptr() % 4 != 0
        setattr(ckv, name, shifted)
    torch.testing.assert_close(decode_attention(q, ckv, 0.1), want, atol=1e-3, rtol=1e-3)  # shared-memory atomics: summation order varies


def test_code_and_norm_views_into_capacity_buffers():
    """Codes / key norms as views [:, :, :Tc] of larger buffers (a GSRQCache's layout) are read in place."""
    q, ckv = _make((2, 8, 4, 128, 4, 3000, 8, _cfg(ONE_BIT), {"dtype": torch.float16, "key_norms": True}), seed=9)
    want = fused_decode_attention_ref(q.float(), ckv, 0.1)
    Tc = ckv.num_coded
    for name in ("key_codes", "value_codes", "key_norms"):
        t = getattr(ckv, name)
        shape = list(t.shape)
        shape[2] = Tc + 513
        buf = torch.full(shape, 255 if t.dtype == torch.uint8 else float("nan"), dtype=t.dtype, device=t.device)
        buf[:, :, :Tc] = t
        view = buf[:, :, :Tc]
        assert not view.is_contiguous()
        setattr(ckv, name, view)
    assert attention._rows_view(ckv.key_codes) is ckv.key_codes and attention._norms_view(ckv.key_norms) is ckv.key_norms
    assert attention._word_reads(ckv.key_codes, ckv.key_bits)
    torch.testing.assert_close(decode_attention(q, ckv, 0.1).float(), want, atol=2e-3, rtol=2e-3)


def test_context_128k():
    case = (1, 8, 4, 128, 4, 131_072 - 4, 0, _cfg(ONE_BIT), {"dtype": torch.float16})
    q, ckv = _make(case, seed=5)
    scale = 128**-0.5
    out = decode_attention(q, ckv, scale)
    ref = fused_decode_attention_ref(q.float(), ckv, scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_non_default_stream_and_graph_capture():
    q, ckv = _make((2, 8, 4, 128, 4, 5000, 8, _cfg(ONE_BIT), {"dtype": torch.float16}), seed=3)
    scale = 128**-0.5
    want = decode_attention(q, ckv, scale)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = q * 1  # written on s; the kernels must run after it on s
        got = decode_attention(q2, ckv, scale)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # shared-memory atomics: summation order varies
    # launched on torch's current stream, the kernels are capturable in a CUDA graph
    static_q = q.clone()
    s2 = torch.cuda.Stream()
    s2.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s2):
        decode_attention(static_q, ckv, scale)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_attention(static_q, ckv, scale)
    static_q.copy_(q.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, decode_attention(q.flip(0), ckv, scale), atol=1e-3, rtol=1e-3)  # shared-memory atomics: summation order varies


def test_large_codebooks_fall_back_with_one_warning():
    q, ckv = _make((2, 2, 2, 64, 4, 50, 0, (16, 512, 1), {"dtype": torch.float16}))
    attention._warned.clear()
    with pytest.warns(RuntimeWarning, match="Kc=512"):
        out = decode_attention(q, ckv, 0.125)
    torch.testing.assert_close(out.float(), decode_attention_dequant(q.float(), ckv, 0.125), atol=2e-3, rtol=2e-3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention(q, ckv, 0.125)  # the same reason warns only once


def test_all_padding_row_is_zero():
    q, ckv = _make((2, 1, 2, 64, 2, 40, 2, (16, 256, 2), {"dtype": torch.float16, "padding": 1000}))
    out = decode_attention(q, ckv, 0.125)
    assert (out[1] == 0).all() and torch.isfinite(out).all() and (out[0] != 0).any()


def test_transformers_hook_runs_the_kernels():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from gsrq.attention import CALLS, attach_compressed, gsrq_attention_forward
    from gsrq.reference import dequantize_compressed

    q, ckv = _make((2, 8, 4, 128, 4, 3000, 16, _cfg(ONE_BIT), {"dtype": torch.float16}), seed=12)
    T = ckv.num_tokens
    kc, vc = dequantize_compressed(ckv)
    dense_k = torch.cat([ckv.sink_keys.float(), kc, ckv.window_keys.float()], dim=2)
    dense_v = torch.cat([ckv.sink_values.float(), vc, ckv.window_values.float()], dim=2)
    allowed = torch.ones(2, 1, 1, T, dtype=torch.bool, device=DEV)
    allowed[1, ..., :10] = False

    class Module(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    q4 = q.unsqueeze(2)
    want, _ = sdpa_attention_forward(Module(), q4.float(), dense_k, dense_v, allowed, scaling=0.1)
    before = CALLS["fused"]
    key = attach_compressed(torch.empty(2, 8, T, 128, device=DEV, dtype=q.dtype), ckv)
    got, _ = gsrq_attention_forward(Module(), q4, key, key, allowed, scaling=0.1)
    assert CALLS["fused"] == before + 1
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
