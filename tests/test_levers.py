"""Key levers: fitting, code domain + chain-rule gradients, round trips, fused attention, calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gsrq.attention import CompressedKV
from gsrq.config import GSRQConfig, KindConfig
from gsrq.errors import InvalidValueError, ShapeError
from gsrq.levers import GRAD_SCALE_EPS, KeyLevers, fit_key_levers, fit_key_scale, fit_key_scale_grad, rotation_signs
from gsrq.quantizer import KVQuantizer, hadamard_matrix
from gsrq.reference import decode_attention_dequant, fused_decode_attention_ref

HD = 16
LEVERS = [
    dict(key_rotation=r, key_scale=s != "none", key_scale_fit="rms" if s == "none" else s, key_norm=n)
    for r, s, n in itertools.product(("none", "hadamard", "hadamard_signs"), ("none", "rms", "grad"), (False, True))
]


def _grads(x: torch.Tensor, seed: int = 11) -> torch.Tensor:
    """Loss gradients for keys x: channel energies spread over two decades, independent of the key scales."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g) * torch.logspace(1, -1, x.shape[-1]).roll(5)


def _keys(n: int, heads: int = 2, seed: int = 0) -> torch.Tensor:
    """Keys with very different channel scales (like post-RoPE keys): float32 [heads, n, HD]."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, HD)
    return torch.randn(heads, n, HD, generator=g) * scales + 0.3


def _numpy_hadamard(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def test_rotation_signs_seeded():
    a = rotation_signs(0, 3, 64)
    assert a.dtype == np.float32 and a.shape == (64,)
    assert set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a, rotation_signs(0, 3, 64))
    assert not np.array_equal(a, rotation_signs(0, 4, 64))
    assert not np.array_equal(a, rotation_signs(1, 3, 64))


def test_fit_key_scale_is_channel_rms():
    x = _keys(500)
    s = fit_key_scale(x)
    want = np.sqrt((x.double().numpy() ** 2).mean(axis=1)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s, want)
    # a dead channel is floored, not zero
    x[:, :, 3] = 0
    s = fit_key_scale(x)
    assert (s[:, 3] > 0).all() and np.allclose(s[:, 3], s.max() * 1e-6, rtol=5e-2)  # float16 subnormal
    with pytest.raises(InvalidValueError):
        fit_key_scale(torch.zeros(1, 4, HD))
    with pytest.raises(ShapeError):
        fit_key_scale(torch.ones(4, HD))


def test_fit_key_scale_grad_numpy_oracle():
    g = _grads(_keys(400)).double().numpy()
    e = (g**2).mean(axis=1)  # [H, hd]
    for p in (0.5, 1.0):
        s = fit_key_scale_grad(torch.from_numpy(e), p)
        want = (e + GRAD_SCALE_EPS * e.mean(axis=1, keepdims=True)) ** (-p / 2)
        want = want / np.exp(np.log(want).mean(axis=1, keepdims=True))
        np.testing.assert_allclose(s, want.astype(np.float16).astype(np.float32), rtol=1e-6)
        assert s.shape == e.shape and s.dtype == np.float32
    # the channel with the most gradient energy is stretched most in the code domain y = x / scale
    s = fit_key_scale_grad(torch.from_numpy(e))
    assert (np.argmin(s, axis=1) == np.argmax(e, axis=1)).all()
    # a channel without gradient is not divided by zero
    e0 = e.copy()
    e0[:, 2] = 0
    assert np.isfinite(fit_key_scale_grad(torch.from_numpy(e0))).all()
    with pytest.raises(InvalidValueError):
        fit_key_scale_grad(np.zeros((2, HD)))
    with pytest.raises(InvalidValueError):
        fit_key_scale_grad(-np.ones((2, HD)))
    with pytest.raises(ShapeError):
        fit_key_scale_grad(np.ones(HD))


def test_grad_key_scale_needs_gradients():
    from gsrq.errors import ConfigError

    cfg = GSRQConfig(key_scale=True, key_scale_fit="grad")
    with pytest.raises(ConfigError, match="gradients"):
        fit_key_levers(cfg, 0, _keys(10))
    with pytest.raises(ConfigError, match="key_scale_fit"):
        GSRQConfig(key_scale=True, key_scale_fit="fisher")
    with pytest.raises(ConfigError, match="key_scale_power"):
        GSRQConfig(key_scale=True, key_scale_fit="grad", key_scale_power=0)
    # one 16-bit row per KV head is counted, also with shared codebooks
    r = cfg.rate_report(1024, head_dim=64, num_kv_heads=3)
    assert r["scales"] == pytest.approx(3 * 64 * 16 / (2 * 1024 * 3 * 64))


@pytest.mark.parametrize("lev", LEVERS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_code_domain_matches_quantizer_and_chain_rule(lev):
    cfg = GSRQConfig(keys=KindConfig(D=8, Kc=4, M=1), values=KindConfig(D=8, Kc=4, M=1), per_head=True, seed=5, **lev)
    x = _keys(64)
    levers = fit_key_levers(cfg, 2, x, _grads(x))
    assert levers.any == (lev["key_rotation"] != "none" or lev["key_scale"] or lev["key_norm"])
    # independent oracle of the rotation: numpy Sylvester matrix, rows times the seeded signs
    if lev["key_rotation"] != "none":
        r = _numpy_hadamard(HD)
        if lev["key_rotation"] == "hadamard_signs":
            r = rotation_signs(5, 2, HD)[:, None] * r
            assert set(levers.aux_tensors()) >= {"signs"}
        np.testing.assert_allclose(levers.rotation.numpy(), r, atol=1e-6)
    if lev["key_scale"]:
        assert levers.aux_tensors()["scale"].shape == (2, HD)
    books = torch.randn(2, 2, 1, 4, 8)
    q = KVQuantizer(books, cfg.keys, rotation=levers.rotation, scale=levers.scale, norm=levers.norm)
    gx = torch.randn_like(x)
    y, gy, norms = levers.to_code_domain(x, gx)
    yq, nq = q.to_code_domain(x.unsqueeze(0))
    torch.testing.assert_close(y, yq[0], rtol=1e-6, atol=1e-6)
    if lev["key_norm"]:
        torch.testing.assert_close(norms, nq[0].float())
    # chain rule: g_y is the gradient of L(x(y)) = <gx, x(y)> with x(y) the quantizer's decode map
    yv = y.clone().requires_grad_(True)
    xr = q.from_code_domain(yv.unsqueeze(0), None if nq is None else nq)[0]
    (gx * xr).sum().backward()
    torch.testing.assert_close(gy, yv.grad, rtol=1e-5, atol=1e-5)


def _reference_roundtrip(x, books, rotation, scale, norm):
    """Independent numpy: levers, greedy RQ (ties to lowest), sum of codewords, levers undone."""
    y = x.double().numpy()
    if rotation is not None:
        y = y @ rotation
    if scale is not None:
        y = y / scale[:, None, :]
    n = None
    if norm:
        n = np.linalg.norm(y, axis=-1)
        y = y / n[..., None]
        n = n.astype(np.float16).astype(np.float64)
    H, C, M, Kc, D = books.shape
    out = np.zeros_like(y)
    for h in range(y.shape[0]):
        for c in range(C):
            r = y[h, :, c * D : (c + 1) * D].copy()
            rec = np.zeros_like(r)
            for m in range(M):
                cb = books[h, c, m].astype(np.float64)
                d = ((r[:, None, :] - cb[None]) ** 2).sum(-1)
                k = d.argmin(1)
                rec += cb[k]
                r -= cb[k]
            out[h, :, c * D : (c + 1) * D] = rec
    if norm:
        out = out * n[..., None]
    if scale is not None:
        out = out * scale[:, None, :]
    if rotation is not None:
        out = out @ rotation.T
    return out


@pytest.mark.parametrize("lev", LEVERS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_lever_round_trip_and_fused_attention(lev):
    cfg = GSRQConfig(keys=KindConfig(D=8, Kc=16, M=2), values=KindConfig(D=8, Kc=16, M=2), per_head=True, seed=1, **lev)
    H, T = 2, 40
    x = _keys(T, H, seed=3)
    levers = fit_key_levers(cfg, 0, x, _grads(x))
    g = torch.Generator().manual_seed(7)
    kbooks = torch.randn(H, 2, 2, 16, 8, generator=g) * (0.3 if lev["key_norm"] else 1.0)
    kq = KVQuantizer(kbooks, cfg.keys, rotation=levers.rotation, scale=levers.scale, norm=levers.norm)
    enc = kq.encode(x.unsqueeze(0))
    dec = kq.decode(enc.packed, enc.norms)[0]
    want = _reference_roundtrip(x, kbooks.numpy(), None if levers.rotation is None else levers.rotation.double().numpy(),
                                levers.scale, levers.norm)
    np.testing.assert_allclose(dec.double().numpy(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kq.fake_quant(x.unsqueeze(0))[0], dec)

    # fused lookup-table attention == dequantize-then-attend with the lever's query map and norms
    vbooks = torch.randn(H, 2, 2, 16, 8, generator=g)
    vq = KVQuantizer(vbooks, cfg.values)
    v = torch.randn(1, H, T, HD, generator=g)
    venc = vq.encode(v)
    Ts = 3
    ckv = CompressedKV(
        sink_keys=torch.randn(1, H, Ts, HD, generator=g), sink_values=torch.randn(1, H, Ts, HD, generator=g),
        key_codes=enc.packed, value_codes=venc.packed, key_codebooks=kq.codebooks, value_codebooks=vq.codebooks,
        key_bits=kq.code_bits, value_bits=vq.code_bits,
        window_keys=torch.zeros(1, H, 0, HD), window_values=torch.zeros(1, H, 0, HD),
        key_norms=None if enc.norms is None else enc.norms.float(), query_map=kq.query_map,
    )
    qv = torch.randn(1, 4, HD, generator=g)
    scale = HD**-0.5
    fused = fused_decode_attention_ref(qv, ckv, scale, split_tokens=16)
    dequant = decode_attention_dequant(qv, ckv, scale)
    torch.testing.assert_close(fused, dequant, rtol=1e-4, atol=1e-5)
    # and both equal plain attention on the quantizer's own decode
    keys = torch.cat([ckv.sink_keys, dec.unsqueeze(0)], 2).repeat_interleave(2, 1)
    vals = torch.cat([ckv.sink_values, vq.decode(venc.packed)], 2).repeat_interleave(2, 1)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", qv, keys) * scale, -1)
    torch.testing.assert_close(fused, torch.einsum("bht,bhtd->bhd", p, vals), rtol=1e-4, atol=1e-5)


def test_norm_lever_quantizes_unit_vectors():
    cfg = GSRQConfig(key_norm=True)
    lev = fit_key_levers(cfg, 0, _keys(10))
    y, _, n = lev.to_code_domain(_keys(10))
    torch.testing.assert_close(torch.linalg.vector_norm(y, dim=-1), torch.ones(2, 10))
    assert n is not None and n.shape == (2, 10)
    assert not KeyLevers(None, None, None, False).any


@pytest.mark.parametrize("lev", [dict(key_rotation="hadamard_signs", key_scale=True, key_norm=True),
                                 dict(key_rotation="hadamard", key_norm=True),
                                 dict(key_rotation="hadamard", key_scale=True, key_scale_fit="grad", key_norm=True),
                                 dict(key_rotation="hadamard", key_scale=True, key_scale_fit="grad", key_norm=True,
                                      grad_weights="off")])
def test_calibrate_with_levers(tiny_llama, byte_tokenizer, tmp_path, lev):
    """Calibration stores the lever tensors, trains keys in the code domain, and the file serves a cache."""
    from gsrq.calibration import calibrate
    from gsrq.codebooks import Codebooks

    rng = np.random.default_rng(0)
    text = " ".join("".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(800))
    cfg = GSRQConfig(keys=KindConfig(D=16, Kc=8, M=2), values=KindConfig(D=16, Kc=8, M=2), iters=3, init_iters=3,
                     max_samples=512, **lev)
    cbs = calibrate(tiny_llama, byte_tokenizer, text, cfg, tokens=1024, seq_len=128, progress=False)
    path = tmp_path / "levers.safetensors"
    cbs.save(path)
    cbs = Codebooks.load(path)
    hd = 32
    for layer in range(2):
        signs = cbs.aux(layer, "keys", "signs")
        if lev["key_rotation"] == "hadamard_signs":
            np.testing.assert_array_equal(signs, rotation_signs(cfg.seed, layer, hd))
        else:
            assert signs is None
        scale = cbs.aux(layer, "keys", "scale")
        assert (scale is not None) == lev.get("key_scale", False)
        q = KVQuantizer.from_codebooks(cbs, layer, "keys")
        assert q.norm and q.rotation is not None
        if lev.get("key_scale_fit") == "grad":
            # one row per KV head (shared codebooks), geometric mean 1 per row, folded into the query map
            kv = tiny_llama.config.num_key_value_heads
            assert scale.shape == (kv, hd) and (scale > 0).all()
            np.testing.assert_allclose(np.exp(np.log(scale.astype(np.float64)).mean(axis=1)), 1.0, rtol=2e-3)
            assert q.query_map.shape == (kv, hd, hd)
        # norm lever: the code domain is unit vectors, so stage-1 codewords have norm <= ~1
        books = cbs.codebooks(layer, "keys")
        assert np.linalg.norm(books[:, :, 0], axis=-1).max() < 1.01
    held = cbs.calibration["heldout_reconstruction"]["keys"]["mean_over_layers"]
    assert 0 < held["cosine"] <= 1 and np.isfinite(held["rel_mse"])


def test_ablation_train_quantizers_on_synthetic_capture():
    """The ablation's training path: levers + code-domain weights + engine, and the quantizers it returns."""
    from gsrq.eval.ablation import Capture, grid, reconstruction, train_quantizers

    g = torch.Generator().manual_seed(0)
    x = {(l, k): (torch.randn(300, 2, HD, generator=g) * torch.logspace(-1, 1, HD)).numpy() for l in range(2)
         for k in ("keys", "values")}
    grads = {key: torch.randn(300, 2, HD, generator=g).numpy() for key in x}
    held = {key: v[:50] for key, v in x.items()}
    cap = Capture(x, grads, held, 2, 2, HD, {"tokens": 300})
    cfg = GSRQConfig(keys=KindConfig(D=8, Kc=16, M=2), values=KindConfig(D=16, Kc=16, M=1), iters=3, init_iters=3,
                     key_rotation="hadamard_signs", key_scale=True, key_norm=True, max_samples=400)
    qs = train_quantizers(cfg, cap, progress=False)
    assert set(qs) == {(l, k) for l in range(2) for k in ("keys", "values")}
    kq = qs[1, "keys"]
    np.testing.assert_allclose(kq.rotation.numpy(), hadamard_matrix(HD, torch.from_numpy(rotation_signs(0, 1, HD))).numpy())
    assert kq.norm and kq.scale.shape == (2, HD) and kq.query_map.shape == (2, HD, HD)  # per KV head, shared books
    assert np.array_equal(kq.codebooks.numpy(), kq.codebooks.numpy().astype(np.float16).astype(np.float32))
    rec = reconstruction(qs, cap)
    assert rec["keys"]["cosine"] > 0.5 and rec["values"]["rel_mse"] < 1
    # every grid entry is a valid configuration for SmolLM2's shapes
    for label, c in grid(4096).items():
        c.validate_for(64, 3)
