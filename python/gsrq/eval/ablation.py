"""Ablation of GSRQ's quality levers: capture once, then fit + train + evaluate per configuration.

``gsrq eval ablation`` (or ``python -m gsrq.eval.ablation``):

1. **Capture, once.** Calibration windows (``seq_len`` tokens of the wiki
   calibration articles) run through the model with gradients
   (:func:`gsrq.calibration.capture_kv`); from each window a seeded subset of
   ``per_window`` token positions (never the first ``sinks``) is kept: the
   post-RoPE keys and values of every layer and KV head, float32
   ``[N, H, hd]``, and their loss gradients of the same shape. One more
   calibration window, never trained on, gives held-out vectors for
   reconstruction metrics. Everything goes to one safetensors file under
   ``~/.cache/gsrq/ablation/`` keyed by model, text, sizes and seed, and is
   reused by every later run.
2. **Per configuration.** Fit the key levers (:mod:`gsrq.levers`), map keys
   and gradients to the code domain, draw at most ``config.max_samples``
   samples per codebook, compute gradient weights there, train every residual
   quantizer with the Rust engine, round codebooks to float16 (their stored
   precision), and build the same :class:`gsrq.quantizer.KVQuantizer` a cache
   would use.
3. **Evaluate.** Held-out reconstruction (rel. MSE, cosine, gain error; keys
   and values, mean over layers) and fake-quantized perplexity on held-out wiki
   windows (:func:`gsrq.eval.ppl.perplexity`: ``sinks`` exact tokens, every
   other key and value reconstructed; optionally an exact sliding window).
   Bits per element count every bit (codes, norms, scales, exact tokens, the
   float16 codebooks amortised over one sequence) at ``ctx`` and at 32k.

Results are appended to a JSON-lines file as each configuration finishes
(so an interrupted run resumes) and printed as a table row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsrq.config import KINDS, GSRQConfig, KindConfig
from gsrq.errors import ConfigError, InvalidValueError

CACHE_DIR = Path(os.environ.get("GSRQ_CACHE", Path.home() / ".cache" / "gsrq")) / "ablation"


# ------------------------------------------------------------------ capture
@dataclass
class Capture:
    """Captured calibration vectors: per (layer, kind) float32 ``[N, H, hd]`` x and g, and held-out ``[Ne, H, hd]``."""

    x: dict[tuple[int, str], np.ndarray]
    g: dict[tuple[int, str], np.ndarray]
    heldout: dict[tuple[int, str], np.ndarray]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    meta: dict[str, Any]


def capture_path(model_id: str, windows: int, seq_len: int, per_window: int, seed: int, sinks: int) -> Path:
    key = json.dumps([model_id, "wiki-calibration", windows, seq_len, per_window, seed, sinks])
    return CACHE_DIR / f"capture-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def capture(
    model: Any,
    tokenizer: Any,
    *,
    model_id: str,
    windows: int = 8,
    seq_len: int = 1024,
    per_window: int = 512,
    seed: int = 0,
    sinks: int = 4,
    progress: bool = True,
) -> Capture:
    """Capture (or load from the disk cache) keys, values and gradients of ``windows`` calibration windows.

    Returns a :class:`Capture` with ``N = windows * per_window`` tokens per
    layer and the held-out tokens of one more window (``per_window`` of them).
    """
    from safetensors.numpy import load_file, save_file
    from tqdm.auto import tqdm

    from gsrq.calibration import capture_kv, freeze, model_shape
    from gsrq.data import calibration_text, token_windows

    if windows < 1 or per_window < 1 or per_window > seq_len - sinks:
        raise ConfigError(f"need windows >= 1 and 1 <= per_window <= seq_len - sinks, got {windows}, {per_window}")
    shape = model_shape(model)
    path = capture_path(model_id, windows, seq_len, per_window, seed, sinks)
    if path.is_file():
        t = load_file(str(path))
        meta = json.loads(bytes(t.pop("meta")).decode())
        x = {(int(k.split(".")[1]), k.split(".")[2]): v for k, v in t.items() if k.endswith(".x")}
        g = {(int(k.split(".")[1]), k.split(".")[2]): v for k, v in t.items() if k.endswith(".g")}
        e = {(int(k.split(".")[1]), k.split(".")[2]): v for k, v in t.items() if k.endswith(".heldout")}
        return Capture(x, g, e, shape.num_layers, shape.num_kv_heads, shape.head_dim, meta)
    ids = token_windows(tokenizer, calibration_text(), seq_len, (windows + 1) * seq_len)
    if ids.shape[0] < windows + 1:
        raise InvalidValueError(f"the calibration text fills {ids.shape[0]} windows, {windows + 1} needed")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAB1A]))
    freeze(model)
    xs: dict[tuple[int, str], list[np.ndarray]] = {(l, k): [] for l in range(shape.num_layers) for k in KINDS}
    gs: dict[tuple[int, str], list[np.ndarray]] = {(l, k): [] for l in range(shape.num_layers) for k in KINDS}
    held: dict[tuple[int, str], np.ndarray] = {}
    t0 = time.perf_counter()
    losses = []
    for w in tqdm(range(windows + 1), desc="capture K/V + gradients", unit="window", disable=not progress):
        train = w < windows
        keys, values, kg, vg, loss = capture_kv(model, ids[w : w + 1], grad=train)
        pos = torch.from_numpy(np.sort(rng.choice(np.arange(sinks, seq_len), per_window, replace=False)))
        for layer in range(shape.num_layers):
            for kind, t, tg in (("keys", keys, kg), ("values", values, vg)):
                sel = t[layer][0][:, pos].permute(1, 0, 2).float().numpy().copy()  # [n, H, hd]
                if train:
                    xs[layer, kind].append(sel)
                    gs[layer, kind].append(tg[layer][0][:, pos].permute(1, 0, 2).float().numpy().copy())
                else:
                    held[layer, kind] = sel
        if train:
            losses.append(loss)
        del keys, values, kg, vg
    meta = {"windows": windows, "seq_len": seq_len, "per_window": per_window, "seed": seed, "sinks": sinks,
            "tokens": windows * seq_len, "model_id": model_id, "mean_loss": float(np.mean(losses)),
            "seconds": round(time.perf_counter() - t0, 1)}
    x = {k: np.concatenate(v) for k, v in xs.items()}
    g = {k: np.concatenate(v) for k, v in gs.items()}
    tensors = {f"layers.{l}.{k}.x": v for (l, k), v in x.items()}
    tensors.update({f"layers.{l}.{k}.g": v for (l, k), v in g.items()})
    tensors.update({f"layers.{l}.{k}.heldout": v for (l, k), v in held.items()})
    tensors["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return Capture(x, g, held, shape.num_layers, shape.num_kv_heads, shape.head_dim, meta)


# ------------------------------------------------------------------ training
def train_quantizers(config: GSRQConfig, cap: Capture, *, threads: int | None = None,
                     progress: bool = True) -> dict[tuple[int, str], Any]:
    """Fit levers and train codebooks on the captured vectors: ``{(layer, kind): KVQuantizer}``.

    Codebooks are rounded to float16 (their stored precision). Keys and
    gradients enter the learner in the code domain (:mod:`gsrq.levers`).
    """
    from tqdm.auto import tqdm

    from gsrq.calibration import _codebook_seed, chunk_norms, gradient_weights
    from gsrq.engine import ResidualQuantizer
    from gsrq.levers import KeyLevers, fit_key_levers
    from gsrq.quantizer import KVQuantizer

    H, hd = cap.num_kv_heads, cap.head_dim
    config.validate_for(hd, H)
    Hc = H if config.per_head else 1
    out: dict[tuple[int, str], Any] = {}
    total = cap.num_layers * sum(Hc * config.kind(k).chunks(hd) for k in KINDS)
    bar = tqdm(total=total, desc=f"train {config.method}", unit="codebook", disable=not progress, leave=False)
    for layer in range(cap.num_layers):
        for kind in KINDS:
            kc = config.kind(kind)
            C = kc.chunks(hd)
            x = torch.from_numpy(cap.x[layer, kind]).permute(1, 0, 2)  # [H, N, hd]
            g = torch.from_numpy(cap.g[layer, kind]).permute(1, 0, 2)
            levers = fit_key_levers(config, layer, x, g) if kind == "keys" else KeyLevers(None, None, None, False)
            y, gy, _ = levers.to_code_domain(x, g)  # code domain, per KV head
            assert gy is not None
            if not config.per_head:
                y, gy = y.reshape(1, -1, hd), gy.reshape(1, -1, hd)  # [1, H*N, hd]: heads pooled
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, layer, KINDS.index(kind), 0x5E1]))
            n = y.shape[1]
            if n > config.max_samples:
                idx = torch.from_numpy(np.sort(rng.choice(n, config.max_samples, replace=False)))
                y, gy = y[:, idx], gy[:, idx]
            books = np.empty((Hc, C, kc.M, kc.Kc, kc.D), dtype=np.float32)
            for h in range(Hc):
                norms = chunk_norms(gy[h], kc.D).numpy()  # [n, C]
                for c in range(C):
                    xs = np.ascontiguousarray(y[h, :, c * kc.D : (c + 1) * kc.D].numpy())
                    w = gradient_weights(norms[:, c], config.tau) if config.grad_weights != "off" else None
                    rq = ResidualQuantizer(kc.D, kc.Kc, kc.M, config.method,
                                           seed=_codebook_seed(config.seed, layer, kind, h, c),
                                           iters=config.iters, init_iters=config.init_iters,
                                           weights_in_init_only=config.grad_weights == "init",
                                           threads=threads).fit(xs, w)
                    books[h, c] = rq.codebooks
                    bar.update(1)
            books = books.astype(np.float16).astype(np.float32)
            out[layer, kind] = KVQuantizer(torch.from_numpy(books), kc, rotation=levers.rotation,
                                           scale=levers.scale, norm=levers.norm, beam=config.beam,
                                           threads=threads)
    bar.close()
    return out


def reconstruction(quantizers: dict[tuple[int, str], Any], cap: Capture) -> dict[str, dict[str, float]]:
    """Held-out reconstruction metrics per kind (mean over layers): rel_mse, cosine, gain_error."""
    from gsrq.engine import reconstruction_metrics

    acc: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    for (layer, kind), q in quantizers.items():
        x = torch.from_numpy(cap.heldout[layer, kind]).permute(1, 0, 2).unsqueeze(0)  # [1, H, n, hd]
        m = reconstruction_metrics(x.numpy(), q.fake_quant(x).numpy())
        for name, v in m.items():
            acc[kind].setdefault(name, []).append(v)
    return {k: {n: float(np.mean(v)) for n, v in d.items()} for k, d in acc.items()}


# ------------------------------------------------------------------ the grid
def _kc(D: int, M: int, Kc: int = 256) -> KindConfig:
    return KindConfig(D=D, Kc=Kc, M=M)


def _cfg(k: tuple[int, int] | tuple[int, int, int], v: tuple[int, int] | tuple[int, int, int] | None = None,
         **kw: Any) -> GSRQConfig:
    v = k if v is None else v
    return GSRQConfig(keys=_kc(*k[:2], *k[2:]), values=_kc(*v[:2], *v[2:]), **kw)


def grid(max_samples: int) -> dict[str, GSRQConfig]:
    """Every configuration of the ablation, by label (the first of each block is its reference)."""
    ms = {"max_samples": max_samples}
    g: dict[str, GSRQConfig] = {}
    # 1 bit: chunk length x stages
    for D, M in ((8, 1), (16, 2), (32, 4), (64, 8)):
        g[f"1b D{D}/M{M}"] = _cfg((D, M), **ms)
    base = dict(ms)
    g["1b D64/M8 km"] = _cfg((64, 8), method="km", **base)
    g["1b D64/M8 nograd"] = _cfg((64, 8), grad_weights="off", **base)
    g["1b D64/M8 initgrad"] = _cfg((64, 8), grad_weights="init", **base)
    g["1b D64/M8 tau=4"] = _cfg((64, 8), tau=4.0, **base)
    g["1b D64/M8 tau=0.25"] = _cfg((64, 8), tau=0.25, **base)
    g["1b D64/M8 perhead"] = _cfg((64, 8), per_head=True, **base)
    g["1b D64/M8 beam4"] = _cfg((64, 8), beam=4, **base)
    g["1b D64/M8 keynorm"] = _cfg((64, 8), key_norm=True, **base)
    g["1b D64/M8 hadamard"] = _cfg((64, 8), key_rotation="hadamard", **base)
    g["1b D64/M8 hadamard_signs"] = _cfg((64, 8), key_rotation="hadamard_signs", **base)
    g["1b D64/M8 keyscale"] = _cfg((64, 8), key_scale=True, **base)
    g["1b K10/V6"] = _cfg((64, 10), (64, 6), **base)
    g["1b K12/V4"] = _cfg((64, 12), (64, 4), **base)
    g["1b D32/M4 km"] = _cfg((32, 4), method="km", **base)
    g["1b D16/M2 km"] = _cfg((16, 2), method="km", **base)
    g["1b D64/M16 Kc16"] = _cfg((64, 16, 16), **base)
    g["1b D64/M8 samples x3"] = _cfg((64, 8), max_samples=3 * max_samples)
    # combinations of the levers that helped alone
    g["1b perhead+norm"] = _cfg((64, 8), per_head=True, key_norm=True, **base)
    g["1b perhead+norm K12/V4"] = _cfg((64, 12), (64, 4), per_head=True, key_norm=True, **base)
    g["1b perhead+norm K10/V6"] = _cfg((64, 10), (64, 6), per_head=True, key_norm=True, **base)
    g["1b norm K12/V4"] = _cfg((64, 12), (64, 4), key_norm=True, **base)
    g["0.5b perhead+norm"] = _cfg((64, 4), per_head=True, key_norm=True, **base)
    g["0.5b perhead+norm K6/V2"] = _cfg((64, 6), (64, 2), per_head=True, key_norm=True, **base)
    g["2b perhead+norm"] = _cfg((32, 8), per_head=True, key_norm=True, **base)
    g["2b norm"] = _cfg((32, 8), key_norm=True, **base)
    g["2b perhead+norm km"] = _cfg((32, 8), per_head=True, key_norm=True, method="km", **base)
    g["1b norm samples x3"] = _cfg((64, 8), key_norm=True, max_samples=3 * max_samples)
    g["1b norm beam4"] = _cfg((64, 8), key_norm=True, beam=4, **base)
    g["1b norm K10/V6"] = _cfg((64, 10), (64, 6), key_norm=True, **base)
    g["1b norm K10/V6 samples x3"] = _cfg((64, 10), (64, 6), key_norm=True, max_samples=3 * max_samples)
    g["1b norm K10/V6 samples x3 beam4"] = _cfg((64, 10), (64, 6), key_norm=True, beam=4,
                                                max_samples=3 * max_samples)
    g["1b norm K10/V6 samples x3 km"] = _cfg((64, 10), (64, 6), key_norm=True, method="km",
                                             max_samples=3 * max_samples)
    gs = dict(key_norm=True, key_scale=True, key_scale_fit="grad")
    g["1b norm gradscale"] = _cfg((64, 8), **gs, **base)
    g["1b norm gradscale p=1"] = _cfg((64, 8), **gs, key_scale_power=1.0, **base)
    g["1b norm gradscale p=0.25"] = _cfg((64, 8), **gs, key_scale_power=0.25, **base)
    g["1b norm K10/V6 gradscale"] = _cfg((64, 10), (64, 6), **gs, **base)
    g["1b norm K10/V6 gradscale samples x3"] = _cfg((64, 10), (64, 6), **gs, max_samples=3 * max_samples)
    g["1b norm K10/V6 gradscale samples x3 beam4"] = _cfg((64, 10), (64, 6), **gs, beam=4,
                                                          max_samples=3 * max_samples)
    g["1b norm K10/V6 gradscale samples x3 km"] = _cfg((64, 10), (64, 6), **gs, method="km",
                                                       max_samples=3 * max_samples)
    g["0.5b norm K5/V3 gradscale samples x3"] = _cfg((64, 5), (64, 3), **gs, max_samples=3 * max_samples)
    g["2b norm K10/V6 km gradscale samples x3"] = _cfg((32, 10), (32, 6), **gs, method="km",
                                                       max_samples=3 * max_samples)
    g["0.5b norm"] = _cfg((64, 4), key_norm=True, **base)
    g["0.5b norm K5/V3"] = _cfg((64, 5), (64, 3), key_norm=True, **base)
    g["0.5b norm K5/V3 samples x3"] = _cfg((64, 5), (64, 3), key_norm=True, max_samples=3 * max_samples)
    g["0.5b norm K5/V3 samples x3 beam4"] = _cfg((64, 5), (64, 3), key_norm=True, beam=4,
                                                 max_samples=3 * max_samples)
    g["2b norm km"] = _cfg((32, 8), key_norm=True, method="km", **base)
    g["2b norm K10/V6 km"] = _cfg((32, 10), (32, 6), key_norm=True, method="km", **base)
    g["2b norm K10/V6 km samples x3"] = _cfg((32, 10), (32, 6), key_norm=True, method="km",
                                             max_samples=3 * max_samples)
    g["2b norm K10/V6 km samples x3 beam4"] = _cfg((32, 10), (32, 6), key_norm=True, method="km", beam=4,
                                                   max_samples=3 * max_samples)
    # 0.5 bit
    g["0.5b D32/M2"] = _cfg((32, 2), **base)
    g["0.5b D64/M4"] = _cfg((64, 4), **base)
    g["0.5b D64/M4 km"] = _cfg((64, 4), method="km", **base)
    g["0.5b K6/V2"] = _cfg((64, 6), (64, 2), **base)
    # 2 bits
    g["2b D8/M2"] = _cfg((8, 2), **base)
    g["2b D32/M8"] = _cfg((32, 8), **base)
    g["2b D64/M16"] = _cfg((64, 16), **base)
    g["2b D32/M8 km"] = _cfg((32, 8), method="km", **base)
    return g


def levers_label(c: GSRQConfig) -> str:
    parts = []
    if c.key_rotation != "none":
        parts.append(c.key_rotation)
    if c.key_scale:
        parts.append("scale" if c.key_scale_fit == "rms" else f"gradscale^{c.key_scale_power:g}")
    if c.key_norm:
        parts.append("norm")
    return "+".join(parts) or "-"


# ------------------------------------------------------------------ running
def result_key(label: str, config: GSRQConfig, cap_meta: dict, windows: int, exact: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps([label, config.to_json(), cap_meta.get("tokens"), cap_meta.get("per_window"),
                                      cap_meta.get("seed"), windows, list(exact)]).encode()).hexdigest()[:16]


HEADER = ("| config | K D/Kc/M | V D/Kc/M | learner | grad w | τ | heads | key levers | beam | code bits | "
          "bits @1024 | bits @32k | ppl | ppl w=64 | K rel MSE | K cos | K gain err | V rel MSE | V cos | "
          "V gain err | train s |")
SEP = "|" + "---|" * HEADER.count(" | ") + "---|"


def row_markdown(r: dict) -> str:
    c = GSRQConfig.from_dict(r["config"])
    k, v = c.keys, c.values
    rk, rv = r["recon"]["keys"], r["recon"]["values"]
    f = lambda x, p=3: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    return (f"| {r['label']} | {k.D}/{k.Kc}/{k.M} | {v.D}/{v.Kc}/{v.M} | {c.method} | {c.grad_weights} | {c.tau:g} | "
            f"{'per head' if c.per_head else 'shared'} | {levers_label(c)} | {c.beam} | {c.code_bits_per_element:g} | "
            f"{r['bits_ctx']:.2f} | {r['bits_32k']:.3f} | {f(r['ppl'].get('0'), 2)} | {f(r['ppl'].get('64'), 2)} | "
            f"{rk['rel_mse']:.3f} | {rk['cosine']:.3f} | {rk['gain_error']:.3f} | {rv['rel_mse']:.3f} | "
            f"{rv['cosine']:.3f} | {rv['gain_error']:.3f} | {r['train_s']:.0f} |")


def run_one(label: str, config: GSRQConfig, cap: Capture, model: Any, windows: torch.Tensor, *,
            exact: tuple[int, ...], threads: int | None, progress: bool) -> dict:
    """Train and evaluate one configuration; returns a JSON-able result row."""
    from gsrq.eval.ppl import perplexity

    t0 = time.perf_counter()
    qs = train_quantizers(config, cap, threads=threads, progress=progress)
    t_train = time.perf_counter() - t0
    recon = reconstruction(qs, cap)
    factory = lambda layer, kind: qs[layer, kind].fake_quant  # noqa: E731
    ppl: dict[str, float] = {}
    t1 = time.perf_counter()
    for w in exact:
        res = perplexity(model, windows, factory, sinks=config.sinks, window=w, progress=progress,
                         desc=f"{label} w={w}")
        ppl[str(w)] = res.ppl
    ctx = int(windows.shape[1])
    rep = lambda n, w: config.replace(window=w).rate_report(n, head_dim=cap.head_dim,  # noqa: E731
                                                            num_kv_heads=cap.num_kv_heads)
    return {
        "label": label, "config": config.to_dict(), "ppl": ppl, "recon": recon,
        "bits_ctx": rep(ctx, 0)["total"], "bits_32k": rep(32768, 0)["total"],
        "bits_ctx_w64": rep(ctx, 64)["total"], "bits_32k_w64": rep(32768, 64)["total"],
        "train_s": t_train, "eval_s": time.perf_counter() - t1, "windows": int(windows.shape[0]), "ctx": ctx,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--only", default=None, help="comma-separated labels of the grid to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the grid's labels and exit")
    p.add_argument("--windows", type=int, default=8, help="held-out eval windows (default 8)")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per eval window (default 1024)")
    p.add_argument("--exact-windows", default="0,64", help="exact sliding windows to evaluate (default 0,64)")
    p.add_argument("--capture-windows", type=int, default=64, help="calibration windows captured (default 64: 64k tokens)")
    p.add_argument("--per-window", type=int, default=512, help="token positions kept per captured window (default 512)")
    p.add_argument("--max-samples", type=int, default=32768,
                   help="training samples per codebook (default 32768; \"samples x3\" rows use three times this)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=None, help="JSON-lines results file (default under ~/.cache/gsrq/ablation)")
    p.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = grid(args.max_samples)
    if args.list:
        print("\n".join(g))
        return 0
    labels = list(g) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in labels if s not in g]
    if unknown:
        raise ConfigError(f"unknown ablation label(s) {unknown}; --list shows them")
    exact = tuple(int(s) for s in args.exact_windows.split(",") if s.strip())
    from gsrq.data import heldout_text, load_model
    from gsrq.eval.ppl import eval_windows, perplexity

    progress = not args.no_progress
    model, tokenizer, model_id = load_model(args.model)
    cap = capture(model, tokenizer, model_id=model_id, windows=args.capture_windows, per_window=args.per_window,
                  progress=progress)
    windows = eval_windows(tokenizer, heldout_text(), args.ctx, args.windows)
    results = Path(args.results) if args.results else CACHE_DIR / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    fp_key = f"fp32-{model_id}-{args.windows}-{args.ctx}"
    if fp_key not in done:
        fp = perplexity(model, windows, None, progress=progress, desc="fp32").ppl
        done[fp_key] = {"key": fp_key, "fp32": fp}
        with results.open("a") as fh:
            fh.write(json.dumps(done[fp_key]) + "\n")
    fp = done[fp_key]["fp32"]
    print(f"fp32 perplexity: {fp:.3f} ({args.windows} held-out windows of {args.ctx}; capture: "
          f"{cap.meta['tokens']} calibration tokens, {cap.x[0, 'keys'].shape[0]} positions x "
          f"{cap.num_kv_heads} heads kept per layer)", flush=True)
    print(HEADER)
    print(SEP, flush=True)
    rows = []
    for label in labels:
        config = g[label]
        key = result_key(label, config, cap.meta, args.windows, exact)
        if key not in done:
            r = run_one(label, config, cap, model, windows, exact=exact, threads=args.threads, progress=progress)
            r["key"] = key
            r["fp32"] = fp
            with results.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            done[key] = r
        rows.append(done[key])
        print(row_markdown(done[key]), flush=True)
    if args.markdown:
        md = [f"fp32 perplexity {fp:.3f}", "", HEADER, SEP] + [row_markdown(r) for r in rows]
        tmp = Path(args.markdown + ".tmp")
        tmp.write_text("\n".join(md) + "\n")
        os.replace(tmp, args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gsrq.eval.ablation", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
