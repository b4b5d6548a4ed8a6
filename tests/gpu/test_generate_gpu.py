"""Whole greedy generations of a tiny random LLaMA: GSRQCache on the GPU vs on the CPU.

Skipped until gsrq.cache exists. The model is float32 on both sides, so the
GPU and CPU runs differ only by float rounding (and by the GPU kernels where
the cache uses them): the generated tokens must be identical, except after a
step whose top-2 logits were a near tie (|gap| < 1e-3) on the CPU, where the
two runs may legitimately part ways (the comparison stops there).
"""

from __future__ import annotations

import pytest
import torch

cache_mod = pytest.importorskip("gsrq.cache")
transformers = pytest.importorskip("transformers")

from gsrq.config import GSRQConfig, KindConfig  # noqa: E402


class _Books:
    """The part of the gsrq.Codebooks contract that GSRQCache.from_codebooks reads."""

    def __init__(self, config, books, num_layers, num_kv_heads, head_dim):
        self.config = config
        self._books = books
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def codebooks(self, layer, kind):
        return self._books[(layer, kind)].numpy()

    def aux(self, layer, kind, name):
        return None


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return m


def _books(model, kind_cfg):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (4, 64), generator=g)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_mod.generate_cache_kwarg(): cache})
    books = {}
    C = 64 // kind_cfg.D
    for layer in range(2):
        lk = cache.layers[layer]
        for kind, t in (("keys", lk.keys), ("values", lk.values)):
            x = t.reshape(-1, 64)
            out = torch.empty(1, C, kind_cfg.M, kind_cfg.Kc, kind_cfg.D)
            for c in range(C):
                r = x[:, c * kind_cfg.D : (c + 1) * kind_cfg.D].clone()
                for m in range(kind_cfg.M):
                    cent = r[torch.randperm(r.shape[0], generator=g)[: kind_cfg.Kc]].clone()
                    out[0, c, m] = cent
                    r = r - cent[torch.cdist(r, cent).argmin(1)]
            books[(layer, kind)] = out
    cfg = GSRQConfig(keys=kind_cfg, values=kind_cfg, sinks=4, window=8)
    return _Books(cfg, books, 2, 2, 64)


def _generate(model, books, ids, device, steps, *, fused=False, mask=None, **kw):
    """Greedy generation with a fresh GSRQCache on ``device``; ``fused``: attend with attn_implementation="gsrq"."""
    import copy

    from gsrq.attention import enable_fused_attention

    model = copy.deepcopy(model).to(device)
    if fused:
        enable_fused_attention(model)
    cache = cache_mod.GSRQCache.from_codebooks(books, model.config, device)
    assert all(layer.fused_active() == fused for layer in cache.layers)
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
            do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            **{cache_mod.generate_cache_kwarg(): cache}, **kw,
        )
    return out.sequences.cpu(), [s.float().cpu() for s in out.scores]


def _same_up_to_near_ties(seq_a, scores_a, seq_b, scores_b, prompt_len, steps, atol=5e-2):
    """Tokens equal until a step whose top-2 logits (run a) were within 1e-3; logits close until then."""
    for b in range(seq_a.shape[0]):
        for t in range(steps):
            torch.testing.assert_close(scores_b[t][b], scores_a[t][b], atol=atol, rtol=atol)
            if int(seq_a[b, prompt_len + t]) != int(seq_b[b, prompt_len + t]):
                top2 = scores_a[t][b].topk(2).values
                gap = float(top2[0] - top2[1])
                assert gap < 1e-3, f"row {b} step {t}: runs chose differently with a margin of {gap:.3g}"
                break  # the continuations legitimately differ from here on


@pytest.mark.parametrize("kind_cfg", [KindConfig(D=16, Kc=64, M=2), KindConfig(D=64, Kc=256, M=4)])
def test_greedy_generation_gpu_matches_cpu(kind_cfg):
    """GSRQCache on CUDA (CUDA encode kernel, dense decode path) vs the CPU path (Rust encoder)."""
    from gsrq import attention

    model = _model()
    books = _books(model, kind_cfg)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    steps = 24
    cpu_seq, cpu_scores = _generate(model, books, ids, "cpu", steps)
    before = dict(attention.CALLS)
    gpu_seq, gpu_scores = _generate(model, books, ids, "cuda", steps)
    assert attention.CALLS == before  # the dense path: no decode_attention call
    assert cpu_seq.shape == gpu_seq.shape
    _same_up_to_near_ties(cpu_seq, cpu_scores, gpu_seq, gpu_scores, ids.shape[1], steps)


@pytest.mark.parametrize("kind_cfg", [KindConfig(D=16, Kc=64, M=2), KindConfig(D=64, Kc=256, M=4)])
def test_fused_generation_gpu_matches_cpu(kind_cfg):
    """The whole CUDA path (encode kernel + fused decode attention through attn_implementation="gsrq")
    vs the CPU dense reconstruction path, greedy."""
    from gsrq import attention

    model = _model()
    books = _books(model, kind_cfg)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    steps = 24
    cpu_seq, cpu_scores = _generate(model, books, ids, "cpu", steps)
    before = dict(attention.CALLS)
    gpu_seq, gpu_scores = _generate(model, books, ids, "cuda", steps, fused=True)
    assert attention.CALLS["fused"] - before["fused"] == 2 * (steps - 1)  # every decode step of both layers
    assert attention.CALLS["fallback"] == before["fallback"]
    _same_up_to_near_ties(cpu_seq, cpu_scores, gpu_seq, gpu_scores, ids.shape[1], steps)


def test_fused_generation_left_padding_gpu_matches_cpu():
    """A left-padded batch on the fused CUDA path (padding tracked: each row's first real tokens are its sinks)
    vs the same batch on the CPU dense path."""
    from gsrq import attention
    from gsrq.cache import track_padding

    model = track_padding(_model())
    books = _books(model, KindConfig(D=64, Kc=256, M=4))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (3, 36), generator=g)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 5), (2, 11)):
        ids[row, :pads], mask[row, :pads] = 0, 0
    steps = 16
    cpu_seq, cpu_scores = _generate(model, books, ids, "cpu", steps, mask=mask)
    before = attention.CALLS["fused"]
    gpu_seq, gpu_scores = _generate(model, books, ids, "cuda", steps, fused=True, mask=mask)
    assert attention.CALLS["fused"] - before == 2 * (steps - 1)
    _same_up_to_near_ties(cpu_seq, cpu_scores, gpu_seq, gpu_scores, ids.shape[1], steps)


@pytest.mark.parametrize("kind_cfg", [KindConfig(D=64, Kc=256, M=8), KindConfig(D=16, Kc=64, M=2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantizer_encode_cuda_matches_rust(kind_cfg, dtype):
    """KVQuantizer.encode on CUDA (the encode kernel) vs the Rust encoder on the CPU, tie-aware:
    every GPU code is a nearest codeword of its own residual (float64 check), and all but a tiny
    fraction of rows are identical to the Rust encoder's."""
    from test_encode_gpu import _greedy_check

    from gsrq.quantizer import KVQuantizer, _rust_engine
    from gsrq.reference import unpack_codes_torch

    if _rust_engine() is None:
        pytest.skip("the Rust engine is not built")
    g = torch.Generator().manual_seed(5)
    H, C = 1, 128 // kind_cfg.D
    books = torch.randn(H, C, kind_cfg.M, kind_cfg.Kc, kind_cfg.D, generator=g)
    books = books * (0.8 ** torch.arange(kind_cfg.M)).view(1, 1, -1, 1, 1)
    x = torch.randn(2, 8, 300, 128, generator=g).to(dtype)
    gpu = KVQuantizer(books, kind_cfg, device="cuda").encode(x.cuda()).packed
    assert gpu.is_cuda and gpu.shape == (2, 8, 300, KVQuantizer(books, kind_cfg).row_bytes)
    rust = KVQuantizer(books, kind_cfg, engine="rust").encode(x).packed
    bits, n = kind_cfg.code_bits, C * kind_cfg.M
    gcodes = unpack_codes_torch(gpu.cpu(), bits, n)  # [2, 8, 300, C*M], ordered c*M + m
    rows = gcodes.permute(0, 2, 1, 3).reshape(-1, 8, C, kind_cfg.M)
    _greedy_check(x.float().permute(0, 2, 1, 3).reshape(-1, 8, 128), books, rows)
    differ = (gpu.cpu() != rust).any(-1).float().mean().item()
    assert differ <= 2e-3, f"{differ:.2%} of rows differ from the Rust encoder"


@pytest.mark.parametrize("fused", [True, False])
def test_cache_updates_and_fused_attention_never_sync(fused):
    """GSRQCache updates on CUDA (prefill encode, decode-step encode, dense reconstruction or the
    compressed view) and the fused attention call make no host-device synchronisation
    (torch's sync debug mode turns any into an error)."""
    from gsrq import attention

    model = _model()
    books = _books(model, KindConfig(D=64, Kc=256, M=4))

    def fresh_layer():
        cache = cache_mod.GSRQCache.from_codebooks(books, model.config, "cuda", fused=fused)
        return cache.layers[0]

    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 2, 60, 64, device="cuda", generator=g)
    v = torch.randn(2, 2, 60, 64, device="cuda", generator=g)
    q = torch.randn(2, 8, 1, 64, device="cuda", generator=g)

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(layer, t0, t1):
        outs = []
        for t in range(t0, t1):
            key, value = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
            if fused:
                outs.append(attention.gsrq_attention_forward(None, q, key, value, None, scaling=0.125)[0])
            else:  # the dense reconstruction, attended by torch directly
                outs.append(sdpa(q, key, value, scale=0.125, enable_gqa=True).transpose(1, 2))
        return outs

    warm = fresh_layer()  # loads the kernels and caches the device limits and launch plans
    warm.update(k[:, :, :40], v[:, :, :40])
    run(warm, 40, 42)
    before = attention.CALLS["fused"]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer = fresh_layer()
        layer.update(k[:, :, :40], v[:, :, :40])
        outs = run(layer, 40, 46)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert attention.CALLS["fused"] - before == (6 if fused else 0)
    # and the result is the attention over the dense reconstruction
    dense = fresh_layer()
    dense.fused = False
    dense.update(k[:, :, :40], v[:, :, :40])
    for t, out in zip(range(40, 46), outs):
        kd, vd = dense.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        ref = sdpa(q, kd, vd, scale=0.125, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
