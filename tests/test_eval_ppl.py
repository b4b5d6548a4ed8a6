"""Fake-quantization perplexity: exactness of the identity, the sink and window
boundaries, and window attention against a direct per-query oracle."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gsrq.errors import InvalidValueError, ShapeError
from gsrq.eval.ppl import (
    FakeQuantCache,
    cache_kwarg,
    forward_logits,
    identity_quantizer,
    perplexity,
)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _ids(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (1, T), generator=g)


def _noise(scale):
    """A deterministic 'quantizer': adds noise that depends only on the position."""
    noise = scale * torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(7))

    def q(x):
        return x + noise[:, :, : x.shape[-2], :].to(x.dtype)
    return q


def test_identity_quantizer_reproduces_logits_exactly(tiny_model):
    ids = _ids(40)
    plain = forward_logits(tiny_model, ids, None)
    fake = forward_logits(tiny_model, ids, lambda layer, kind: identity_quantizer, sinks=4)
    assert torch.equal(plain, fake)
    windows = [_ids(33, s)[0] for s in range(3)]
    a = perplexity(tiny_model, windows, None, progress=False)
    b = perplexity(tiny_model, windows, lambda l, k: identity_quantizer, progress=False)
    assert a.nll == b.nll and a.tokens == b.tokens == 3 * 32


def test_ppl_matches_manual_cross_entropy(tiny_model):
    ids = _ids(30)
    res = perplexity(tiny_model, [ids[0]], None, progress=False)
    with torch.no_grad():
        logits = tiny_model(ids).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = -sum(float(logp[t, ids[0, t + 1]]) for t in range(29))
    assert res.tokens == 29
    assert math.isclose(res.ppl, math.exp(nll / 29), rel_tol=1e-5)


def test_sinks_stay_exact_and_rest_is_quantized():
    seen = {}

    def factory(layer, kind):
        def q(x):
            seen[(layer, kind)] = x.shape
            return torch.zeros_like(x)
        return q

    cache = FakeQuantCache(factory, sinks=3)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    k_hat, v_hat = cache.update(k, v, 0)
    assert torch.equal(k_hat[:, :, :3], k[:, :, :3]) and torch.equal(v_hat[:, :, :3], v[:, :, :3])
    assert not k_hat[:, :, 3:].any() and not v_hat[:, :, 3:].any()
    assert seen[(0, "keys")] == (1, 2, 7, 8)
    # the cache keeps exact tensors
    assert torch.equal(cache.layers[0].keys, k)


def test_quantizer_returning_wrong_shape_is_an_error():
    cache = FakeQuantCache(lambda l, k: (lambda x: x[..., :-1]), sinks=0)
    with pytest.raises(ShapeError, match="layer 0 keys"):
        cache.update(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 0)
    with pytest.raises(InvalidValueError):
        FakeQuantCache(lambda l, k: None, sinks=-1)


class _StreamingOracle(DynamicCache):
    """Token-by-token decoding: at step i the cache returns key/value j exact iff
    i - j < window or j < sinks, else quant(x)[j] (quant sees positions sinks..i)."""

    def __init__(self, quant, sinks, window):
        super().__init__()
        self.quant, self.sinks, self.window = quant, sinks, window

    def update(self, k, v, layer_idx, *args, **kwargs):
        keys, values = super().update(k, v, layer_idx, *args, **kwargs)
        i = keys.shape[-2] - 1
        pos = torch.arange(i + 1)
        exact = ((i - pos) < self.window) | (pos < self.sinks)

        def sel(x):
            xq = torch.cat([x[..., : self.sinks, :], self.quant(x[..., self.sinks :, :])], dim=-2)
            return torch.where(exact[None, None, :, None], x, xq)

        return sel(keys), sel(values)


def _oracle_logits(model, ids, quant, sinks, window):
    cache = _StreamingOracle(quant, sinks, window)
    out = []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            out.append(model(input_ids=ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("window", [1, 5])
def test_window_attention_matches_per_query_oracle(tiny_model, window):
    ids = _ids(14)
    quant = _noise(0.5)
    got = forward_logits(tiny_model, ids, lambda l, k: quant, sinks=2, window=window)
    want = _oracle_logits(tiny_model, ids, quant, sinks=2, window=window)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the window matters
    no_window = forward_logits(tiny_model, ids, lambda l, k: quant, sinks=2, window=0)
    assert (got - no_window).abs().max() > 1e-3


def test_window_covering_everything_is_the_exact_model(tiny_model):
    ids = _ids(20)
    plain = forward_logits(tiny_model, ids, None)
    got = forward_logits(tiny_model, ids, lambda l, k: _noise(1.0), sinks=0, window=20)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    # the model's attention implementation is restored afterwards
    assert tiny_model.config._attn_implementation != "gsrq_fakequant"


# ------------------------------------------------------------ method specs
def test_method_specs():
    from gsrq.config import GSRQConfig
    from gsrq.errors import ConfigError
    from gsrq.eval.methods import parse_method, parse_methods

    ms = parse_methods("fp16, kivi2, km:1, gsrq:1, gsrq:0.5, gsrq:1:nograd, gsrq:1:D=16:M=2:tau=2")
    assert [m.name for m in ms] == ["fp16", "kivi", "gsrq", "gsrq", "gsrq", "gsrq", "gsrq"]
    assert ms[1].kivi_bits == 2
    assert ms[2].config == GSRQConfig.from_bits(1.0, method="km")
    assert ms[3].config == GSRQConfig.from_bits(1.0) and ms[3].label == "GSRQ 1 bit"
    assert ms[4].config.code_bits_per_element == 0.5
    assert ms[5].config.grad_weights == "off"
    c = ms[6].config
    assert (c.keys.D, c.keys.M, c.values.D, c.values.M, c.tau) == (16, 2, 16, 2, 2.0)
    for bad in ("gsrq", "gsrq:x", "gsrq:1:bogus", "gsrq:1:D=16", "kivi9", "foo", "gsrq:3"):
        with pytest.raises(ConfigError):
            parse_method(bad)


def test_rates_and_cache_bytes():
    from gsrq.eval.methods import cache_bytes, parse_method, rates

    fp = parse_method("fp16")
    assert cache_bytes(fp, None, 4096, num_layers=30, head_dim=64, num_kv_heads=3, sinks=4, window=0) == \
        2 * 4096 * 3 * 64 * 30 * 2
    g = parse_method("gsrq:1")
    r = rates(g, None, 1024, head_dim=64, num_kv_heads=3, sinks=4, window=0)
    assert r["code"] == 1.0
    # codes + 16-bit key norms (the preset's key_norm) + 4 exact tokens at 16 bits + codebooks shared by the
    # KV heads (1 chunk x (10 key + 6 value) stages x 256 x 64 x 16 bits) + the gradient key scale (one
    # 16-bit row of 64 per KV head)
    assert not g.config.per_head and g.config.key_norm and g.config.key_scale_fit == "grad"
    want = (2 * 1020 * 3 * 64 * 1 + 1020 * 3 * 16 + 2 * 4 * 3 * 64 * 16 + 16 * 256 * 64 * 16 + 3 * 64 * 16) / (
        2 * 1024 * 3 * 64)
    assert math.isclose(r["total"], want)
    r64 = rates(g, None, 1024, head_dim=64, num_kv_heads=3, sinks=4, window=64)
    assert r64["total"] > r["total"]


def test_exact_prefill_cache_attends_the_prompt_exactly(tiny_model):
    ids = _ids(12)
    zero = lambda l, k: (lambda x: torch.zeros_like(x))  # noqa: E731
    plain = forward_logits(tiny_model, ids, None)
    cache = FakeQuantCache(zero, sinks=2, exact_prefill=True)
    with torch.no_grad():
        first = tiny_model(input_ids=ids, use_cache=True, **{cache_kwarg(tiny_model): cache}).logits
        assert torch.equal(first, plain)
        # the next step sees the stored prompt reconstructed (zeros after the sinks)
        nxt = tiny_model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(tiny_model): cache}).logits
    ref = FakeQuantCache(zero, sinks=2)
    with torch.no_grad():
        tiny_model(input_ids=ids, use_cache=True, **{cache_kwarg(tiny_model): ref})
        want = tiny_model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(tiny_model): ref}).logits
    torch.testing.assert_close(nxt, want)


# ---------------------------------------------------------- reconstruction
def test_reconstruction_metrics_known_values():
    from gsrq.eval.recon import reconstruction_metrics

    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    m = reconstruction_metrics(x, y)
    assert math.isclose(m["mse"], (16 + 1) / 4)
    assert math.isclose(m["nmse"], 17 / 26)
    assert math.isclose(m["cosine"], (3 / 5 + 1) / 2)
    assert math.isclose(m["gain_err"], (2 / 5 + 1) / 2)
    with pytest.raises(ShapeError):
        reconstruction_metrics(x, y[:1])


def test_layer_metrics_on_captured_kv(tiny_model):
    from gsrq.eval.kivi import KiviQuantizer
    from gsrq.eval.recon import capture_kv, layer_metrics, summary_rows

    windows = torch.cat([_ids(20, 3), _ids(20, 4)])
    cap = capture_kv(tiny_model, windows)
    assert len(cap) == 2 and cap[0]["keys"].shape == (2, 2, 20, 16)
    # the captured keys are what the cache received: compare with a direct forward
    cache = DynamicCache()
    with torch.no_grad():
        tiny_model(input_ids=windows[:1], use_cache=True, **{cache_kwarg(tiny_model): cache})
    assert torch.equal(cap[1]["values"][:1], cache.layers[1].values)
    ident = layer_metrics(cap, lambda l, k: identity_quantizer, sinks=4)
    assert ident["keys"]["mse"] == [0.0, 0.0] and all(math.isclose(c, 1.0) for c in ident["values"]["cosine"])
    kivi = layer_metrics(cap, lambda l, k: KiviQuantizer(k), sinks=4)
    assert all(0 < v < 1 for v in kivi["keys"]["nmse"])
    rows = summary_rows(kivi)
    assert rows[-1][0] == "mean" and math.isclose(rows[-1][1], sum(kivi["keys"]["mse"]) / 2)


# --------------------------------------------------------------------- CLI
def _tiny_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(90)]
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    t.save_pretrained(path)
    g = torch.Generator().manual_seed(5)
    text = " ".join(words[i] for i in torch.randint(0, 90, (400,), generator=g).tolist())
    (path / "text.txt").write_text(text)
    return model, t, text


def test_cli_ppl_end_to_end(tmp_path, capsys):
    import argparse
    import json

    pytest.importorskip("gsrq.data")
    from gsrq.eval import cli

    model, tok, text = _tiny_model_dir(tmp_path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([
        "ppl", "--model", str(tmp_path), "--text", str(tmp_path / "text.txt"), "--ctx", "32", "--windows", "3",
        "--methods", "fp16,kivi2", "--window", "0,8", "--json", str(tmp_path / "out.json"),
        "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "ppl.png"), "--no-progress",
        "--codebooks", str(tmp_path / "books")])
    assert cli.run(args) == 0
    out = capsys.readouterr()
    assert "identity check" in out.err and "exact" in out.err
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [(r["spec"], r["window"]) for r in rows] == [("fp16", 0), ("fp16", 8), ("kivi2", 0), ("kivi2", 8)]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[:96]).reshape(3, 32)
    want = perplexity(model, windows, None, progress=False)
    assert math.isclose(rows[0]["ppl"], want.ppl, rel_tol=1e-6)
    assert math.isclose(rows[1]["ppl"], want.ppl, rel_tol=1e-4)  # identity through window attention
    assert rows[0]["code_bits"] == 16.0 and rows[2]["code_bits"] == 2.0
    assert "| KIVI 2-bit" in out.out and (tmp_path / "ppl.png").stat().st_size > 1000
    assert (tmp_path / "out.csv").read_text().startswith("method,spec,window")


def test_codebooks_are_calibrated_once_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("gsrq.calibration")
    pytest.importorskip("gsrq.quantizer")
    from gsrq.eval import methods as M

    _tiny_model_dir(tmp_path)
    model, tok, model_id = M.load_model_and_tokenizer(str(tmp_path))
    method = M.parse_method("gsrq:1:D=8:Kc=16:M=2:iters=2:init_iters=2")
    calib = M.CalibrationSettings(tokens=256, seq_len=32, text=str(tmp_path / "text.txt"))
    cbs, path = M.load_or_calibrate(method, model, tok, model_id, tmp_path / "books", calib, progress=False,
                                    log=lambda s: None)
    assert path.is_file() and cbs.config.keys.D == 8

    def boom(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(M, "run_calibration", boom)
    cbs2, path2 = M.load_or_calibrate(method, model, tok, model_id, tmp_path / "books", calib, progress=False,
                                      log=lambda s: None)
    assert path2 == path
    np = pytest.importorskip("numpy")
    np.testing.assert_array_equal(cbs2.codebooks(1, "keys"), cbs.codebooks(1, "keys"))
    # another calibration setting is another file
    other = M.codebook_path(tmp_path / "books", method, model_id, model.config,
                            M.CalibrationSettings(tokens=512, seq_len=32, text=str(tmp_path / "text.txt")))
    assert other != path
    # the fake-quantized perplexity uses the codebooks: finite and not the fp16 one
    ids = tok((tmp_path / "text.txt").read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[:64]).reshape(2, 32)
    base = perplexity(model, windows, None, progress=False).ppl
    q = perplexity(model, windows, M.quantizer_factory(method, cbs), progress=False).ppl
    assert math.isfinite(q) and q != base
