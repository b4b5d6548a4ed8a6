"""GSRQCache in model.generate with a tiny random LLaMA (GQA) and codebooks trained here.

Oracles: DynamicCache (when nothing is coded the outputs must be identical) and
an independent fake-quantizing cache that keeps everything exact and replaces
tokens by ``KVQuantizer.fake_quant`` according to the sink/window rule.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from gsrq.attention import CompressedKV
from gsrq.cache import GSRQCache, GSRQLayer, generate_cache_kwarg, model_shapes
from gsrq.config import GSRQConfig, KindConfig
from gsrq.engine import ResidualQuantizer
from gsrq.errors import ConfigError, InvalidValueError, ModelMismatchError, ShapeError
from gsrq.quantizer import KVQuantizer

KIND = KindConfig(D=8, Kc=16, M=2)  # 2 chunks x 2 stages x 4 bits = 1 bit per element
CACHE_KW = generate_cache_kwarg()


def tiny_config(**overrides) -> LlamaConfig:
    params = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


# ----------------------------------------------------------- codebook training
def train_rq(x: torch.Tensor, kc: KindConfig, seed: int) -> torch.Tensor:
    """GSKM residual codebooks per chunk position (the Rust engine), x [N, hd] -> [1, C, M, Kc, D]."""
    C = x.shape[1] // kc.D
    books = []
    for c in range(C):
        rq = ResidualQuantizer(kc.D, kc.Kc, kc.M, "gskm", seed=seed + c, iters=5, init_iters=5, threads=1)
        books.append(torch.from_numpy(rq.fit(x[:, c * kc.D : (c + 1) * kc.D].numpy()).codebooks.copy()))
    return torch.stack(books).unsqueeze(0)


class TinyCodebooks:
    """The part of the gsrq.Codebooks contract that the cache reads."""

    def __init__(self, config: GSRQConfig, books: dict, *, num_layers: int, num_kv_heads: int, head_dim: int):
        self.config = config
        self._books = books
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def codebooks(self, layer: int, kind: str):
        return self._books[(layer, kind)].numpy()

    def aux(self, layer: int, kind: str, name: str):
        return None


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config()).eval()
    # sharper attention than the default init, so that key errors change outputs
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return m


@pytest.fixture(scope="module")
def codebooks(model) -> TinyCodebooks:
    """Codebooks trained on the model's own keys/values over random token sequences."""
    ids = torch.randint(3, 96, (8, 48), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_KW: cache})
    books = {}
    for layer in range(2):
        lk = cache.layers[layer]
        for kind, t in (("keys", lk.keys), ("values", lk.values)):
            books[(layer, kind)] = train_rq(t.reshape(-1, 16), KIND, seed=10 * layer)
    cfg = GSRQConfig(keys=KIND, values=KIND, sinks=2, window=3)
    return TinyCodebooks(cfg, books, num_layers=2, num_kv_heads=2, head_dim=16)


def make_cache(codebooks, model, **kw) -> GSRQCache:
    return GSRQCache.from_codebooks(codebooks, model.config, **kw)


# ------------------------------------------------------------- oracle cache
class FakeQuantLayer(DynamicLayer):
    """Keeps everything exact; returns tokens sinks <= p < L_before - window as fake_quant(x)."""

    def __init__(self, kq: KVQuantizer, vq: KVQuantizer, sinks: int, window: int):
        super().__init__()
        self.kq, self.vq, self.sinks, self.window = kq, vq, sinks, window

    def update(self, key_states, value_states, *args, **kwargs):
        before = self.get_seq_length()
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        lo, hi = self.sinks, before - self.window
        if hi > lo:
            keys, values = keys.clone(), values.clone()
            keys[:, :, lo:hi] = self.kq.fake_quant(keys[:, :, lo:hi])
            values[:, :, lo:hi] = self.vq.fake_quant(values[:, :, lo:hi])
        return keys, values


def oracle_cache(gc: GSRQCache) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [FakeQuantLayer(l.key_quantizer, l.value_quantizer, gc.sinks, gc.window) for l in gc.layers]
    return cache


def generate(model, ids, cache, mask=None, **kw):
    torch.manual_seed(123)
    args = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    args.update(kw)
    if mask is not None:
        args["attention_mask"] = mask
    return model.generate(ids, **{CACHE_KW: cache}, **args)


# =================================================================== layer unit tests
def layer_of(codebooks, sinks: int, window: int, layer: int = 0) -> GSRQLayer:
    return GSRQLayer(
        KVQuantizer.from_codebooks(codebooks, layer, "keys"),
        KVQuantizer.from_codebooks(codebooks, layer, "values"),
        sinks=sinks,
        window=window,
    )


def expected_return(kq, vq, K, V, before, sinks, window):
    """What update must return for a call that brings the sequence from `before` tokens to K.shape[2]."""
    ek, ev = K.clone(), V.clone()
    lo, hi = sinks, before - window
    if hi > lo:
        ek[:, :, lo:hi] = kq.fake_quant(K[:, :, lo:hi])
        ev[:, :, lo:hi] = vq.fake_quant(V[:, :, lo:hi])
    return ek, ev


@pytest.mark.parametrize("sinks,window", [(2, 3), (0, 0), (4, 0), (0, 2), (3, 1)])
def test_update_semantics_token_by_token(codebooks, sinks, window) -> None:
    g = torch.Generator().manual_seed(7)
    B, Hkv, T, hd = 2, 2, 16, 16
    K = torch.randn(B, Hkv, T, hd, generator=g)
    V = torch.randn(B, Hkv, T, hd, generator=g)
    layer = layer_of(codebooks, sinks, window)
    kq, vq = layer.key_quantizer, layer.value_quantizer
    prompt = 6
    # prefill: the prompt is attended exactly
    rk, rv = layer.update(K[:, :, :prompt], V[:, :, :prompt])
    torch.testing.assert_close(rk, K[:, :, :prompt], rtol=0, atol=0)
    torch.testing.assert_close(rv, V[:, :, :prompt], rtol=0, atol=0)
    for L in range(prompt, T + 1):
        if L > prompt:  # one decode step bringing the length from L-1 to L
            rk, rv = layer.update(K[:, :, L - 1 : L], V[:, :, L - 1 : L])
            ek, ev = expected_return(kq, vq, K[:, :, :L], V[:, :, :L], L - 1, sinks, window)
            torch.testing.assert_close(rk, ek, rtol=0, atol=1e-6)
            torch.testing.assert_close(rv, ev, rtol=0, atol=1e-6)
        # stored state after the call: sinks, coded [sinks, L - window), exact window
        ts = min(sinks, L)
        tc = max(0, L - window - sinks)
        assert (layer.num_sink, layer.num_coded, layer.num_window) == (ts, tc, L - ts - tc)
        assert layer.get_seq_length() == L
        torch.testing.assert_close(layer.sink_keys, K[:, :, :ts], rtol=0, atol=0)
        torch.testing.assert_close(layer.window_values, V[:, :, ts + tc : L], rtol=0, atol=0)
        torch.testing.assert_close(
            kq.decode(layer.key_codes, layer.key_norms), kq.fake_quant(K[:, :, ts : ts + tc]), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            vq.decode(layer.value_codes), vq.fake_quant(V[:, :, ts : ts + tc]), rtol=0, atol=1e-6
        )


def test_window_boundary_step(codebooks) -> None:
    """Token p is stored coded by the call that makes the length p + window + 1; it is attended
    exactly up to and including that call and through its codes from the next one on."""
    sinks, window = 2, 3
    g = torch.Generator().manual_seed(3)
    K = torch.randn(1, 2, 12, 16, generator=g)
    V = torch.randn(1, 2, 12, 16, generator=g)
    layer = layer_of(codebooks, sinks, window)
    p = 5
    layer.update(K[:, :, :4], V[:, :, :4])
    for L in range(5, 12):
        rk, _ = layer.update(K[:, :, L - 1 : L], V[:, :, L - 1 : L])
        if L <= p:
            continue
        exact = torch.equal(rk[:, :, p], K[:, :, p])
        assert exact == (L <= p + window + 1), L
        # stored coded exactly from the call that brings the length to p + window + 1
        assert (layer.num_coded > p - sinks) == (L >= p + window + 1), L
    assert not torch.allclose(layer.key_quantizer.fake_quant(K[:, :, p : p + 1]), K[:, :, p : p + 1])


def test_chunked_prefill_and_dtype(codebooks) -> None:
    g = torch.Generator().manual_seed(9)
    K = torch.randn(1, 2, 10, 16, generator=g).to(torch.bfloat16)
    V = torch.randn(1, 2, 10, 16, generator=g).to(torch.bfloat16)
    layer = layer_of(codebooks, 1, 2)
    layer.update(K[:, :, :4], V[:, :, :4])
    rk, rv = layer.update(K[:, :, 4:9], V[:, :, 4:9])  # 5 new tokens at once: all exact in their call
    assert rk.dtype == torch.bfloat16 and rk.shape == (1, 2, 9, 16)
    torch.testing.assert_close(rk[:, :, 4:], K[:, :, 4:9], rtol=0, atol=0)
    torch.testing.assert_close(rk[:, :, :1], K[:, :, :1], rtol=0, atol=0)
    fq = layer.key_quantizer.fake_quant(K[:, :, 1:2].float()).to(torch.bfloat16)
    torch.testing.assert_close(rk[:, :, 1:2], fq, rtol=0, atol=0)  # coded by the first call (window 2)
    torch.testing.assert_close(rk[:, :, 2:4], K[:, :, 2:4], rtol=0, atol=0)  # exact window before this call
    assert (layer.num_sink, layer.num_coded, layer.num_window) == (1, 6, 2)


def test_append_view_matches_update(codebooks) -> None:
    g = torch.Generator().manual_seed(11)
    K = torch.randn(2, 2, 9, 16, generator=g)
    V = torch.randn(2, 2, 9, 16, generator=g)
    a, b = layer_of(codebooks, 2, 2), layer_of(codebooks, 2, 2)
    a.update(K[:, :, :7], V[:, :, :7])
    b.update(K[:, :, :7], V[:, :, :7])
    rk, rv = a.update(K[:, :, 7:8], V[:, :, 7:8])
    view = b.append(K[:, :, 7:8], V[:, :, 7:8])
    assert isinstance(view, CompressedKV)
    assert view.num_tokens == 8 and view.num_coded == 3
    assert view.key_bits == 4 and view.key_codes.dtype == torch.uint8 and view.key_codes.shape == (2, 2, 3, 2)
    assert view.key_codebooks.shape == (1, 2, 2, 16, 8)
    vk, vv = b.reconstruct(view)
    torch.testing.assert_close(vk, rk, rtol=0, atol=0)
    torch.testing.assert_close(vv, rv, rtol=0, atol=0)
    stored = b.compressed_view()
    assert stored.num_tokens == 8 and stored.num_coded == 4 and stored.window_keys.shape[2] == 2
    assert stored.query_map is None and stored.key_norms is None
    for name in ("key_codes", "value_codes", "sink_keys", "window_values"):
        torch.testing.assert_close(getattr(stored, name), getattr(a.compressed_view(), name), rtol=0, atol=0)


def test_batch_ops(codebooks) -> None:
    g = torch.Generator().manual_seed(5)
    K = torch.randn(3, 2, 10, 16, generator=g)
    V = torch.randn(3, 2, 10, 16, generator=g)

    def filled(rows):
        layer = layer_of(codebooks, 2, 2)
        layer.update(K[rows, :, :8], V[rows, :, :8])
        return layer

    full = filled([0, 1, 2])
    # reorder == a cache built from the reordered batch; codes are per row, so this is lossless
    idx = torch.tensor([2, 0, 0])
    full.reorder_cache(idx)
    ref = filled([2, 0, 0])
    for name in GSRQLayer._STATE:
        a, b = getattr(full, name), getattr(ref, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    sel = filled([0, 1, 2])
    sel.batch_select_indices(torch.tensor([1]))
    rep = filled([1])
    rep.batch_repeat_interleave(2)
    ref1, ref11 = filled([1]), filled([1, 1])
    for name in ("key_codes", "sink_values", "window_keys"):
        torch.testing.assert_close(getattr(sel, name), getattr(ref1, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(rep, name), getattr(ref11, name), rtol=0, atol=0)
    # the next update after a reorder returns the reordered reconstruction
    rk, _ = full.update(K[[2, 0, 0], :, 8:9], V[[2, 0, 0], :, 8:9])
    rk2, _ = ref.update(K[[2, 0, 0], :, 8:9], V[[2, 0, 0], :, 8:9])
    torch.testing.assert_close(rk, rk2, rtol=0, atol=0)


def test_crop(codebooks) -> None:
    g = torch.Generator().manual_seed(6)
    K = torch.randn(1, 2, 12, 16, generator=g)
    V = torch.randn(1, 2, 12, 16, generator=g)
    layer = layer_of(codebooks, 2, 3)
    assert not layer.is_croppable and layer_of(codebooks, 2, 0).is_croppable
    rk, _ = layer.update(K[:, :, :10], V[:, :, :10])
    rk, _ = layer.update(K[:, :, 10:11], V[:, :, 10:11])  # returns 11 tokens
    layer.crop(-4)  # 7 left: 2 sinks, 5 coded, empty window
    assert (layer.num_sink, layer.num_coded, layer.num_window) == (2, 5, 0)
    # crop moves no data; shrink_to_fit then releases the buffers' spare capacity
    before = layer.memory_report()
    assert before["reserved"] > before["codes"] + before["exact"]
    layer.shrink_to_fit()
    assert (layer.num_sink, layer.num_coded, layer.num_window) == (2, 5, 0)
    for name in GSRQLayer._STATE:  # shrunk tensors do not pin their old buffers
        t = getattr(layer, name)
        if t is not None and t.numel():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    after = layer.memory_report()
    assert after["reserved"] == after["codes"] + after["exact"] and after["codes"] == before["codes"]
    nk, _ = layer.update(K[:, :, 7:8], V[:, :, 7:8])
    torch.testing.assert_close(nk[:, :, :7], rk[:, :, :7], rtol=0, atol=0)
    torch.testing.assert_close(nk[:, :, 7], K[:, :, 7], rtol=0, atol=0)
    layer.crop(0)
    assert layer.get_seq_length() == 8
    layer.crop(1)  # positive: keep the first token only
    assert (layer.num_sink, layer.num_coded, layer.num_window) == (1, 0, 0)
    layer.update(K[:, :, 1:4], V[:, :, 1:4])
    assert (layer.num_sink, layer.num_coded, layer.num_window) == (2, 0, 2)
    torch.testing.assert_close(layer.sink_keys, K[:, :, :2], rtol=0, atol=0)
    # window 0: crop is an exact rollback
    w0a, w0b = layer_of(codebooks, 1, 0), layer_of(codebooks, 1, 0)
    w0a.update(K[:, :, :9], V[:, :, :9])
    w0a.crop(-3)
    w0b.update(K[:, :, :6], V[:, :, :6])
    for name in GSRQLayer._STATE:
        a, b = getattr(w0a, name), getattr(w0b, name)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_bad_input(codebooks) -> None:
    layer = layer_of(codebooks, 2, 2)
    with pytest.raises(ShapeError, match="head_dim"):
        layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ShapeError, match="differ"):
        layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16))
    layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    with pytest.raises(ShapeError, match="do not match the cache"):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    with pytest.raises(ConfigError, match="window"):
        layer_of(codebooks, 2, -1)
    with pytest.raises(ShapeError, match="nothing"):
        layer_of(codebooks, 2, 2).compressed_view()


# ===================================================================== generate
def prompt(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("beams", [1, 3])
def test_nothing_coded_reproduces_dynamic_cache(model, codebooks, beams) -> None:
    ids = prompt(9)
    cache = make_cache(codebooks, model, window=64)
    out = generate(model, ids, cache, num_beams=beams)
    ref = generate(model, ids, DynamicCache(), num_beams=beams)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert all(l.num_coded == 0 for l in cache.layers)


def test_sampling_runs_and_reproduces_dynamic_cache(model, codebooks) -> None:
    ids = prompt(9, seed=2)
    out = generate(model, ids, make_cache(codebooks, model, window=64), do_sample=True, top_k=20)
    ref = generate(model, ids, DynamicCache(), do_sample=True, top_k=20)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    coded = make_cache(codebooks, model)
    out = generate(model, ids, coded, do_sample=True, top_k=20)
    assert out.shape == (1, 19) and coded.layers[0].num_coded > 0


def test_greedy_with_codes_matches_fake_quant_oracle(model, codebooks) -> None:
    ids = prompt(12, seed=4)
    cache = make_cache(codebooks, model, sinks=2, window=3)
    out = generate(model, ids, cache, max_new_tokens=12)
    # independent oracle: a manual greedy loop over a fake-quantizing exact cache
    oracle = oracle_cache(cache)
    seq = ids
    step_ids = ids
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=step_ids, use_cache=True, **{CACHE_KW: oracle}).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            step_ids = nxt
    torch.testing.assert_close(out, seq, rtol=0, atol=0)
    # the codes really changed something: exact attention generates differently
    assert not torch.equal(out, generate(model, ids, DynamicCache(), max_new_tokens=12))
    assert cache.get_seq_length() == 23
    assert [(l.num_sink, l.num_coded, l.num_window) for l in cache.layers] == [(2, 18, 3)] * 2


def test_beam_search_with_codes_matches_oracle(model, codebooks) -> None:
    ids = prompt(10, seed=8)
    cache = make_cache(codebooks, model, sinks=1, window=2)
    out = generate(model, ids, cache, num_beams=3, num_return_sequences=2)
    ref = generate(model, ids, oracle_cache(cache), num_beams=3, num_return_sequences=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert cache.layers[0].num_coded > 0


def test_batch_with_left_padding(model, codebooks) -> None:
    a, b = prompt(11, seed=12)[0], prompt(6, seed=13)[0]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 5:], mask[1, 5:] = b, 1
    big = generate(model, ids, make_cache(codebooks, model, window=64), mask=mask)
    ref = generate(model, ids, DynamicCache(), mask=mask)
    torch.testing.assert_close(big, ref, rtol=0, atol=0)
    cache = make_cache(codebooks, model, sinks=2, window=2)
    out = generate(model, ids, cache, mask=mask)
    ref = generate(model, ids, oracle_cache(cache), mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the unpadded row is unaffected by its neighbour's padding
    single = generate(model, a[None], make_cache(codebooks, model, sinks=2, window=2))
    torch.testing.assert_close(out[0], single[0], rtol=0, atol=0)


# =================================================================== accounting and errors
def test_memory_bytes_hand_count(model, codebooks) -> None:
    cache = make_cache(codebooks, model, sinks=2, window=3)
    with torch.no_grad():
        model(input_ids=prompt(12, batch=2), use_cache=True, **{CACHE_KW: cache})
    B, Hkv, hd, layers, T = 2, 2, 16, 2, 12
    exact = layers * 2 * B * Hkv * (2 + 3) * hd * 4  # fp32 model
    R = 2  # 2 chunks x 2 stages x 4 bits = 16 bits
    codes = layers * 2 * B * Hkv * (T - 5) * R
    report = cache.memory_report()
    reserved = report.pop("reserved")
    assert report == {"codes": codes, "norms": 0, "exact": exact, "codebooks": 0, "total": codes + exact}
    assert cache.memory_bytes() == codes + exact
    # reserved is all that is held: every storage behind the state, spare capacity included
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for layer in cache.layers
        for name in GSRQLayer._STATE
        if (t := getattr(layer, name)) is not None and t.numel()
    }
    assert sum(held.values()) == reserved == cache.reserved_bytes() == cache.memory_bytes(reserved=True)
    assert reserved > codes + exact
    assert all(layer.batch_size == B for layer in cache.layers)
    books = layers * 2 * (2 * 2 * 16 * 8) * 2  # [1, C=2, M=2, Kc=16, D=8] in 16 bits
    assert cache.codebook_bytes() == books
    assert cache.memory_bytes(include_codebooks=True) == codes + exact + books
    elements = layers * 2 * B * Hkv * T * hd
    assert cache.num_elements() == elements
    assert cache.bits_per_element() == pytest.approx(8 * (codes + exact) / elements)
    # long contexts approach the code rate
    long = make_cache(codebooks, model, sinks=0, window=0)
    with torch.no_grad():
        model(input_ids=prompt(40), use_cache=True, **{CACHE_KW: long})
    assert long.bits_per_element() == pytest.approx(1.0)


def test_wrong_model_raises(model, codebooks) -> None:
    for field, cfg in (
        ("num_kv_heads", tiny_config(num_key_value_heads=4)),
        ("head_dim", tiny_config(head_dim=32)),
        ("num_layers", tiny_config(num_hidden_layers=3)),
    ):
        with pytest.raises(ModelMismatchError, match=field):
            GSRQCache.from_codebooks(codebooks, cfg)
    # the codebooks' own fingerprint check runs too
    checked = copy.copy(codebooks)

    def check_model(hf_config):
        raise ModelMismatchError("codebooks have model_type='gpt2', the model has model_type='llama'")

    checked.check_model = check_model
    with pytest.raises(ModelMismatchError, match="model_type"):
        GSRQCache.from_codebooks(checked, model.config)


def test_model_shapes_and_kwarg() -> None:
    assert model_shapes(tiny_config()) == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16}
    assert model_shapes(tiny_config(head_dim=None, num_key_value_heads=None)) == {
        "num_layers": 2,
        "num_kv_heads": 4,
        "head_dim": 16,
    }
    with pytest.raises(ModelMismatchError):
        model_shapes(SimpleNamespace(hidden_size=64))
    assert CACHE_KW in ("cache", "past_key_values")


def test_from_pretrained_codebook_file(model, codebooks, tmp_path) -> None:
    cb_mod = pytest.importorskip("gsrq.codebooks", reason="gsrq.codebooks (codebook files) is not built here")
    tensors = {f"layers.{l}.{k}.codebooks": codebooks.codebooks(l, k) for l in range(2) for k in ("keys", "values")}
    cbs = cb_mod.Codebooks.build(codebooks.config, model.config, tensors, {"text": "random tokens"}, "tiny-llama", "float32")
    path = tmp_path / "tiny.gsrq.safetensors"
    cbs.save(path)
    cache = GSRQCache.from_pretrained(str(path), model)
    assert (cache.sinks, cache.window) == (codebooks.config.sinks, codebooks.config.window)
    ids = prompt(10, seed=21)
    ref_cache = make_cache(codebooks, model)
    torch.testing.assert_close(generate(model, ids, cache), generate(model, ids, ref_cache), rtol=0, atol=0)
    assert cache.layers[0].num_coded > 0
    other = LlamaForCausalLM(tiny_config(vocab_size=128)).eval()
    with pytest.raises(ModelMismatchError, match="vocab_size"):
        GSRQCache.from_pretrained(str(path), other)
    with pytest.raises(ModelMismatchError, match="num_kv_heads"):
        GSRQCache.from_pretrained(str(path), LlamaForCausalLM(tiny_config(num_key_value_heads=4)).eval())


def test_key_levers_in_cache(codebooks) -> None:
    """Rotation, channel scale and norms: stored norms, decoded keys, view maps and byte count."""
    from gsrq.quantizer import hadamard_matrix

    g = torch.Generator().manual_seed(17)
    books = torch.from_numpy(codebooks.codebooks(0, "keys").copy())
    books = books / books.reshape(-1, 8).norm(dim=-1).mean() / 2  # unit-vector scale
    scale = torch.rand(1, 16, generator=g) + 0.5
    kq = KVQuantizer(books, KIND, rotation=hadamard_matrix(16), scale=scale, norm=True)
    vq = KVQuantizer.from_codebooks(codebooks, 0, "values")
    layer = GSRQLayer(kq, vq, sinks=1, window=2)
    K = torch.randn(2, 2, 9, 16, generator=g) * 5
    V = torch.randn(2, 2, 9, 16, generator=g)
    layer.update(K[:, :, :8], V[:, :, :8])
    rk, _ = layer.update(K[:, :, 8:], V[:, :, 8:])
    assert layer.key_norms.shape == (2, 2, 6) and layer.key_norms.dtype == torch.float16
    torch.testing.assert_close(layer.key_norms, (K[:, :, 1:7] @ hadamard_matrix(16) / scale).norm(dim=-1).half())
    torch.testing.assert_close(rk[:, :, 1:6], kq.fake_quant(K[:, :, 1:6]), rtol=0, atol=1e-5)
    view = layer.compressed_view()
    assert view.key_norms.data_ptr() == layer.key_norms.data_ptr() and torch.equal(view.key_norms, layer.key_norms)
    assert view.query_map.shape == (1, 16, 16) and view.value_map is None
    mem = layer.memory_report()
    assert mem["norms"] == 2 * 2 * 6 * 2
    assert mem["codes"] == 2 * (2 * 2 * 6 * 2)


def test_early_initialization_and_bf16(model, codebooks) -> None:
    """Cache.early_initialization (export/compile recipes) and a bfloat16 model."""
    bf = copy.deepcopy(model).to(torch.bfloat16)
    ids = prompt(9, seed=30)
    cache = make_cache(codebooks, bf, sinks=2, window=2)
    cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert cache.get_seq_length() == 0 and all(l.is_initialized for l in cache.layers)
    out = generate(bf, ids, cache)
    ref = generate(bf, ids, oracle_cache(cache))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert cache.layers[0].sink_keys.dtype == torch.bfloat16 and cache.layers[0].num_coded > 0
    same = generate(bf, ids, make_cache(codebooks, bf, window=64))
    torch.testing.assert_close(same, generate(bf, ids, DynamicCache()), rtol=0, atol=0)


# ============================================================ fused decode hook and left padding
def fused_model(model):
    """A copy of the model attending with attn_implementation="gsrq" (and tracking padding)."""
    from gsrq.attention import enable_fused_attention

    return enable_fused_attention(copy.deepcopy(model))


def calls(kind: str = "reference") -> int:
    from gsrq import attention

    return attention.CALLS[kind]


@pytest.mark.parametrize("beams", [1, 3])
def test_fused_hook_generation_matches_dense_path(model, codebooks, beams) -> None:
    """attn_implementation="gsrq" + GSRQCache (decode steps over the packed codes, the torch reference
    of the fused kernels on the CPU) generates what the dense reconstruction path generates."""
    ids = prompt(12, seed=40, batch=2)
    steps = 10
    dense_cache = make_cache(codebooks, model, sinks=2, window=3)
    assert not dense_cache.layers[0].fused_active()  # the model attends with sdpa
    dense = generate(model, ids, dense_cache, max_new_tokens=steps, num_beams=beams)
    fm = fused_model(model)
    assert fm.config._attn_implementation == "gsrq"
    cache = make_cache(codebooks, fm, sinks=2, window=3)
    assert all(layer.fused_active() for layer in cache.layers)
    before = calls()
    out = generate(fm, ids, cache, max_new_tokens=steps, num_beams=beams)
    # every decode step of every layer went through decode_attention (steps - 1 after the prefill)
    assert calls() - before == (steps - 1) * 2
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    assert cache.layers[0].num_coded > 0
    # and the codes matter on this path too: exact attention generates differently
    if beams == 1:
        assert not torch.equal(out, generate(model, ids, DynamicCache(), max_new_tokens=steps))


def test_fused_decode_logits_match_dense(model, codebooks) -> None:
    """One decode step: the hook's logits equal the dense path's to float rounding."""
    ids = prompt(14, seed=41, batch=2)
    fm = fused_model(model)
    caches = [make_cache(codebooks, m, sinks=2, window=2) for m in (model, fm)]
    outs = []
    with torch.no_grad():
        for m, c in zip((model, fm), caches):
            m(input_ids=ids, use_cache=True, **{CACHE_KW: c})
            outs.append(m(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: c}).logits)
    assert caches[1].layers[0].num_coded == 11  # 15 tokens: 2 sinks, 11 coded, 2 exact
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_fused_modes(model, codebooks) -> None:
    ids = prompt(8, seed=42)
    # fused=False keeps the dense path even when the model attends with "gsrq"
    fm = fused_model(model)
    off = make_cache(codebooks, fm, fused=False)
    before = calls()
    generate(fm, ids, off, max_new_tokens=4)
    assert calls() == before
    # fused=True on a model that does not attend with "gsrq": the placeholder is not read -> error
    on = make_cache(codebooks, model, fused=True)
    with pytest.raises(ConfigError, match="attn_implementation='gsrq'"):
        generate(model, ids, on, max_new_tokens=4)
    with pytest.raises(ConfigError, match="fused"):
        make_cache(codebooks, model, fused="yes")
    checked = make_cache(codebooks, model, check_values=True).layers[1]
    assert checked.key_quantizer.check_values is True and checked.value_quantizer.check_values is True


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :], mask[i, P - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("fused", [False, True])
def test_left_padding_matches_unpadded_rows(model, codebooks, fused) -> None:
    """A left-padded batch generates, row by row, what each row generates alone (codes, sinks, window)."""
    rows = [prompt(n, seed=50 + n)[0] for n in (13, 10, 8)]  # 0, 3 and 5 padding tokens
    ids, mask = left_padded(rows)
    from gsrq.cache import track_padding

    m = fused_model(model) if fused else track_padding(copy.deepcopy(model))
    steps = 8
    cache = make_cache(codebooks, m, sinks=2, window=2)
    before = calls()
    out = generate(m, ids, cache, mask=mask, max_new_tokens=steps)
    assert (calls() - before > 0) == fused
    layer = cache.layers[0]
    assert layer.head_positions is not None and layer.head_positions.tolist()[2][:7] == [5, 6, 0, 1, 2, 3, 4]
    for i, r in enumerate(rows):
        single_cache = make_cache(codebooks, m, sinks=2, window=2)
        single = generate(m, r[None], single_cache, max_new_tokens=steps)
        torch.testing.assert_close(out[i, ids.shape[1] :], single[0, len(r) :], rtol=0, atol=0)
        # the stored sinks are the row's first real tokens, as in its unpadded run
        for got, want in zip(cache.layers, single_cache.layers):
            torch.testing.assert_close(got.sink_keys[i], want.sink_keys[0])
            torch.testing.assert_close(got.window_values[i], want.window_values[0])
    # without the padding information the padded rows' sinks are padding tokens and the codes differ
    plain = make_cache(codebooks, model, sinks=2, window=2)
    generate(model, ids, plain, mask=mask, max_new_tokens=steps)
    assert not torch.allclose(plain.layers[0].sink_keys[2], cache.layers[0].sink_keys[2])


def test_left_padding_beam_search(model, codebooks) -> None:
    from gsrq.cache import track_padding

    rows = [prompt(n, seed=60 + n)[0] for n in (11, 7)]
    ids, mask = left_padded(rows)
    m = track_padding(fused_model(model))
    out = generate(m, ids, make_cache(codebooks, m, sinks=2, window=1), mask=mask, num_beams=2, max_new_tokens=8)
    for i, r in enumerate(rows):
        single = generate(m, r[None], make_cache(codebooks, m, sinks=2, window=1), num_beams=2, max_new_tokens=8)
        torch.testing.assert_close(out[i, ids.shape[1] :], single[0, len(r) :], rtol=0, atol=0)


def test_padding_errors(model, codebooks) -> None:
    cache = make_cache(codebooks, model, sinks=2, window=1)
    with pytest.raises(InvalidValueError, match="without any token"):
        cache.set_padding(torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ShapeError, match="batch, prompt"):
        cache.set_padding(torch.ones(3))
    cache.set_padding(torch.tensor([[0, 1, 1, 1]]))  # one row known, two rows come
    with pytest.raises(ShapeError, match="padding is known for 1 rows"):
        with torch.no_grad():
            model(input_ids=prompt(4, batch=2), use_cache=True, **{CACHE_KW: cache})
    cache = make_cache(codebooks, model, sinks=2, window=1)
    cache.set_padding(torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with torch.no_grad():
        model(input_ids=prompt(6, batch=2), use_cache=True, **{CACHE_KW: cache})
    with pytest.raises(ConfigError, match="before the first"):
        cache.set_padding(None)
    with pytest.raises(InvalidValueError, match="out of sequence order"):
        cache.crop(2)
    cache.crop(5)  # beyond the reordered head: fine
    assert cache.get_seq_length() == 5


# =================================================================== growable storage
def _buffers(layer):
    return layer._kc_buf.data_ptr(), layer._vc_buf.data_ptr(), layer._wk_buf.data_ptr(), layer._wv_buf.data_ptr()


@pytest.mark.parametrize("sinks,window", [(2, 4), (0, 0)])
def test_long_decode_amortised_storage(codebooks, sinks, window) -> None:
    """A long decode loop reallocates O(log T) times, writes in place in between, and stays exact."""
    import gsrq.cache as gc

    g = torch.Generator().manual_seed(21)
    B, Hkv, hd, prompt, T = 1, 2, 16, 10, 700
    K = torch.randn(B, Hkv, T, hd, generator=g)
    V = torch.randn(B, Hkv, T, hd, generator=g)
    layer = layer_of(codebooks, sinks, window)
    kq, vq = layer.key_quantizer, layer.value_quantizer
    layer.update(K[:, :, :prompt], V[:, :, :prompt])
    ptrs, caps = _buffers(layer), [layer.code_capacity]
    start = layer.reallocations
    moves = 0
    for L in range(prompt + 1, T + 1):
        w0 = layer._w0
        view = layer.append(K[:, :, L - 1 : L], V[:, :, L - 1 : L])
        moves += layer._w0 < w0  # the window run went back to the buffer's front
        now = _buffers(layer)
        if layer.code_capacity != caps[-1]:
            caps.append(layer.code_capacity)
        else:  # within capacity nothing moved: the new row was written in place
            assert now[:2] == ptrs[:2]
        assert now[2:] == ptrs[2:]  # the window buffer is never reallocated while decoding
        ptrs = now
        if L % 97 == 0 or L == T:  # the view handed to attention equals the dense oracle
            ek, ev = expected_return(kq, vq, K[:, :, :L], V[:, :, :L], L - 1, sinks, window)
            rk, rv = layer.reconstruct(view)
            torch.testing.assert_close(rk, ek, rtol=0, atol=1e-6)
            torch.testing.assert_close(rv, ev, rtol=0, atol=1e-6)
    tc = T - sinks - window
    assert layer.num_coded == tc and layer.code_capacity >= tc
    # geometric growth: capacities grow by GROWTH (at least MIN_CODE_CHUNK), so O(log T) reallocations
    for a, b in zip(caps, caps[1:]):
        assert b == max(int(a * gc.GROWTH), a + gc.MIN_CODE_CHUNK)
    assert layer.reallocations - start == len(caps) - 1 <= 4
    slack = layer.window_capacity - window
    assert moves <= (T - prompt) // slack + 1
    # stored rows are exactly the encodings of the coded tokens (an independent encode of the same tokens)
    torch.testing.assert_close(layer.key_codes, kq.encode(K[:, :, sinks : sinks + tc]).packed, rtol=0, atol=0)
    torch.testing.assert_close(layer.value_codes, vq.encode(V[:, :, sinks : sinks + tc]).packed, rtol=0, atol=0)
    torch.testing.assert_close(layer.window_keys, K[:, :, T - window :], rtol=0, atol=0)


def test_storage_accounting_and_shrink(codebooks) -> None:
    g = torch.Generator().manual_seed(22)
    B, Hkv, hd, T, sinks, window = 2, 2, 16, 40, 2, 3
    K = torch.randn(B, Hkv, T, hd, generator=g)
    V = torch.randn(B, Hkv, T, hd, generator=g)
    layer = layer_of(codebooks, sinks, window)
    layer.update(K[:, :, :20], V[:, :, :20])
    for t in range(20, 30):
        layer.update(K[:, :, t : t + 1], V[:, :, t : t + 1])
    R, tc = 2, 30 - sinks - window
    in_use = {"codes": 2 * B * Hkv * tc * R, "norms": 0, "exact": 2 * B * Hkv * (sinks + window) * hd * 4}
    rep = layer.memory_report()
    assert {k: rep[k] for k in in_use} == in_use
    reserved = 2 * B * Hkv * layer.code_capacity * R + 2 * B * Hkv * (sinks + layer.window_capacity) * hd * 4
    assert rep["reserved"] == reserved > sum(in_use.values())
    # the cache-level figures: bits_per_element counts the bytes in use, not the capacity
    cache = GSRQCache([layer.key_quantizer], [layer.value_quantizer], sinks=sinks, window=window)
    cache.layers[0] = layer
    assert cache.memory_bytes() == sum(in_use.values()) and cache.reserved_bytes() == reserved
    assert cache.bits_per_element() == pytest.approx(8 * sum(in_use.values()) / (2 * B * Hkv * 30 * hd))
    # batch ops keep the capacity and the contents
    cap = layer.code_capacity
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.code_capacity == cap and layer.memory_report() == rep
    layer.reorder_cache(torch.tensor([1, 0]))
    # shrink_to_fit: reserved == in use, same state, and decoding carries on exactly
    ref = layer_of(codebooks, sinks, window)
    ref.update(K[:, :, :30], V[:, :, :30])
    cache.shrink_to_fit()
    rep2 = layer.memory_report()
    assert rep2["reserved"] == sum(in_use.values()) and {k: rep2[k] for k in in_use} == in_use
    for name in GSRQLayer._STATE:
        a, b = getattr(layer, name), getattr(ref, name)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for t in range(30, T):
        rk, rv = layer.update(K[:, :, t : t + 1], V[:, :, t : t + 1])
        ek, ev = ref.update(K[:, :, t : t + 1], V[:, :, t : t + 1])
        torch.testing.assert_close(rk, ek, rtol=0, atol=0)
        torch.testing.assert_close(rv, ev, rtol=0, atol=0)
