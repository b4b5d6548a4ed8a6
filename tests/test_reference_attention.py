"""CPU tests of the decode-attention references (the oracles of the CUDA kernels).

Three implementations must agree: the LUT/histogram reference that mirrors the
fused kernels, the dequantize-then-attend reference, and an independent numpy
computation written here from the documented layout (its own bit unpacker, its
own reconstruction, a plain per-row softmax).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsrq.attention import CompressedKV, decode_attention, plan_fused, validate_decode_inputs
from gsrq.errors import ShapeError
from gsrq.reference import (
    decode_attention_dequant,
    decode_lut,
    fused_decode_attention_ref,
    pack_codes_torch,
    random_compressed_kv,
)

# ----------------------------------------------------------------- oracle


def np_unpack(row: np.ndarray, bits: int, count: int) -> list[int]:
    """Code i = sum_j bit(i*bits + j) << j, bit(p) = (row[p // 8] >> (p % 8)) & 1."""
    out = []
    for i in range(count):
        v = 0
        for j in range(bits):
            p = i * bits + j
            v |= ((int(row[p // 8]) >> (p % 8)) & 1) << j
        out.append(v)
    return out


def np_reconstruct(codes_row: list[int], books: np.ndarray) -> np.ndarray:
    """books [C, M, Kc, D]; codes ordered c*M + m -> vector [C*D]."""
    C, M, Kc, D = books.shape
    vec = np.zeros(C * D, dtype=np.float64)
    for c in range(C):
        for m in range(M):
            vec[c * D : (c + 1) * D] += books[c, m, codes_row[c * M + m]]
    return vec


def np_attention(q: torch.Tensor, ckv: CompressedKV, scale: float) -> np.ndarray:
    """Plain softmax attention, float64, one (batch, query head) row at a time."""
    qn = q.double().numpy()
    B, Hq, hd = qn.shape
    Hkv = ckv.sink_keys.shape[1]
    G = Hq // Hkv
    Ts, Tc, Tw = ckv.sink_keys.shape[2], ckv.key_codes.shape[2], ckv.window_keys.shape[2]
    kb = ckv.key_codebooks.double().numpy()
    vb = ckv.value_codebooks.double().numpy()
    out = np.zeros((B, Hq, hd))
    for b in range(B):
        for h in range(Hq):
            g = h // G
            hk = g if kb.shape[0] > 1 else 0
            hv = g if vb.shape[0] > 1 else 0
            keys, vals = [], []
            for t in range(Ts):
                keys.append(ckv.sink_keys[b, g, t].double().numpy())
                vals.append(ckv.sink_values[b, g, t].double().numpy())
            for t in range(Tc):
                kc = np_unpack(ckv.key_codes[b, g, t].numpy(), ckv.key_bits, kb.shape[1] * kb.shape[2])
                vc = np_unpack(ckv.value_codes[b, g, t].numpy(), ckv.value_bits, vb.shape[1] * vb.shape[2])
                k = np_reconstruct(kc, kb[hk])
                v = np_reconstruct(vc, vb[hv])
                if ckv.query_map is not None:
                    qm = ckv.query_map.double().numpy()
                    k = qm[g if qm.shape[0] > 1 else 0] @ k  # <q @ QM, k> = <q, QM k>
                if ckv.key_norms is not None:
                    k = k * float(ckv.key_norms[b, g, t])
                if ckv.value_map is not None:
                    vm = ckv.value_map.double().numpy()
                    v = v @ vm[g if vm.shape[0] > 1 else 0]
                keys.append(k)
                vals.append(v)
            for t in range(Tw):
                keys.append(ckv.window_keys[b, g, t].double().numpy())
                vals.append(ckv.window_values[b, g, t].double().numpy())
            valid = np.ones(len(keys), bool) if ckv.valid is None else ckv.valid[b].numpy()
            scores = np.array([scale * float(qn[b, h] @ k) for k in keys])
            if not valid.any():
                continue
            s = scores[valid]
            p = np.exp(s - s.max())
            p /= p.sum()
            out[b, h] = p @ np.stack(vals)[valid]
    return out


# ------------------------------------------------------------------ cases

CASES = [
    # B, Hkv, G, hd, Ts, Tc, Tw, key (D, Kc, M), value (D, Kc, M), extras
    (1, 1, 1, 64, 0, 1, 0, (16, 256, 2), (16, 256, 2), {}),
    (2, 2, 4, 64, 4, 37, 3, (64, 256, 3), (32, 256, 2), {"key_norms": True}),
    (2, 2, 2, 128, 4, 50, 0, (64, 256, 4), (64, 256, 4), {"maps": True, "per_head": True}),
    (3, 1, 3, 64, 2, 21, 5, (8, 16, 1), (16, 1000, 1), {"padding": 6}),  # 4- and 10-bit codes
    (2, 2, 1, 64, 0, 0, 7, (16, 256, 2), (16, 256, 2), {"padding": 2}),  # no coded tokens
    (2, 1, 2, 64, 4, 33, 0, (32, 200, 2), (16, 64, 3), {"key_norms": True, "maps": True, "padding": 40}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_three_implementations_agree(case):
    B, Hkv, G, hd, Ts, Tc, Tw, kcfg, vcfg, extra = case
    ckv = random_compressed_kv(
        B, Hkv, hd, sinks=Ts, coded=Tc, window=Tw, key_cfg=kcfg, value_cfg=vcfg, dtype=torch.float32, seed=7, **extra
    )
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hkv * G, hd, generator=gen)
    scale = 1 / math.sqrt(hd)
    want = torch.from_numpy(np_attention(q, ckv, scale)).float()
    dq = decode_attention_dequant(q, ckv, scale)
    fused = fused_decode_attention_ref(q, ckv, scale)
    torch.testing.assert_close(dq, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused, want, atol=2e-5, rtol=1e-4)
    # the output is not trivially zero or constant
    assert want.abs().mean() > 0.05


@pytest.mark.parametrize("split", [1, 7, 16, 1000])
def test_splits_merge_by_log_sum_exp(split):
    ckv = random_compressed_kv(
        2, 2, 64, sinks=3, coded=45, window=4, key_cfg=(16, 256, 2), value_cfg=(16, 256, 2),
        dtype=torch.float32, key_norms=True, padding=9, seed=11,
    )
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)) * 3  # peaky softmax
    whole = fused_decode_attention_ref(q, ckv, 0.125)
    torch.testing.assert_close(fused_decode_attention_ref(q, ckv, 0.125, split_tokens=split), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attention_dequant(q, ckv, 0.125), whole, atol=1e-5, rtol=1e-5)


def test_lut_is_query_codeword_dot():
    ckv = random_compressed_kv(1, 2, 64, sinks=0, coded=3, window=0, key_cfg=(32, 16, 2), value_cfg=(32, 16, 2),
                               dtype=torch.float32, per_head=True, maps=True, seed=5)
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    lut = decode_lut(q, ckv, 0.5).view(1, 4, 2, 2, 16)
    for h in range(4):
        g = h // 2
        qm = q[0, h] @ ckv.query_map[g]
        for c in range(2):
            for m in range(2):
                want = 0.5 * ckv.key_codebooks[g, c, m] @ qm[c * 32 : (c + 1) * 32]
                torch.testing.assert_close(lut[0, h, c, m], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_queries_return_their_dtype(dtype):
    ckv = random_compressed_kv(2, 2, 128, sinks=4, coded=20, window=2, key_cfg=(64, 256, 2), value_cfg=(64, 256, 2),
                               dtype=dtype, seed=2)
    q = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = decode_attention(q, ckv, 128**-0.5)
    assert out.dtype == dtype and out.shape == (2, 8, 128)
    want = torch.from_numpy(np_attention(q.float(), ckv, 128**-0.5)).to(dtype)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)


def test_all_padding_row_is_zero():
    ckv = random_compressed_kv(2, 1, 64, sinks=2, coded=5, window=1, key_cfg=(16, 256, 1), value_cfg=(16, 256, 1),
                               dtype=torch.float32, padding=100, seed=3)
    q = torch.randn(2, 2, 64)
    for out in (fused_decode_attention_ref(q, ckv, 0.1), decode_attention_dequant(q, ckv, 0.1)):
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0] != 0).any()


def test_cpu_dispatch_uses_reference_without_warning():
    ckv = random_compressed_kv(1, 2, 64, sinks=1, coded=9, window=1, key_cfg=(16, 256, 2), value_cfg=(16, 256, 2),
                               dtype=torch.float32)
    q = torch.randn(1, 4, 64)
    torch.testing.assert_close(decode_attention(q, ckv, 0.125), fused_decode_attention_ref(q, ckv, 0.125))


def _base():
    return random_compressed_kv(2, 2, 64, sinks=2, coded=6, window=1, key_cfg=(16, 256, 2), value_cfg=(16, 256, 2),
                                dtype=torch.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: setattr(c, "key_codes", c.key_codes[..., :-1]), "key_codes rows"),
        (lambda c: setattr(c, "value_codes", c.value_codes.to(torch.int16)), "value_codes must be uint8"),
        (lambda c: setattr(c, "key_bits", 7), "key_bits"),
        (lambda c: setattr(c, "sink_values", c.sink_values[:, :, :1]), "sink_values and sink_keys"),
        (lambda c: setattr(c, "key_codebooks", c.key_codebooks[:, :, :, :, :8]), "key_codebooks cover"),
        (lambda c: setattr(c, "valid", torch.ones(2, 3, dtype=torch.bool)), "valid must be bool"),
        (lambda c: setattr(c, "key_norms", torch.ones(2, 2, 5)), "key_norms"),
        (lambda c: setattr(c, "query_map", torch.ones(3, 64, 64)), "query_map"),
    ],
)
def test_bad_inputs_raise_shape_error(mutate, match):
    ckv = _base()
    mutate(ckv)
    with pytest.raises(ShapeError, match=match):
        decode_attention(torch.randn(2, 4, 64), ckv, 0.125)


def test_bad_query_raises():
    from gsrq.errors import InvalidValueError

    ckv = _base()
    with pytest.raises(InvalidValueError, match="scale"):
        decode_attention(torch.randn(2, 4, 64), ckv, float("nan"))
    with pytest.raises(ShapeError, match="multiple"):
        validate_decode_inputs(torch.randn(2, 3, 64), ckv)
    with pytest.raises(ShapeError, match="float16"):
        validate_decode_inputs(torch.ones(2, 4, 64, dtype=torch.int32), ckv)


def test_packed_layout_matches_numpy_oracle():
    codes = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    packed = pack_codes_torch(codes, 10)
    for r in range(3):
        assert np_unpack(packed[r].numpy(), 10, 7) == codes[r].tolist()


def test_fused_plan():
    # LLaMA-3-8B, 1 bit (D=64, Kc=256, M=8), H200-like limits
    plan = plan_fused(8, 32, 8, 128, 4, 32768, 2 * 8 * 256, 2 * 8 * 256, 227 * 1024, 132)
    assert plan.gb == 4 and plan.split_smem <= 227 * 1024
    assert plan.splits * plan.tokens_per_split >= 32768 > (plan.splits - 1) * plan.tokens_per_split
    # an sm_86-sized limit forces smaller q-head slices
    small = plan_fused(8, 32, 8, 128, 4, 32768, 4096, 4096, 99 * 1024, 84)
    assert small.gb == 2
    assert isinstance(plan_fused(1, 8, 1, 128, 4, 10, 10**6, 10**6, 227 * 1024, 132), str)
    assert plan_fused(1, 8, 1, 128, 4, 0, 4096, 4096, 227 * 1024, 132).splits == 0


# ------------------------------------------------------- transformers hook


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_hook_matches_sdpa_on_the_reconstruction(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from gsrq.attention import attach_compressed, gsrq_attention_forward
    from gsrq.reference import dequantize_compressed

    B, Hkv, G, hd = 2, 2, 3, 64
    ckv = random_compressed_kv(B, Hkv, hd, sinks=2, coded=30, window=3, key_cfg=(16, 256, 2), value_cfg=(16, 256, 2),
                               dtype=torch.float32, seed=4)
    T = ckv.num_tokens
    kc, vc = dequantize_compressed(ckv)
    dense_k = torch.cat([ckv.sink_keys, kc, ckv.window_keys], dim=2)
    dense_v = torch.cat([ckv.sink_values, vc, ckv.window_values], dim=2)
    q = torch.randn(B, Hkv * G, 1, hd, generator=torch.Generator().manual_seed(6))
    mask = None
    if mask_kind is not None:
        allowed = torch.ones(B, 1, 1, T, dtype=torch.bool)
        allowed[1, ..., :4] = False  # left padding of row 1
        mask = allowed if mask_kind == "bool" else torch.zeros(B, 1, 1, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = _Module(G)
    want, _ = sdpa_attention_forward(module, q, dense_k, dense_v, mask, scaling=0.125)
    key = attach_compressed(torch.empty(B, Hkv, T, hd), ckv)  # a placeholder: its values are never read
    got, weights = gsrq_attention_forward(module, q, key, torch.empty(B, Hkv, T, hd), mask, scaling=0.125)
    assert weights is None and got.shape == (B, 1, Hkv * G, hd)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # without an attached cache view (prefill) the hook is plain SDPA
    plain, _ = gsrq_attention_forward(module, q, dense_k, dense_v, mask, scaling=0.125)
    torch.testing.assert_close(plain, want)


def test_register_transformers_attention():
    from transformers import AttentionInterface

    from gsrq.attention import gsrq_attention_forward, register_transformers_attention

    assert register_transformers_attention() == "gsrq"
    assert AttentionInterface()["gsrq"] is gsrq_attention_forward
