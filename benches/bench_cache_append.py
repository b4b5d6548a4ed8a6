#!/usr/bin/env python3
"""Storage cost of one decode step of a GSRQLayer against the context length.

One LLaMA-3-8B layer (8 KV heads, head_dim 128) with random codebooks of
``GSRQConfig.from_bits(bits)``, 4 sinks, no window. The layer is filled with
``ctx`` coded tokens (random packed rows written straight into its code
buffers: decode speed does not depend on the codes, and encoding 128k tokens
on a CPU takes minutes), then ``--steps`` decode steps ``layer.append(k, v)``
(one token: encode + store, what the fused path does per layer and step) are
timed (median). ``cat`` is what the previous storage did per step instead of
the in-place write: concatenating the layer's key and value code tensors
(``torch.cat``, O(context) bytes), timed on the same tensors.

Usage:
    python benches/bench_cache_append.py [--ctx 4096,32768,131072] [--bits 1] [--steps 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from gsrq.cache import GSRQLayer
from gsrq.config import GSRQConfig
from gsrq.quantizer import KVQuantizer


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, steps: int, dev: torch.device) -> float:
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", default="4096,32768,131072")
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = GSRQConfig.from_bits(args.bits)
    Hkv, hd, B = 8, 128, 1
    g = torch.Generator().manual_seed(0)

    def quantizer(kc):
        books = torch.randn(1, hd // kc.D, kc.M, kc.Kc, kc.D, generator=g) * 0.1
        return KVQuantizer(books, kc, device=dev)

    kq, vq = quantizer(cfg.keys), quantizer(cfg.values)
    print(
        "| context | append ms/step (buffers) | code bytes written per step | reallocations during the steps "
        "| cat ms/step (previous storage) | bytes copied per step by cat |"
    )
    print("|---|---|---|---|---|---|")
    for ctx in tqdm([int(c) for c in args.ctx.split(",")], desc="contexts", leave=False):
        layer = GSRQLayer(kq, vq, sinks=4, window=0, fused=False)
        layer.update(torch.randn(B, Hkv, 4, hd, dtype=dt, device=dev), torch.randn(B, Hkv, 4, hd, dtype=dt, device=dev))
        rows_k = torch.randint(0, 256, (B, Hkv, ctx, kq.row_bytes), dtype=torch.uint8, device=dev)
        rows_v = torch.randint(0, 256, (B, Hkv, ctx, vq.row_bytes), dtype=torch.uint8, device=dev)
        layer._push_codes(rows_k, rows_v, None)
        k = torch.randn(B, Hkv, 1, hd, dtype=dt, device=dev)
        v = torch.randn(B, Hkv, 1, hd, dtype=dt, device=dev)
        layer.append(k, v)  # warm-up
        r0 = layer.reallocations
        ms = _median_ms(lambda: layer.append(k, v), args.steps, dev)
        realloc = layer.reallocations - r0
        new_k = torch.empty(B, Hkv, 1, kq.row_bytes, dtype=torch.uint8, device=dev)
        new_v = torch.empty(B, Hkv, 1, vq.row_bytes, dtype=torch.uint8, device=dev)
        cat_ms = _median_ms(lambda: (torch.cat([rows_k, new_k], 2), torch.cat([rows_v, new_v], 2)), args.steps, dev)
        row = B * Hkv * (kq.row_bytes + vq.row_bytes)
        tqdm.write(f"| {ctx} | {ms:.3f} | {row} | {realloc} | {cat_ms:.3f} | {(ctx + 1) * row:,} |")


if __name__ == "__main__":
    main()
