"""Calibration: capture, gradient weights, sampling, training, files, CLI, errors.

Oracles: the model's own DynamicCache contents (capture), central finite
differences in float64 through an independent perturbing cache (gradients),
numpy (weights and norms), and exact k-means when Kc equals the sample count
(what the learner was fed).
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from gsrq.codebooks import Codebooks
from gsrq.config import GSRQConfig, KindConfig
from gsrq.errors import CalibrationError, ConfigError

cal = importlib.import_module("gsrq.calibration")
_rng = np.random.default_rng(1234)
_WORDS = ["".join(_rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=_rng.integers(2, 9))) for _ in range(60)]
TEXT = " ".join(_rng.choice(_WORDS, size=400))  # ~2400 byte tokens, no repeated passages


def small_config(**kw):
    base = dict(keys=KindConfig(D=16, Kc=16, M=2), values=KindConfig(D=8, Kc=16, M=2), max_samples=600, iters=4, init_iters=4)
    base.update(kw)
    return GSRQConfig(**base)


def cache_kw(model, cache):
    return {cal._cache_kwarg(model): cache, "use_cache": True}


# ----------------------------------------------------------------------- capture
def test_capture_shapes_match_config(tiny_llama):
    cfg = tiny_llama.config
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    keys, values, kg, vg, loss = cal.capture_kv(tiny_llama, ids, grad=True)
    want = (2, cfg.num_key_value_heads, 20, cfg.head_dim)
    assert len(keys) == len(values) == len(kg) == len(vg) == cfg.num_hidden_layers
    for t in (*keys, *values, *kg, *vg):
        assert tuple(t.shape) == want and not t.requires_grad
    assert np.isfinite(loss) and loss > 0
    shape = cal.model_shape(tiny_llama)
    assert (shape.num_layers, shape.num_kv_heads, shape.num_attention_heads, shape.head_dim) == (2, 2, 4, 32)


@pytest.mark.parametrize("grad", [False, True])
def test_captured_kv_equal_dynamic_cache(tiny_llama, grad):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = DynamicCache()
    with torch.no_grad():
        tiny_llama(input_ids=ids, **cache_kw(tiny_llama, ref))
    keys, values, *_ = cal.capture_kv(tiny_llama, ids, grad=grad)
    for layer in range(2):
        torch.testing.assert_close(keys[layer], ref.layers[layer].keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values[layer], ref.layers[layer].values, rtol=1e-6, atol=1e-6)
    # post-RoPE: position 0 keys equal k_proj output, later positions differ (rotated)
    hidden = tiny_llama.model.embed_tokens(ids)
    with torch.no_grad():
        pre = tiny_llama.model.layers[0].self_attn.k_proj(tiny_llama.model.layers[0].input_layernorm(hidden))
    pre = pre.view(1, 24, 2, 32).transpose(1, 2)
    torch.testing.assert_close(keys[0][:, :, 0], pre[:, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(keys[0][:, :, 5], pre[:, :, 5], atol=1e-3)


class PerturbCache(DynamicCache):
    """Adds ``eps`` to one entry of one layer's key or value as update receives it (no autograd)."""

    def __init__(self, layer, kind, index, eps):
        super().__init__()
        self.target = (layer, kind, index, eps)

    def update(self, k, v, layer_idx, *args, **kwargs):
        layer, kind, index, eps = self.target
        if layer_idx == layer:
            if kind == "keys":
                k = k.clone()
                k[index] += eps
            else:
                v = v.clone()
                v[index] += eps
        return super().update(k, v, layer_idx, *args, **kwargs)


def _loss(model, ids, cache):
    with torch.no_grad():
        logits = model(input_ids=ids, **cache_kw(model, cache)).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _rmsnorm_in_input_dtype(self, hidden_states):
    # LlamaRMSNorm upcasts to float32; the float64 finite-difference oracle needs float64 throughout
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_gradients_match_finite_differences(monkeypatch):
    from gsrq_testing import make_tiny_llama
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)
    model = make_tiny_llama(seed=3).double()
    cal.freeze(model)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    _, _, kg, vg, loss = cal.capture_kv(model, ids, grad=True)
    assert loss == pytest.approx(_loss(model, ids, DynamicCache()), rel=1e-10)
    eps = 1e-6
    rng = np.random.default_rng(0)
    checked = 0
    for layer in (0, 1):
        for kind, grads in (("keys", kg), ("values", vg)):
            for _ in range(3):
                index = (0, int(rng.integers(2)), int(rng.integers(11)), int(rng.integers(32)))
                fd = (_loss(model, ids, PerturbCache(layer, kind, index, eps)) - _loss(model, ids, PerturbCache(layer, kind, index, -eps))) / (2 * eps)
                assert grads[layer][index].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), (layer, kind, index)
                checked += abs(fd) > 1e-7
    assert checked >= 8  # real, non-vanishing gradients were compared
    # the last position predicts nothing inside the window: its K/V get no gradient
    assert kg[0][0, :, -1].abs().max() == 0 and vg[1][0, :, -1].abs().max() == 0


def test_chunk_norms_vs_numpy():
    g = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(4))
    n = cal.chunk_norms(g, 8)
    ref = np.linalg.norm(g.numpy().reshape(2, 3, 5, 4, 8), axis=-1)
    np.testing.assert_allclose(n.numpy(), ref, rtol=1e-6)
    with pytest.raises(ConfigError):
        cal.chunk_norms(g, 7)


def test_gradient_weights_math():
    rng = np.random.default_rng(5)
    g = rng.lognormal(0, 2, 1001)
    for tau in (0.5, 1.0, 3.0):
        w = cal.gradient_weights(g, tau)
        np.testing.assert_allclose(w, np.log1p(tau * g / np.median(g)), rtol=1e-6)
        assert w.dtype == np.float32
        assert np.median(w) == pytest.approx(np.log1p(tau), rel=1e-6)  # odd count: median maps to log(1+tau)
    # median 0: lambda from the mean of the non-zero norms; all zero: uniform
    g0 = np.array([0, 0, 0, 2.0, 4.0])
    np.testing.assert_allclose(cal.gradient_weights(g0, 1.0), np.log1p(g0 / 3.0), rtol=1e-6)
    np.testing.assert_array_equal(cal.gradient_weights(np.zeros(4), 1.0), np.ones(4, np.float32))
    for bad in (np.array([1.0, -1.0]), np.array([np.nan]), np.array([])):
        with pytest.raises(CalibrationError):
            cal.gradient_weights(bad, 1.0)


def test_plan_is_uniform_subset_and_rows_consistent():
    rng = np.random.default_rng(0)
    p = cal._plan([0, 2, 5], heads_pooled=3, seq_len=10, skip=2, limit=40, rng=rng)
    assert p.selected.size == 40 and np.all(np.diff(p.selected) > 0) and p.selected.max() < 3 * 3 * 7
    seen = []
    for ordinal in range(3):
        dst, heads, pos = p.rows(ordinal)
        assert np.all((heads >= 0) & (heads < 3)) and np.all((pos >= 2) & (pos < 9))
        np.testing.assert_array_equal(p.selected[dst], ordinal * 21 + heads * 7 + (pos - 2))
        seen.append(dst)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(40))
    full = cal._plan([0], heads_pooled=1, seq_len=5, skip=0, limit=99, rng=rng)
    np.testing.assert_array_equal(full.selected, np.arange(4))


# ------------------------------------------------------------------ calibration
def test_training_samples_are_captured_chunks(tiny_llama, byte_tokenizer):
    """Kc == samples with KM: each sample becomes a codeword, so the codebook shows what was fed."""
    cfg = GSRQConfig(
        keys=KindConfig(D=32, Kc=48, M=1), values=KindConfig(D=16, Kc=48, M=1), method="km", max_samples=48, grad_weights="off", sinks=3
    )
    cbs = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=256, seq_len=64, progress=False, storage_dtype="float32")
    from gsrq.data import token_windows

    windows = token_windows(byte_tokenizer, TEXT, 64, 256)
    keys, values, *_ = cal.capture_kv(tiny_llama, windows, grad=False)
    for kind, xs, D in (("keys", keys, 32), ("values", values, 16)):
        x = xs[1].float()  # [4, H, 64, 32]
        cand = x.reshape(4, 2, 64, 32 // D, D)
        book = torch.from_numpy(np.array(cbs.codebooks(1, kind)))  # [1, C, 1, 48, D]
        for c in range(32 // D):
            allowed = cand[:, :, 3:63, c].reshape(-1, D)  # sinks <= position < last
            sinks = torch.cat([cand[:, :, :3, c], cand[:, :, 63:, c]], 2).reshape(-1, D)  # never sampled
            words = book[0, c, 0]
            d_ok = torch.cdist(words, allowed, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
            assert d_ok.max() < 1e-4, kind
            assert torch.cdist(words, sinks, compute_mode="donot_use_mm_for_euclid_dist").min() > 1e-3
    cal_meta = cbs.calibration
    assert cal_meta["windows"] == {"train": 3, "heldout": 1}
    assert cal_meta["samples_per_codebook"] == 48 and cal_meta["samples_available_per_codebook"] == 3 * 2 * 60
    assert cal_meta["positions_skipped_per_window"] == 3


@pytest.mark.parametrize("per_head", [False, True])
def test_key_levers_code_domain(tiny_llama, byte_tokenizer, per_head):
    """Rotation, channel scale and norm: codewords (Kc == samples, KM) are transformed key chunks."""
    cfg = GSRQConfig(
        keys=KindConfig(D=16, Kc=40, M=1), values=KindConfig(D=16, Kc=40, M=1), method="km", max_samples=40,
        key_rotation="hadamard_signs", key_scale=True, key_norm=True, sinks=2, seed=5, per_head=per_head,
    )  # fmt: skip
    cbs = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=192, seq_len=64, progress=False, heldout_fraction=0.0, storage_dtype="float32")
    from gsrq.data import token_windows

    keys, *_ = cal.capture_kv(tiny_llama, token_windows(byte_tokenizer, TEXT, 64, 192), grad=False)
    h = np.ones((1, 1))
    while h.shape[0] < 32:
        h = np.block([[h, h], [h, -h]])
    for layer in range(2):
        signs = np.array(cbs.aux(layer, "keys", "signs"))
        assert set(np.unique(signs)) <= {-1.0, 1.0} and (signs == -1).any()
        y = (keys[layer].double().numpy() * signs) @ (h / np.sqrt(32))  # [3, H, 64, 32] rotated
        y = y[:, :, 2:]  # positions >= sinks
        # RMS per channel: per KV head with per-head codebooks, pooled over the heads when shared
        scale_ref = np.sqrt((y**2).mean(axis=(0, 2))) if per_head else np.sqrt((y**2).mean(axis=(0, 1, 2)))[None]
        scale = np.array(cbs.aux(layer, "keys", "scale"))
        np.testing.assert_allclose(scale, scale_ref, rtol=1e-4)
        u = y / (scale_ref[None, :, None, :] if per_head else scale_ref[None, None])
        u = u / np.linalg.norm(u, axis=-1, keepdims=True)
        book = torch.from_numpy(np.array(cbs.codebooks(layer, "keys"))).double()  # [Hc, 2, 1, 40, 16]
        for hh in range(book.shape[0]):
            mine = u[:, hh] if per_head else u
            cand = torch.from_numpy(np.ascontiguousarray(mine).reshape(-1, 2, 16))  # [samples, C, D]
            for c in range(2):
                d = torch.cdist(book[hh, c, 0], cand[:, c], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
                assert d.max() < 1e-4
    assert cbs.aux(0, "values", "scale") is None


def test_key_levers_agree_with_quantizer(tiny_llama, byte_tokenizer):
    """The cache's KVQuantizer maps captured keys into the domain the codebooks were trained in."""
    quantizer = pytest.importorskip("gsrq.quantizer")
    cfg = GSRQConfig(
        keys=KindConfig(D=16, Kc=40, M=1), values=KindConfig(D=16, Kc=40, M=1), method="km", max_samples=40,
        key_rotation="hadamard_signs", key_scale=True, key_norm=True, sinks=2, seed=6,
    )  # fmt: skip
    cbs = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=192, seq_len=64, progress=False, heldout_fraction=0.0, storage_dtype="float32")
    from gsrq.data import token_windows

    keys, *_ = cal.capture_kv(tiny_llama, token_windows(byte_tokenizer, TEXT, 64, 192), grad=False)
    for layer in range(2):
        q = quantizer.KVQuantizer.from_codebooks(cbs, layer, "keys")
        y, norms = q.to_code_domain(keys[layer].float())
        assert norms is not None
        cand = y[:, :, 2:63].reshape(-1, 2, 16).double()
        book = torch.from_numpy(np.array(cbs.codebooks(layer, "keys"))).double()
        for c in range(2):
            d = torch.cdist(book[0, c, 0], cand[:, c], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
            assert d.max() < 1e-4


@pytest.mark.parametrize("mode", ["all", "init", "off"])
def test_weights_reach_the_learner(tiny_llama, byte_tokenizer, monkeypatch, mode):
    import gsrq.engine as engine

    seen = []
    real = engine.ResidualQuantizer

    class Spy(real):
        def fit(self, x, weights=None):
            seen.append((self.weights_in_init_only, None if weights is None else np.array(weights)))
            return super().fit(x, weights)

    monkeypatch.setattr(engine, "ResidualQuantizer", Spy)
    cfg = small_config(grad_weights=mode, tau=2.0, max_samples=301)
    cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=256, seq_len=64, progress=False)
    assert len(seen) == 2 * (2 + 4)  # layers x (key chunks + value chunks)
    for init_only, w in seen:
        assert init_only == (mode == "init")
        if mode == "off":
            assert w is None
        else:
            assert w.shape == (301,) and (w >= 0).all()
            assert np.median(w) == pytest.approx(np.log1p(2.0), rel=1e-5)


def test_determinism_roundtrip_and_metadata(tiny_llama, byte_tokenizer, tmp_path):
    cfg = small_config(seed=7)
    a = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=384, seq_len=64, progress=False, model_id="tiny")
    b = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=384, seq_len=64, progress=False, model_id="tiny")
    c = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg.replace(seed=8), tokens=384, seq_len=64, progress=False, model_id="tiny")
    assert set(a.tensors) == {f"layers.{l}.{k}.codebooks" for l in range(2) for k in ("keys", "values")}
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
    assert any(not np.array_equal(a.tensors[n], c.tensors[n]) for n in a.tensors)
    assert a.codebooks(0, "keys").shape == (1, 2, 2, 16, 16)
    assert a.codebooks(1, "values").shape == (1, 4, 2, 16, 8)
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.save(p1)
    b.save(p2)
    back = Codebooks.load(p1)
    for name in a.tensors:  # stored as float16 (the default storage dtype)
        np.testing.assert_array_equal(back.tensors[name], a.tensors[name].astype(np.float16).astype(np.float32))
    back.check_model(tiny_llama.config)
    assert back.config == cfg and back.model_id == "tiny"
    m = back.calibration
    assert m["tokens"] == 384 and m["seq_len"] == 64 and m["tau"] == 1.0 and m["seed"] == 7
    assert m["windows"] == {"train": 5, "heldout": 1}
    assert m["samples_per_codebook"] == m["samples_available_per_codebook"] == 5 * 2 * 59  # fewer than max_samples=600
    for kind in ("keys", "values"):
        h = m["heldout_reconstruction"][kind]
        assert len(h["per_layer"]) == 2
        assert 0 < h["mean_over_layers"]["rel_mse"] < 1 and 0 < h["mean_over_layers"]["cosine"] <= 1
    assert m["library_version"] and set(m["seconds"]) == {"capture", "train", "total"}


def test_per_head_shapes(tiny_llama, byte_tokenizer):
    cfg = small_config(per_head=True, max_samples=200)
    cbs = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=256, seq_len=64, progress=False)
    assert cbs.codebooks(0, "keys").shape == (2, 2, 2, 16, 16)
    assert cbs.codebooks(1, "values").shape == (2, 4, 2, 16, 8)
    assert cbs.calibration["samples_available_per_codebook"] == 3 * 1 * 59


def test_heldout_metrics_oracle(tiny_llama, byte_tokenizer):
    """The reported held-out numbers equal an independent numpy encode/decode of held-out windows."""
    cfg = small_config(max_samples=10**6)
    cbs = cal.calibrate(tiny_llama, byte_tokenizer, TEXT, cfg, tokens=256, seq_len=64, progress=False, storage_dtype="float32")
    from gsrq.data import token_windows
    from gsrq.reference import rq_decode_torch, rq_encode_torch

    windows = token_windows(byte_tokenizer, TEXT, 64, 256)
    keys, values, *_ = cal.capture_kv(tiny_llama, windows, grad=False)
    # the held-out window is the one whose samples the plan did not use: find it by its metric
    rel = []
    for w in range(4):
        x = keys[0][w, :, 4:63].reshape(-1, 32).float()  # [H*59, 32], sinks <= position < last
        book = torch.from_numpy(np.array(cbs.codebooks(0, "keys")))[0]  # [C, M, Kc, D]
        rec = rq_decode_torch(rq_encode_torch(x, book), book)
        rel.append(((x - rec) ** 2).sum().item() / (x**2).sum().item())
    reported = cbs.calibration["heldout_reconstruction"]["keys"]["per_layer"][0]["rel_mse"]
    assert min(abs(r - reported) for r in rel) < 1e-4 * max(1.0, reported)


# ------------------------------------------------------------------------ errors
def test_not_llama_like_model(byte_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258, n_positions=128))
    with pytest.raises(CalibrationError, match="gpt2.*not LLaMA-like"):
        cal.calibrate(gpt2, byte_tokenizer, TEXT, small_config(), tokens=128, seq_len=64, progress=False)


def test_error_cases(tiny_llama, byte_tokenizer):
    with pytest.raises(CalibrationError, match="1 windows.*need"):
        cal.calibrate(tiny_llama, byte_tokenizer, "x" * 100, small_config(), tokens=128, seq_len=64, progress=False)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        cal.calibrate(tiny_llama, byte_tokenizer, "short", small_config(), tokens=128, seq_len=64, progress=False)
    with pytest.raises(ConfigError, match="D=12 does not divide head_dim=32"):
        cal.calibrate(tiny_llama, byte_tokenizer, TEXT, small_config(keys=KindConfig(D=12, Kc=16, M=1)), tokens=128, seq_len=64, progress=False)
    with pytest.raises(CalibrationError, match="fewer than Kc=1024"):
        cal.calibrate(tiny_llama, byte_tokenizer, TEXT, small_config(values=KindConfig(D=8, Kc=1024, M=1)), tokens=128, seq_len=64, progress=False)
    with pytest.raises(CalibrationError, match="tokens >= seq_len"):
        cal.calibrate(tiny_llama, byte_tokenizer, TEXT, small_config(), tokens=32, seq_len=64, progress=False)


def test_gsrq_calibrate_is_callable(tiny_llama, byte_tokenizer):
    import gsrq

    assert callable(gsrq.calibrate)
    cbs = gsrq.calibrate(tiny_llama, byte_tokenizer, TEXT, small_config(), tokens=128, seq_len=64, progress=False)
    assert cbs.num_layers == 2


# --------------------------------------------------------------------------- CLI
def parse(argv):
    p = argparse.ArgumentParser()
    cal.add_arguments(p)
    return p.parse_args(argv)


def test_config_from_args():
    assert cal.config_from_args(parse(["--out", "x"])) == GSRQConfig.from_bits(1.0)
    c = cal.config_from_args(parse(["--out", "x", "--bits", "0.5", "--method", "km", "--tau", "2", "--no-grad-weights", "--per-head", "--seed", "3"]))
    assert c == GSRQConfig.from_bits(0.5, method="km", tau=2.0, grad_weights="off", per_head=True, seed=3)
    c = cal.config_from_args(parse(["--out", "x", "--D", "16", "--Kc", "64", "--M", "2", "--key-M", "3", "--value-D", "8", "--grad-weights", "init"]))
    assert c.keys == KindConfig(D=16, Kc=64, M=3) and c.values == KindConfig(D=8, Kc=64, M=2) and c.grad_weights == "init"
    c = cal.config_from_args(parse(["--out", "x", "--key-scale", "grad", "--key-scale-power", "1"]))
    assert c.key_scale and c.key_scale_fit == "grad" and c.key_scale_power == 1.0
    c = cal.config_from_args(parse(["--out", "x", "--key-scale"]))
    assert c.key_scale and c.key_scale_fit == "rms"
    assert not cal.config_from_args(parse(["--out", "x", "--key-scale", "none"])).key_scale
    with pytest.raises(ConfigError, match="either --bits"):
        cal.config_from_args(parse(["--out", "x", "--bits", "1", "--D", "16"]))
    with pytest.raises(ConfigError, match="no preset"):
        cal.config_from_args(parse(["--out", "x", "--bits", "3"]))
    with pytest.raises(ConfigError, match="contradicts"):
        cal.config_from_args(parse(["--out", "x", "--no-grad-weights", "--grad-weights", "all"]))


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_cli_run_end_to_end(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    _byte_level_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "cb.safetensors"
    argv = ["--model", str(model_dir), "--text", str(text), "--tokens", "256", "--seq-len", "64", "--D", "16", "--Kc", "16",
            "--M", "2", "--max-samples", "300", "--iters", "3", "--init-iters", "3", "--dtype", "float32", "--device", "cpu",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cal.run(parse(argv)) == 0
    printed = capsys.readouterr().out
    for word in ("held-out keys", "held-out values", "bits/element", "bytes", "codebooks"):
        assert word in printed
    cbs = Codebooks.load(out)
    cbs.check_model(tiny_llama.config)
    assert cbs.calibration["text"]["file"] == "text.txt" and cbs.calibration["text"]["chars"] == len(TEXT)
    # text too short for the requested tokens: clear error, no file written
    out2 = tmp_path / "cb2.safetensors"
    argv2 = [a if a != "256" else "100000" for a in argv]
    argv2[argv2.index(str(out))] = str(out2)
    with pytest.raises(CalibrationError, match="fewer --tokens"):
        cal.run(parse(argv2))
    assert not out2.exists()
    with pytest.raises(CalibrationError, match="output directory"):
        cal.run(parse([*argv[:-3], "--out", str(tmp_path / "no" / "x.safetensors")]))


# ------------------------------------------------------------------ real model
@pytest.mark.model
@pytest.mark.slow
def test_smollm2_capture_shapes(smollm2):
    model, tok, _ = smollm2
    ids = torch.tensor([tok("The history of the Roman Empire spans many centuries.", add_special_tokens=False)["input_ids"]])
    keys, values, kg, vg, loss = cal.capture_kv(model, ids, grad=True)
    assert len(keys) == 30 and tuple(keys[0].shape) == (1, 3, ids.shape[1], 64)
    assert tuple(vg[29].shape) == (1, 3, ids.shape[1], 64)
    assert 0 < loss < 10 and torch.isfinite(kg[0]).all() and kg[0].abs().sum() > 0
